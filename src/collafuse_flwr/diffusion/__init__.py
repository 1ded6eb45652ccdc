"""The protocol core: the chain and its cut, the two objectives, the samplers split at the cut,
the protocol variants, the denoisers and their training loop (docs/protocol.md)."""
