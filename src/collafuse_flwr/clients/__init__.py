"""The client side, mirroring strategies/ (the server side).

round.py        ClientRound: the validated context of one message, the protocol, the client's
                data and its denoiser on disk
state.py        the client's private state root and secret (chosen on the client, never sent)
collafuse.py    the CollaFuse client: private denoiser for t <= t_zeta, cut-point uploads,
                finishing the handed-over samples
fedavg.py       the FedAvg client: full-chain denoiser from the averaged weights
evaluation.py   the evaluation reply of every client: quality, cost, feature moments
release.py      what the client releases when it evaluates, and on which networks (or declines)
ledger.py       the per-image privacy ledger: views spent, the budget check before a new one
faults.py       injected faults, a client mod
"""
