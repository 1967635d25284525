"""CW-L2 (Carlini & Wagner, 2017), batched: every sample has its own constant c, binary search, Adam state,
early abort and best example, and the batch is worked on as one tensor (no loop over samples).

For each value of c the attack minimises, over w in tanh space (x' = (tanh(w) + 1) / 2 keeps x' in [0,1]),

    ‖x' − x‖₂² + c · max(Z_other(x') − Z_t(x'), −κ)        (targeted: t is the target; Z = logits)
    ‖x' − x‖₂² + c · max(Z_y(x') − Z_other(x'), −κ)        (untargeted: y is the true class)

(shifted by κ so that the margin term is ≥ 0 and vanishes exactly at success), with Adam from w = atanh(x), as
in Carlini's reference implementation (nn_robust_attacks/l2_attack.py). Between rounds c follows a per-sample
binary search: ×10 until the attack succeeds once, then bisection between the largest failing and smallest
succeeding c. The smallest-L2 successful example seen at any iteration of any round is kept; a point never
attacked successfully comes back unchanged.

Early abort (Carlini's ABORT_EARLY), per sample: every max_iter // 10 steps a sample whose loss has not fallen
by more than 0.01 % since the last check stops for this round, and the rounds' later steps run on the
remaining samples only.
"""

import torch
from torch import Tensor, nn

from services.method.config import CWConfig

# atanh(±1) is infinite, so 2x − 1 is scaled by this factor first. The references use 1 − 1e-6, which puts
# pixels at exactly 0 or 1 (most of an MNIST digit) at |w| = 7.25: out of reach of 100 Adam steps of 0.05, so
# they could never change. At 1 − 1e-4 they start at |w| = 4.95 (within 5e-5 of their value) and take part:
# measured on a LeNet, 100 digits, default settings, median L2 1.446 → 1.408 untargeted and 2.58 → 2.47
# targeted (1,000-step searches reach 1.404 and 2.43), at the same cost.
TANH_SHRINK = 1 - 1e-4
C_UPPER = 1e10  # "no successful c yet" (Carlini's upper bound)
ABORT_TOLERANCE = 0.9999  # a check passes when the loss fell below 99.99 % of its value at the previous one
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # Adam's (and TensorFlow's) defaults, as in the reference


def cw_l2(model: nn.Module, x: Tensor, y: Tensor, cfg: CWConfig, gen: torch.Generator, target: Tensor | None = None) -> Tensor:
    """Adversarial versions of x (in [0,1]) by CW-L2; untargeted against y when `target` is None, else targeted.

    The model must be in eval mode with its normalisation inside; only the attack variable gets gradients.
    `gen` is unused (the attack is deterministic); it is taken for the attacks' common signature.
    """
    targeted = target is not None
    x = x.detach()
    n = len(x)
    if n == 0:
        return x.clone()
    label = (target if targeted else y).to(x.device).long()
    kappa = float(cfg.confidence)
    b1, b2 = ADAM_BETAS
    every = max(1, cfg.max_iter // 10)

    w0 = torch.atanh((2 * x - 1) * TANH_SHRINK)
    const = torch.full((n,), float(cfg.initial_const), device=x.device, dtype=x.dtype)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, C_UPPER)
    best_l2 = torch.full_like(const, float("inf"))
    best = x.clone()

    for _ in range(cfg.binary_search_steps):
        w = w0.clone()
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        prev = torch.full_like(const, float("inf"))
        succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        rows = torch.arange(n, device=x.device)  # the samples still optimised in this round
        for i in range(cfg.max_iter):
            wi = w[rows].requires_grad_()
            adv = (torch.tanh(wi) + 1) / 2
            logits = model(adv)
            lab = label[rows]
            own = logits.gather(1, lab[:, None])[:, 0]
            other = logits.scatter(1, lab[:, None], float("-inf")).amax(1)
            margin = own - other if targeted else other - own  # success: margin ≥ κ
            l2 = (adv - x[rows]).flatten(1).pow(2).sum(1)
            loss = l2 + const[rows] * (kappa - margin).clamp(min=0)
            (grad,) = torch.autograd.grad(loss.sum(), wi)

            with torch.no_grad():
                pred = logits.argmax(1)
                ok = (margin >= kappa) & ((pred == lab) if targeted else (pred != lab))
                # masked updates at integer rows: no boolean indexing, so no wait on the GPU every step
                succeeded[rows] = succeeded[rows] | ok
                better = ok & (l2 < best_l2[rows])
                best_l2[rows] = torch.where(better, l2, best_l2[rows])
                best[rows] = torch.where(better.view(-1, *[1] * (x.dim() - 1)), adv.detach(), best[rows])

                if i % every == 0:  # the only step that can drop samples, and the only wait on the host
                    keep = loss < prev[rows] * ABORT_TOLERANCE
                    prev[rows] = loss
                    if not keep.all():
                        rows, grad = rows[keep], grad[keep]
                        if len(rows) == 0:
                            break
                t = i + 1
                mi = m[rows] * b1 + (1 - b1) * grad
                vi = v[rows] * b2 + (1 - b2) * grad.square()
                m[rows], v[rows] = mi, vi
                step = cfg.lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
                w[rows] = w[rows] - step * mi / (vi.sqrt() + ADAM_EPS)

        # binary search on c: bisect once a success bracket exists, else grow ×10
        upper = torch.where(succeeded, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded, lower, torch.maximum(lower, const))
        const = torch.where(upper < C_UPPER / 10, (lower + upper) / 2, const * 10)

    return torch.where(best_l2.isfinite().view(-1, *[1] * (x.dim() - 1)), best, x).detach()
