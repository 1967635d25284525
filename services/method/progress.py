"""Progress reporting: every long stage calls `progress(stage, fraction, metrics)`."""

import time
from collections.abc import Callable

Progress = Callable[[str, float, dict[str, float]], None]


def silent(stage: str, fraction: float, metrics: dict[str, float]) -> None:
    """A progress callback that reports nothing."""


class Every:
    """True at most once per `seconds`: a long loop reports progress (a host sync on a GPU) this often, not every
    step."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds
        self.last = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
