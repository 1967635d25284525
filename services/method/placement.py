"""Where a stage's data lives while it computes, so that the hot loops never wait on the host.

On a GPU, the stage's inputs (images, labels, latents) move to the device once when they fit in `SHARE` of its
free memory; larger inputs stay on the host and each batch is gathered into pinned memory and copied without
blocking (torch's caching host allocator keeps a pinned block until its copy is done). Outputs collected batch
by batch (latents, generated examples, adversarial images, per-row verdicts) stay on the device while they fit
in that share too, and come to the host in one copy at the end. On the CPU everything here is the identity.
"""

import torch
from torch import Tensor

SHARE = 0.5  # of the GPU's free memory; LADDER_GPU_DATA_SHARE overrides it per process (set_share)


def set_share(share: float | None) -> None:
    """The share of free GPU memory that a stage's inputs (and, apart, its outputs) may take on the device (None:
    the default)."""
    global SHARE
    if share is None:
        return
    if not 0 <= share <= 1:
        raise ValueError(f"the GPU data share must be between 0 and 1, not {share}")
    SHARE = share


def _budget(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * SHARE)


def nbytes(*tensors: Tensor) -> int:
    """The bytes the tensors' elements take."""
    return sum(t.numel() * t.element_size() for t in tensors)


def inputs(device: torch.device, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors on `device` when they all fit there together, else as they are (on the host, streamed by
    `batch`)."""
    if device.type == "cuda" and nbytes(*tensors) > _budget(device):
        return tensors
    return tuple(t.to(device) for t in tensors)  # a tensor already there is itself


def batch(t: Tensor, rows: Tensor | slice, device: torch.device) -> Tensor:
    """t[rows] on `device`: indexed where t lives; from the host through pinned memory, without blocking."""
    if isinstance(rows, Tensor):
        rows = rows.to(t.device)
    return to_device(t[rows], device)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """t on `device`; from the host to a GPU through pinned memory, without blocking."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Gather:
    """Batches of a stage's output, concatenated on the host at the end: kept on the device while they fit in
    the share, else brought over whenever they pass it (one wait per flush, not per batch)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.budget = _budget(device) if device.type == "cuda" else 0
        self.pending: list[Tensor] = []
        self.pending_bytes = 0
        self.done: list[Tensor] = []

    def add(self, t: Tensor) -> None:
        """Keep one batch of output (any device)."""
        if t.device.type != "cuda":
            self.done.append(t)
            return
        self.pending.append(t)
        self.pending_bytes += nbytes(t)
        if self.pending_bytes > self.budget:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.done.append(torch.cat(self.pending).cpu())
            self.pending, self.pending_bytes = [], 0

    def result(self, empty: Tensor | None = None) -> Tensor:
        """Every batch, in order, on the host; `empty` when none came."""
        self._flush()
        if not self.done:
            if empty is None:
                raise ValueError("no batches were gathered and no empty result was given")
            return empty
        return torch.cat(self.done) if len(self.done) > 1 else self.done[0]
