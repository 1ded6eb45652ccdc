"""The server side (clients/ mirrors it).

setup.py        everything before the first round: checks, run directory, feature network,
                the strategy of the run
collafuse.py    CollaFuse (and the published variant): the shared server denoiser for t > t_zeta
fedavg.py       the FedAvg baseline: averaging full-chain client denoisers
parties.py      who is addressed, and which replies are accepted (validated, or a recorded fault)
evaluation.py   reading the clients' evaluation replies, the pooled row
rounds.py       resuming rounds after a checkpoint
"""
