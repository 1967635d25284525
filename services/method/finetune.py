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

from services.method import numerics, placement
from services.method.config import LRSchedule
from services.method.models import eval_mode
from services.method.progress import Every, Progress, silent

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
    precision: str = "fp32",
    on_check: Callable[[float, nn.Module], None] | None = None,
    checks_per_epoch: int = 1,
) -> list[float]:
    """Train `model` in place with SGD for `epochs` passes over (x, y); returns the mean loss per epoch.

    The loss is α·L(x, y) + (1 − α)·CE(f(x̂), y), x̂ from `extra` (a generated set) or `craft` (made per
    batch). L is CE, or with `trades = (β, craft)` TRADES' CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' crafted
    per batch. α = 0 drops the clean term (PGD-AT as in Madry et al.). `on_check(position, model)` is called
    `checks_per_epoch` times an epoch, evenly spaced in steps, the last at the epoch's end, with the model in eval
    mode and its position in epochs (1, 2, … with one check an epoch; 0.25, 0.5, … with four): checkpoint selection,
    select.py. It draws no random number, so the training is the same with or without it. `precision` (numerics.training) applies to
    the step's forward and backward, not to the crafting of x̂ or x'. `schedule`: the learning rate stays at
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
    checks = {math.ceil(steps * j / checks_per_epoch) - 1: j for j in range(1, checks_per_epoch + 1)}  # step -> j
    x, y = placement.inputs(device, x, y)
    if extra is not None:
        extra = placement.inputs(device, *extra)
    extra_order, extra_at = None, 0
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)  # the CPU generator's draws, on any device
        total = torch.zeros((), dtype=torch.float64, device=device)  # summed where the loss is: no wait per step
        report = Every()
        model.train()
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = placement.batch(x, idx, device), placement.batch(y, idx, device)
            parts = [xb] if alpha > 0 else []
            if alpha > 0 and trades is not None:
                parts.append(trades[1](model, xb, yb))
            if alpha < 1:
                if craft is not None:
                    xa, ya = craft(model, xb, yb), yb
                else:
                    if extra_order is None or extra_at + len(idx) > len(extra_order):
                        extra_order, extra_at = torch.randperm(len(extra[0]), generator=gen).to(extra[0].device), 0
                    j = extra_order[extra_at : extra_at + len(idx)]
                    extra_at += len(idx)
                    xa, ya = placement.batch(extra[0], j, device), placement.batch(extra[1], j, device)
                parts.append(xa)
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / (epochs * steps)))
            with numerics.training(precision, device):
                if batchnorm:  # BatchNorm statistics per kind of input, as TRADES' reference code does
                    logits = [model(p) for p in parts]
                else:  # one pass: the same numbers, faster
                    logits = model(torch.cat(parts)).split([len(p) for p in parts])
                loss = logits[0].new_zeros((), dtype=torch.float32)
                if alpha > 0:
                    clean = F.cross_entropy(logits[0], yb)
                    if trades is not None:
                        clean = clean + trades[0] * kl_divergence(logits[0], logits[1])
                    loss = loss + alpha * clean
                if alpha < 1:
                    loss = loss + (1 - alpha) * F.cross_entropy(logits[-1], ya)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            total += loss.detach()
            if i == steps - 1 or report():
                progress(stage, (epoch + (i + 1) / steps) / epochs, {"loss": total.item() / (i + 1)})
            if on_check is not None and i in checks:
                model.eval()
                j = checks[i]
                on_check(epoch + 1 if j == checks_per_epoch else round(epoch + j / checks_per_epoch, 4), model)
                model.train()
        history.append(total.item() / steps)
    model.eval()  # also after zero epochs
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Fraction of (x, y) the model classifies correctly, in eval mode (the mode is restored)."""
    device = next(model.parameters()).device
    x, y = placement.inputs(device, x, y)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            rows = slice(i, i + batch_size)
            correct += (model(placement.batch(x, rows, device)).argmax(1) == placement.batch(y, rows, device)).sum()
    return int(correct) / max(len(x), 1)
