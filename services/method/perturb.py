"""Stage 4: boundary-guided examples x̂ = G(z + ε·β⊙d), labelled with the source class (method.md, stage 4).

ε has no fixed unit (it depends on ‖z‖ and the margins of each model), so by default it is
calibrated per model: for each latent, with a random target t ≠ y, find the smallest ε at which
the head predicts t (a geometric grid brackets it, bisection refines it); the ε list is the
given quantiles of those crossing points, and the table records the measured crossing rate at
each chosen ε.

Directions: `boundary` is LADDER (β ⊙ d, d the SVM normal oriented y → t); `random` is a
Gaussian direction rescaled to the norm of each sample's LADDER step (LADDER_Random; the authors
used N(0, I)/10, whose norm grows with √D, so the ablation would change the step size too);
`cav_random` is β ⊙ (d + N(0, I)·cav_noise) (LADDER_cavRandom, the authors' noise scale).
With `random_share` s > 0, LADDER's step blends the two: √(1−s)·β⊙d + √s·r (`blend`), about as
long as β⊙d, since a random r is nearly orthogonal to it in D dimensions.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from services.method import placement
from services.method.boundary import Boundary
from services.method.models import device_of, eval_mode
from services.method.progress import Progress, silent

Direction = Literal["boundary", "random", "cav_random"]
_GRID_POINTS = 64
_BISECTIONS = 12
_FLIP_CHECKS = 1000


def random_targets(y: Tensor, num_classes: int, gen: torch.Generator) -> Tensor:
    """A target class t ≠ y per sample, uniform over the other classes."""
    return (y + torch.randint(1, num_classes, y.shape, generator=gen)) % num_classes


def blend(step: Tensor, random_step: Tensor, share: float) -> Tensor:
    """√(1−share)·step + √share·random_step: the boundary step with a random component (same norms in, so
    about the same norm out)."""
    return (1 - share) ** 0.5 * step + share**0.5 * random_step


def directions(
    boundary: Boundary, z: Tensor, y: Tensor, t: Tensor, kind: Direction, gen: torch.Generator, cav_noise: float = 0.01,
    random_share: float = 0.0,
) -> Tensor:
    """The per-sample latent step whose multiples by ε make the examples; (N, D). `random_share` blends a
    random direction into the `boundary` step (no random numbers are drawn when it is 0)."""
    if kind == "cav_random":
        return boundary.direction(z, y, t, torch.randn(z.shape, generator=gen) * cav_noise)
    step = boundary.direction(z, y, t)
    if kind == "random" or random_share > 0:
        noise = torch.randn(z.shape, generator=gen)
        noise = noise * (step.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True))
        return noise if kind == "random" else blend(step, noise, random_share)
    return step


@torch.no_grad()
def _crosses(head: nn.Module, z: Tensor, step: Tensor, eps: Tensor, t: Tensor, batch: int = 8192) -> Tensor:
    """(E, N) bool: does h(z + ε·step) predict t, for every ε in eps (z, step, t on h's device)."""
    out = torch.empty(len(eps), len(z), dtype=torch.bool, device=z.device)
    for k, e in enumerate(eps.tolist()):
        for i in range(0, len(z), batch):
            out[k, i : i + batch] = head(z[i : i + batch] + e * step[i : i + batch]).argmax(1) == t[i : i + batch]
    return out


@torch.no_grad()
def _first_crossing(head: nn.Module, z: Tensor, step: Tensor, t: Tensor, grid: Tensor, crossed: Tensor) -> Tensor:
    """Per latent, the smallest ε that makes h predict t: bracketed on the grid, then bisected. (N,)"""
    ever = crossed.any(0)
    first = crossed.float().argmax(0)  # first grid index that crosses (0 where none does)
    hi = torch.where(ever, grid[first], grid[-1])
    lo = torch.where(first > 0, grid[(first - 1).clamp_min(0)], torch.zeros_like(hi))
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        hit = head(z + mid[:, None] * step).argmax(1) == t
        hi, lo = torch.where(hit, mid, hi), torch.where(hit, lo, mid)
    return torch.where(ever, hi, grid[-1])  # never crossing → the grid's end


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
    z, step, t = (v.to(device_of(head)) for v in (z, step, t))
    scale = z.norm(dim=1).median().clamp_min(1e-6) / step.norm(dim=1).median().clamp_min(1e-12)
    grid = scale * torch.logspace(-3, 1, _GRID_POINTS, device=z.device)
    crossed = _crosses(head, z, step, grid, t)  # (G, N)
    rate = crossed.float().mean(1)
    if eps is None:
        per_sample = _first_crossing(head, z, step, t, grid, crossed)
        chosen: dict[float, float] = {}
        for q in quantiles:
            chosen.setdefault(per_sample.quantile(q).item(), q)  # quantiles that coincide give one ε
        eps, used_q = sorted(chosen), [chosen[e] for e in sorted(chosen)]
    else:
        used_q = None
    measured = _crosses(head, z, step, torch.tensor(eps), t).float().mean(1).tolist()
    return Calibration(list(map(float, eps)), used_q, measured, grid.cpu().tolist(), rate.cpu().tolist())


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
    """x̂ = G(z + ε·step) for every sample and ε, as batched forward passes of G on its device (the examples
    come back on the CPU)."""
    n = len(z)
    g_dev, f_dev = device_of(generator), device_of(classifier)
    zd, sd, td = placement.inputs(g_dev, z, step, t)
    xs, flips = placement.Gather(g_dev), []
    with eval_mode(generator), eval_mode(classifier):
        for k, e in enumerate(eps):
            flipped, checked = torch.zeros((), dtype=torch.int64, device=f_dev), 0
            for i in range(0, n, batch_size):
                rows = slice(i, i + batch_size)
                x = generator(placement.batch(zd, rows, g_dev) + e * placement.batch(sd, rows, g_dev))
                if checked < _FLIP_CHECKS:  # the first rows of each ε are enough for the rate; keeps generation at G's speed
                    m = min(len(x), _FLIP_CHECKS - checked)  # the same rows whatever the batch size
                    flipped += (classifier(x[:m].to(f_dev)).argmax(1) == placement.batch(td, slice(i, i + m), f_dev)).sum()
                    checked += m
                xs.add(x)
                progress("adversarial", (k * n + i + len(x)) / (len(eps) * n), {})
            flips.append(int(flipped) / checked)
    return Adversarial(xs.result(), y.repeat(len(eps)), t.repeat(len(eps)), list(eps), flips)
