"""Labelled images as the method takes them, and the class-aware splits and orders its stages share.

Images travel as float32 tensors (N, C, H, W) in [0,1] and labels as int64 (N,).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from services.method.errors import InputError


@dataclass
class ImageData:
    """Images (N, C, H, W) float32 in [0,1] and labels (N,) int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor) -> "ImageData":
        """The rows at `index`."""
        return ImageData(self.x[index], self.y[index])


def require_every_class(data: ImageData, num_classes: int, minimum: int, what: str) -> None:
    """Refuse data with fewer than `minimum` samples of some class (the boundary needs every pair)."""
    require_class_counts(torch.bincount(data.y, minlength=num_classes), minimum, what)


def require_class_counts(counts: Tensor, minimum: int, what: str) -> None:
    """Refuse class counts with fewer than `minimum` samples of some class."""
    if counts.min() < minimum:
        k = int(counts.argmin())
        raise InputError(f"{what} has {int(counts[k])} samples of class {k}; give at least {minimum} of every class")


def stratified_split(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """Split off `fraction` of every class as a held-out set: (rest, held_out)."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in data.y.unique().tolist():
        idx = (data.y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        keep.append(idx[k:])
    return data.subset(torch.cat(keep).sort().values), data.subset(torch.cat(held).sort().values)


def balanced_order(y: Tensor, gen: torch.Generator) -> Tensor:
    """A permutation that deals the classes out in rounds, one sample of each class per round (random
    samples, random class order within a round), so every prefix is as class-balanced as the counts allow."""
    perm = torch.randperm(len(y), generator=gen)
    rank = torch.empty(len(y), dtype=torch.long)
    for c in y.unique().tolist():
        at = (y[perm] == c).nonzero().squeeze(1)
        rank[at] = torch.arange(len(at))
    return perm[torch.sort(rank, stable=True).indices]
