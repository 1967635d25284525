"""Stage 5: adversarial fine-tuning, J = α·CE(f(x), y) + (1 − α)·CE(f(x̂), y) (method.md, stage 5).

One loop serves every model we train: a vanilla model from scratch and the control (α = 1,
clean data only), LADDER (x̂ drawn from the generated set, labelled with the source class) and
the pixel-space baselines (x̂ crafted per batch by an attack, e.g. PGD-AT). Every step mixes clean
and extra examples; they go through the network in one pass, or in one pass each when the network
has BatchNorm (so that its batch statistics are not a blend of both, as in TRADES' reference code).
"""

import math
from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.method.config import LRSchedule
from services.method.models import eval_mode
from services.method.progress import Progress, silent

Craft = Callable[[nn.Module, Tensor, Tensor], Tensor]


def kl_divergence(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """KL(p_clean ‖ p_adv) per batch (TRADES' robust term, summed over classes, mean over the batch)."""
    return F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    alpha: float = 1.0,
    extra: tuple[Tensor, Tensor] | None = None,
    craft: Craft | None = None,
    trades: tuple[float, Craft] | None = None,
    schedule: LRSchedule = "constant",
    stage: str = "finetune",
    progress: Progress = silent,
) -> list[float]:
    """Train `model` in place with SGD for `epochs` passes over (x, y); returns the mean loss per epoch.

    The loss is α·L(x, y) + (1 − α)·CE(f(x̂), y), x̂ from `extra` (a generated set) or `craft` (made per
    batch). L is CE, or with `trades = (β, craft)` TRADES' CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' crafted
    per batch. α = 0 drops the clean term (PGD-AT as in Madry et al.). `schedule`: the learning rate stays at
    `lr` ("constant", the paper's) or follows a cosine from `lr` towards 0 over all steps ("cosine": step k of K takes lr·½(1 + cos(πk/K))).
    """
    if alpha < 1 and (extra is None) == (craft is None):
        raise ValueError("alpha < 1 needs exactly one source of extra examples: `extra` or `craft`")
    if schedule not in get_args(LRSchedule):
        raise ValueError(f"schedule must be one of {get_args(LRSchedule)}, not {schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    device = next(model.parameters()).device
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps = math.ceil(len(x) / batch_size)
    extra_order, extra_at = None, 0
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        model.train()
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            parts = [xb] if alpha > 0 else []
            if alpha > 0 and trades is not None:
                parts.append(trades[1](model, xb, yb))
            if alpha < 1:
                if craft is not None:
                    xa, ya = craft(model, xb, yb), yb
                else:
                    if extra_order is None or extra_at + len(idx) > len(extra_order):
                        extra_order, extra_at = torch.randperm(len(extra[0]), generator=gen), 0
                    j = extra_order[extra_at : extra_at + len(idx)]
                    extra_at += len(idx)
                    xa, ya = extra[0][j].to(device), extra[1][j].to(device)
                parts.append(xa)
            if batchnorm:  # BatchNorm statistics per kind of input, as TRADES' reference code does
                logits = [model(p) for p in parts]
            else:  # one pass: the same numbers, faster
                logits = model(torch.cat(parts)).split([len(p) for p in parts])
            loss = logits[0].new_zeros(())
            if alpha > 0:
                clean = F.cross_entropy(logits[0], yb)
                if trades is not None:
                    clean = clean + trades[0] * kl_divergence(logits[0], logits[1])
                loss = loss + alpha * clean
            if alpha < 1:
                loss = loss + (1 - alpha) * F.cross_entropy(logits[-1], ya)
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / (epochs * steps)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            progress(stage, (epoch + (i + 1) / steps) / epochs, {"loss": total / (i + 1)})
        history.append(total / steps)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Fraction of (x, y) the model classifies correctly, in eval mode (the mode is restored)."""
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)
