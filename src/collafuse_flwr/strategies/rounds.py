"""Round numbers of a resumed run.

Flower's `Strategy.start` numbers the rounds of each start 1, 2, ...; a run resumed after
`rounds_done` completed rounds starts Flower with the rounds left, and its strategy's four
Flower entry points must see the run's own numbers (rounds_done + 1, ...): in metrics.csv,
checkpoints, seeds and the evaluation schedule. Subclasses of `ResumableRounds` get them.
"""

from __future__ import annotations

import functools

from collafuse_flwr.checkpoint import Checkpoint

ENTRY_POINTS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")


class ResumableRounds:
    """Mixin: the entry points a subclass defines receive `server_round + rounds_done`."""

    rounds_done = 0  # rounds completed before this start (a resumed run)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ENTRY_POINTS:
            if name in cls.__dict__:
                setattr(cls, name, _shifted(cls.__dict__[name]))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue after `checkpoint`'s round (subclasses restore their own state too)."""
        self.rounds_done = checkpoint.server_round


def _shifted(method):
    @functools.wraps(method)
    def shifted(self, server_round: int, *args, **kwargs):
        return method(self, server_round + self.rounds_done, *args, **kwargs)

    return shifted
