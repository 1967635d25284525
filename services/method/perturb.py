"""Stage 4: boundary-guided examples x̂ = G(z + ε·β⊙d), labelled with the source class (method.md, stage 4).

ε has no fixed unit (it depends on ‖z‖ and the margins of each model), so by default it is
calibrated per model: for each latent, with a random target t ≠ y, find the smallest ε on a
geometric grid at which the head predicts t; the ε list is the given quantiles of those
crossing points, and the table records the measured crossing rate at each chosen ε.

Directions: `boundary` is LADDER (β ⊙ d, d the SVM normal oriented y → t); `random` replaces d
by N(0, I)·random_scale (LADDER_Random); `cav_random` uses β ⊙ (d + N(0, I)·cav_noise)
(LADDER_cavRandom). Both variants follow the authors' noise scales.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from services.method.boundary import Boundary
from services.method.progress import Progress, silent

Direction = Literal["boundary", "random", "cav_random"]
_GRID_POINTS = 64
_FLIP_CHECKS = 1000


def random_targets(y: Tensor, num_classes: int, gen: torch.Generator) -> Tensor:
    """A target class t ≠ y per sample, uniform over the other classes."""
    return (y + torch.randint(1, num_classes, y.shape, generator=gen)) % num_classes


def directions(
    boundary: Boundary, z: Tensor, y: Tensor, t: Tensor, kind: Direction, gen: torch.Generator,
    random_scale: float = 0.1, cav_noise: float = 0.01,
) -> Tensor:
    """The per-sample latent step whose multiples by ε make the examples; (N, D)."""
    if kind == "random":
        return torch.randn(z.shape, generator=gen) * random_scale
    if kind == "cav_random":
        index, sign = boundary.pair_index(y, t)
        normal = torch.nn.functional.normalize(boundary.w, dim=1)[index] * sign[:, None]
        return boundary.attention(z, index) * (normal + torch.randn(z.shape, generator=gen) * cav_noise)
    return boundary.direction(z, y, t)


@torch.no_grad()
def _crosses(head: nn.Module, z: Tensor, step: Tensor, eps: Tensor, t: Tensor, batch: int = 8192) -> Tensor:
    """(E, N) bool: does h(z + ε·step) predict t, for every ε in eps."""
    out = torch.empty(len(eps), len(z), dtype=torch.bool)
    for k, e in enumerate(eps.tolist()):
        for i in range(0, len(z), batch):
            out[k, i : i + batch] = head(z[i : i + batch] + e * step[i : i + batch]).argmax(1) == t[i : i + batch]
    return out


@dataclass
class Calibration:
    """The ε list, how it was chosen, and the crossing rate measured at each ε and along the grid."""

    eps: list[float]
    quantiles: list[float] | None  # None when the ε list was given raw
    crossing_rate: list[float]
    grid_eps: list[float]
    grid_crossing_rate: list[float]

    def table(self) -> list[dict]:
        """Rows of (quantile, ε, measured crossing rate) for the report."""
        qs = self.quantiles or [None] * len(self.eps)
        return [{"quantile": q, "eps": e, "crossing_rate": r} for q, e, r in zip(qs, self.eps, self.crossing_rate)]


def calibrate(
    head: nn.Module, z: Tensor, step: Tensor, t: Tensor, quantiles: list[float] | None, eps: list[float] | None = None
) -> Calibration:
    """Choose ε at the crossing quantiles (or measure a raw ε list) for latents z moved along `step` towards t."""
    scale = z.norm(dim=1).median().clamp_min(1e-6) / step.norm(dim=1).median().clamp_min(1e-12)
    grid = scale * torch.logspace(-3, 1, _GRID_POINTS)
    crossed = _crosses(head, z, step, grid, t)  # (G, N)
    rate = crossed.float().mean(1)
    if eps is None:
        first = torch.where(crossed.any(0), crossed.float().argmax(0), len(grid))  # first grid index that crosses
        per_sample = torch.cat([grid, grid[-1:]])[first]  # never crossing → the grid's end
        chosen: dict[float, float] = {}
        for q in quantiles:
            chosen.setdefault(per_sample.quantile(q).item(), q)  # quantiles that coincide give one ε
        eps, used_q = sorted(chosen), [chosen[e] for e in sorted(chosen)]
    else:
        used_q = None
    measured = _crosses(head, z, step, torch.tensor(eps), t).float().mean(1).tolist()
    return Calibration(list(map(float, eps)), used_q, measured, grid.tolist(), rate.tolist())


@dataclass
class Adversarial:
    """Generated examples: every source sample at every ε, labelled with its source class."""

    x: Tensor  # (N·E, C, H, W) in [0,1], ε-major: rows [k·N, (k+1)·N) use eps[k]
    y: Tensor  # (N·E,) source labels
    target: Tensor  # (N·E,) target classes
    eps: list[float]
    image_flip_rate: list[float]  # per ε: fraction of G(z') the classifier assigns to the target (≤ 1,000 checked)


@torch.no_grad()
def generate(
    generator: nn.Module, classifier: nn.Module, z: Tensor, y: Tensor, t: Tensor, step: Tensor, eps: list[float],
    batch_size: int = 1024, progress: Progress = silent,
) -> Adversarial:
    """x̂ = G(z + ε·step) for every sample and ε, as batched forward passes of G."""
    n = len(z)
    xs, flips = [], []
    total = len(eps) * n
    for k, e in enumerate(eps):
        flipped = checked = 0
        for i in range(0, n, batch_size):
            x = generator(z[i : i + batch_size] + e * step[i : i + batch_size])
            if checked < _FLIP_CHECKS:  # a sample of each ε is enough for the rate; keeps generation at G's speed
                flipped += (classifier(x).argmax(1) == t[i : i + batch_size]).sum().item()
                checked += len(x)
            xs.append(x)
            progress("adversarial", (k * n + i + len(x)) / total, {})
        flips.append(flipped / checked)
    return Adversarial(torch.cat(xs), y.repeat(len(eps)), t.repeat(len(eps)), list(eps), flips)
