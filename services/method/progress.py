"""Progress reporting: every long stage calls `progress(stage, fraction, metrics)`."""

from collections.abc import Callable

Progress = Callable[[str, float, dict[str, float]], None]


def silent(stage: str, fraction: float, metrics: dict[str, float]) -> None:
    """A progress callback that reports nothing."""
