"""How a stage's arithmetic is set up, so that the same seed on the same GPU model gives the same numbers.

`setup` asks torch for deterministic algorithms (warning, not failing, where an op has none: `watch` collects
those warnings, and the report names each stage that used such an op as not bit-exact), turns off cuDNN's
autotuner and TF32, and gives cuBLAS the fixed workspace its deterministic mode needs. `training` is the one
place a run's `precision` applies: generator training and fine-tuning steps; attacks and evaluation stay fp32.
"""

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")


def setup() -> None:
    """Deterministic settings for this process (before it first uses cuBLAS: the workspace is read then)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # on by default with the above; nothing here reads it
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False  # torch's default is True: fp32 means fp32 unless a run asks (`training`)
    torch.backends.cuda.matmul.allow_tf32 = False


@contextmanager
def training(precision: str, device: torch.device) -> Iterator[None]:
    """A training step's forward and backward at the run's precision: fp32; tf32 (TF32 matmuls and convolutions,
    on GPUs that have it); bf16 (bf16 autocast, with TF32 for what stays fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    fast = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = fast
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def watch() -> Iterator[list[str]]:
    """The ops without a deterministic implementation that ran inside (sorted, once each), filled in on exit."""
    seen: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        ops = set()
        for w in caught:
            match = _NONDETERMINISTIC.search(str(w.message))
            if match:
                ops.add(match.group(1))
            else:  # not ours to keep: passed on as if it had not been caught
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        seen.extend(sorted(ops))
