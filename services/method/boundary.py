"""Stage 2: the latent decision boundary of every class pair, fitted by an attention SVM.

For a pair (s, t), s < t (method.md, stage 2):
    α = tanh(A z + a),  A = U V (rank r; full D×D when r ≥ D)
    β = D · softmax(α)                      (mean 1: our decision, see method.md)
    score(z) = wᵀ(β ⊙ z) + b,   label −1 for s, +1 for t
    minimise  mean hinge²(1 − y·score) + l2/2 · ‖w‖²
The normal d = w/‖w‖ points from s towards t; the reverse direction flips its sign.

Fitting, all pairs in one batched program (our decisions; the authors ran ~10 epochs of batch-1
SGD): the squared hinge (the smooth L2-SVM) instead of the plain hinge, so that
1. the linear SVM (β = 1) is solved *exactly* by the finite Newton method (Keerthi & DeCoste,
   2005): each step is one batched Cholesky solve on the active set, and it stops when the
   active set no longer changes (≈ 15 steps);
2. the attention map and the SVM are then refined together by L-BFGS from that optimum, for at
   most `attention_steps` iterations (the problem is no longer convex).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from services.method.config import BoundaryConfig
from services.method.errors import InputError
from services.method.progress import Progress, silent

_CHUNK_ELEMENTS = 50_000_000  # z elements per batch of pairs: bounds memory for many classes


@dataclass
class Boundary:
    """The fitted SVMs: one row per unordered pair (s < t)."""

    pairs: Tensor  # (P, 2) int64
    u: Tensor  # (P, D, r)
    v: Tensor  # (P, r, D)
    a: Tensor  # (P, D)
    w: Tensor  # (P, D)
    b: Tensor  # (P,)
    train_accuracy: Tensor  # (P,)
    holdout_accuracy: Tensor  # (P,)
    scale: float  # latents are divided by this (their RMS) before the SVM sees them
    num_classes: int
    fit: dict  # how the fit went: Newton steps, objectives, sample counts

    def pair_index(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Row of each (source, target) pair and the sign that orients its normal source → target."""
        lo, hi = torch.minimum(source, target), torch.maximum(source, target)
        # rows of torch.combinations(arange(C), 2) are ordered lexicographically
        c = self.num_classes
        index = lo * (2 * c - lo - 1) // 2 + (hi - lo - 1)
        sign = torch.where(target > source, 1.0, -1.0)
        return index, sign

    def attention(self, z: Tensor, index: Tensor) -> Tensor:
        """β(z) of each sample under its pair's attention map; z: (N, D) raw latents → (N, D)."""
        beta = torch.empty_like(z)
        for p in index.unique().tolist():
            rows = index == p
            beta[rows] = _beta(self.u[p : p + 1], self.v[p : p + 1], self.a[p : p + 1], z[rows][None] / self.scale)[0]
        return beta

    def direction(self, z: Tensor, source: Tensor, target: Tensor, noise: Tensor | None = None) -> Tensor:
        """β ⊙ (d + noise), d oriented from each sample's source class towards its target class; (N, D)."""
        index, sign = self.pair_index(source, target)
        normal = F.normalize(self.w, dim=1)[index] * sign[:, None]
        return self.attention(z, index) * (normal if noise is None else normal + noise)


def _beta(u: Tensor, v: Tensor, a: Tensor, z: Tensor) -> Tensor:
    """β = D·softmax(tanh(U V z + a)) for z: (P, M, D) → (P, M, D)."""
    alpha = torch.tanh(z @ v.transpose(1, 2) @ u.transpose(1, 2) + a[:, None])
    return alpha.shape[-1] * torch.softmax(alpha, dim=-1)


def _score(u: Tensor, v: Tensor, a: Tensor, w: Tensor, b: Tensor, z: Tensor) -> Tensor:
    """wᵀ(β ⊙ z) + b for z: (P, M, D) → (P, M)."""
    return ((_beta(u, v, a, z) * z) * w[:, None]).sum(-1) + b[:, None]


def _class_samples(y: Tensor, num_classes: int, cfg: BoundaryConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per class, indices of fit samples (C, n_fit) and held-out samples (C, n_hold)."""
    counts = torch.bincount(y, minlength=num_classes)
    least = int(counts.min())
    n_hold = min(cfg.holdout_per_class, max(1, least // 5))
    n_fit = min(cfg.samples_per_class, least - n_hold)
    if n_fit < 2:
        k = int(counts.argmin())
        raise InputError(f"class {k} has {least} training samples; the boundary needs at least 3 per class")
    fit, hold = [], []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fit.append(idx[:n_fit])
        hold.append(idx[n_fit : n_fit + n_hold])
    return torch.stack(fit), torch.stack(hold)


def _pair_data(zc: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Latents (P, 2n, D) of each pair's two classes and labels (P, 2n): −1 for s, +1 for t."""
    n = zc.shape[1]
    z = torch.cat([zc[pairs[:, 0]], zc[pairs[:, 1]]], dim=1)
    labels = torch.cat([-torch.ones(n), torch.ones(n)]).expand(len(pairs), -1)
    return z, labels


def _linear_svm(z: Tensor, labels: Tensor, l2: float, max_steps: int) -> tuple[Tensor, Tensor, int, bool]:
    """Exact L2-SVM by finite Newton on z: (P, M, D); returns w (P, D), b (P,), steps, converged."""
    p, m, d = z.shape
    zt = torch.cat([z, torch.ones(p, m, 1)], 2)  # (P, M, D+1): bias as a feature
    reg = torch.full((d + 1,), l2, dtype=torch.float64)
    reg[-1] = 1e-8  # the bias is (almost) not penalised; keeps the system positive definite
    active = torch.ones(p, m, dtype=torch.bool)
    for step in range(1, max_steps + 1):
        za = zt * active[..., None]
        gram = (2 / m) * (za.transpose(1, 2) @ zt).double() + torch.diag(reg)  # (P, D+1, D+1)
        rhs = (2 / m) * (za.transpose(1, 2) @ labels[..., None]).double()  # (P, D+1, 1)
        wt = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)).squeeze(-1).float()
        now = labels * (zt @ wt[..., None]).squeeze(-1) < 1
        if torch.equal(now, active):
            return wt[:, :-1], wt[:, -1], step, True
        active = now
    return wt[:, :-1], wt[:, -1], max_steps, False


def _objective(params: list[Tensor], z: Tensor, labels: Tensor, l2: float) -> Tensor:
    """Per-pair objective (P,): mean squared hinge + l2/2·‖w‖²."""
    return F.relu(1 - labels * _score(*params, z)).pow(2).mean(1) + l2 / 2 * params[3].pow(2).sum(1)


def _fit_chunk(z: Tensor, labels: Tensor, cfg: BoundaryConfig, gen: torch.Generator, on_step) -> tuple[list[Tensor], dict]:
    p, _, d = z.shape
    r = min(cfg.attention_rank, d)
    w, b, newton_steps, converged = _linear_svm(z, labels, cfg.l2, cfg.newton_steps)
    u = torch.randn(p, d, r, generator=gen) * (0.1 / math.sqrt(r))
    v = torch.randn(p, r, d, generator=gen) * (0.1 / math.sqrt(d))
    params = [t.requires_grad_() for t in (u, v, torch.zeros(p, d), w, b)]
    with torch.no_grad():
        linear_objective = _objective(params, z, labels, cfg.l2).mean().item()
    opt = torch.optim.LBFGS(params, lr=1, max_iter=cfg.attention_steps, history_size=20, line_search_fn="strong_wolfe")
    evals = [0]

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        objective = _objective(params, z, labels, cfg.l2).sum()  # pairs are independent: gradients decouple
        objective.backward()
        evals[0] += 1
        on_step(evals[0], objective.item() / p)
        return objective

    opt.step(closure)
    with torch.no_grad():
        final = _objective(params, z, labels, cfg.l2).mean().item()
    return [t.detach() for t in params], {
        "newton_steps": newton_steps, "newton_converged": converged,
        "linear_objective": linear_objective, "attention_objective": final, "attention_evaluations": evals[0],
    }


@torch.no_grad()
def _accuracy(params: list[Tensor], z: Tensor, labels: Tensor) -> Tensor:
    return ((_score(*params, z) > 0).float() * 2 - 1 == labels).float().mean(1)


def fit_boundary(
    z: Tensor, y: Tensor, num_classes: int, cfg: BoundaryConfig, seed: int, progress: Progress = silent
) -> Boundary:
    """Fit one attention SVM per unordered class pair on latents z: (N, D), labels y: (N,)."""
    gen = torch.Generator().manual_seed(seed)
    scale = z.pow(2).mean().sqrt().clamp_min(1e-12).item()
    zs = z / scale
    fit_idx, hold_idx = _class_samples(y, num_classes, cfg, gen)
    pairs = torch.combinations(torch.arange(num_classes), 2)
    per_pair = 2 * fit_idx.shape[1] * z.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // per_pair)
    results, fits = [], []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        zf, lf = _pair_data(zs[fit_idx], part)
        done = start / len(pairs)

        def on_step(step: int, objective: float, done: float = done, share: float = len(part) / len(pairs)) -> None:
            frac = done + min(step / cfg.attention_steps, 1.0) * share
            progress("boundary", min(frac, 1.0), {"objective": objective})

        params, fit = _fit_chunk(zf, lf, cfg, gen, on_step)
        zh, lh = _pair_data(zs[hold_idx], part)
        results.append((params, _accuracy(params, zf, lf), _accuracy(params, zh, lh)))
        fits.append(fit)
    progress("boundary", 1.0, {"holdout_accuracy": torch.cat([r[2] for r in results]).mean().item()})
    u, v, a, w, b = (torch.cat([r[0][i] for r in results]) for i in range(5))
    return Boundary(
        pairs=pairs, u=u, v=v, a=a, w=w, b=b,
        train_accuracy=torch.cat([r[1] for r in results]),
        holdout_accuracy=torch.cat([r[2] for r in results]),
        scale=scale, num_classes=num_classes,
        fit={
            "newton_steps": max(f["newton_steps"] for f in fits),
            "newton_converged": all(f["newton_converged"] for f in fits),
            "linear_objective": sum(f["linear_objective"] for f in fits) / len(fits),
            "attention_objective": sum(f["attention_objective"] for f in fits) / len(fits),
            "attention_evaluations": max(f["attention_evaluations"] for f in fits),
            "samples_per_class": int(fit_idx.shape[1]),
            "holdout_per_class": int(hold_idx.shape[1]),
        },
    )
