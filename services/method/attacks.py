"""Pixel-space attacks in [0,1] on a model with its normalisation inside (method.md, stage 6).

FGSM, PGD and CW-L2 are written here rather than taken from ART: they run batched on the model's
own device, take a seeded generator, never touch parameter gradients (torch.autograd.grad with
respect to the input only), and are checked against ART's versions in tests/test_attacks.py.
JSMA comes from ART (SaliencyMapMethod) and AutoAttack from its authors' package (pyautoattack),
both on capped subsets. Every attack runs the model in eval mode and restores its mode afterwards.

`craft` is the one entry point: it picks the points an attack's cap allows (a prefix of the
evaluated points, so capped subsets are nested), expands targeted attacks to their targets, and
returns the adversarial images with the source point of every row.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.method import batches, placement
from services.method.config import AttackConfig, AutoAttackConfig, BaselinesConfig, EvaluateConfig, JSMAConfig
from services.method.cw import cw_l2
from services.method.models import eval_mode
from services.method.perturb import random_targets

Attack = Callable[[nn.Module, Tensor, Tensor, Tensor | None, Any, torch.Generator], Tensor]


def pgd_step(eps: float, steps: int) -> float:
    """PGD's default step: 2.5·ε / steps (Madry et al.), so that `steps` steps can cross the ε-ball and back."""
    return 2.5 * eps / steps


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def _in_eval(attack: Attack) -> Attack:
    """Run the attack in eval mode and leave the parameters' .grad as they were (ART and AutoAttack call backward)."""
    def run(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: Any, gen: torch.Generator) -> Tensor:
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        try:
            with eval_mode(model):
                return attack(model, x, y, target, cfg, gen).detach()
        finally:
            for p, g in grads:
                p.grad = g

    run.__name__, run.__doc__ = attack.__name__, attack.__doc__
    return run


@_in_eval
def fgsm(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: AttackConfig, gen: torch.Generator) -> Tensor:
    """FGSM (Goodfellow et al., 2015): x + ε·sign(∇ₓ CE), clipped to [0,1]."""
    return (x + cfg.eps * _input_grad(model, x, y).sign()).clamp(0, 1)


def pgd_steps(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float | None,
              random_start: bool, gen: torch.Generator | None, loss: Callable[[Tensor], Tensor] | None = None,
              start: Tensor | None = None, early_stop: bool = False) -> Tensor:
    """PGD-L∞ ascent on `loss(logits)` (default: CE against y) from x (or `start`), projected on the ε-ball and [0,1].

    With `early_stop`, a point leaves the loop at the first iterate the model misclassifies, and that
    iterate is returned: an evaluation needs one misclassified example per point, and the logits that
    tell are the ones the step computes anyway. Without it, every point takes every step (the
    textbook attack, and what adversarial training wants: the loss maximised, not just a flip).
    """
    step = step_size or pgd_step(eps, steps)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    adv = x.clone() if start is None else torch.max(torch.min(start, hi), lo)
    if random_start:
        noise = placement.to_device(torch.rand(x.shape, generator=gen), x.device) * 2 - 1  # CPU draws: any device
        adv = torch.max(torch.min(x + eps * noise, hi), lo)
    if not early_stop:
        for _ in range(steps):
            a = adv.detach().requires_grad_()
            logits = model(a)
            value = F.cross_entropy(logits, y, reduction="sum") if loss is None else loss(logits)
            (grad,) = torch.autograd.grad(value, a)
            adv = torch.max(torch.min(a.detach() + step * grad.sign(), hi), lo)
        return adv.detach()
    # finished points leave the batch every `every` steps (a wait on the host, so not every step on a GPU); until
    # then they ride along, frozen at the iterate that did it: the same result at any `every`
    every = 1 if x.device.type == "cpu" else 8
    active = torch.arange(len(x), device=x.device)
    stopped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for k in range(steps):
        a = adv[active].requires_grad_()
        logits = model(a)
        value = F.cross_entropy(logits, y[active], reduction="sum") if loss is None else loss(logits)
        (grad,) = torch.autograd.grad(value, a)
        going = (logits.detach().argmax(1) == y[active]) & ~stopped[active]  # misclassified: keep this iterate
        stopped[active] = ~going
        moved = torch.max(torch.min(a.detach() + step * grad.sign(), hi[active]), lo[active])
        adv[active] = torch.where(going.view(-1, *[1] * (x.dim() - 1)), moved, a.detach())
        if k % every == every - 1:
            active = active[~stopped[active]]
            if len(active) == 0:
                break
    return adv.detach()


@_in_eval
def pgd(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: AttackConfig, gen: torch.Generator) -> Tensor:
    """PGD-L∞ (Madry et al., 2018): random start in the ε-ball, `pgd_steps` signed-gradient steps, projection."""
    return pgd_steps(model, x, y, cfg.eps, cfg.pgd_steps, cfg.pgd_step_size, cfg.pgd_random_start, gen,
                     early_stop=cfg.pgd_early_stop)


def trades_adversary(model: nn.Module, x: Tensor, y: Tensor, cfg: BaselinesConfig) -> Tensor:
    """TRADES' inner maximisation (Zhang et al., 2019): PGD on KL(f(x) ‖ f(x')) from x + 0.001·N(0, I), in eval mode."""
    with eval_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), 1)
        start = x + 0.001 * torch.randn_like(x)
        return pgd_steps(model, x, y, cfg.eps, cfg.pgd_steps, cfg.pgd_step_size, False, None,
                         loss=lambda logits: F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="sum"), start=start)


def training_attack(name: str, cfg: BaselinesConfig) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """The per-batch adversary of a pixel-space defence: fgsm_at → FGSM, pgd_at → PGD, trades → TRADES' KL-PGD."""
    if name == "trades":
        return lambda model, x, y: trades_adversary(model, x, y, cfg)
    settings = AttackConfig(eps=cfg.eps, pgd_steps=cfg.pgd_steps, pgd_step_size=cfg.pgd_step_size, pgd_early_stop=False)
    fn = {"fgsm_at": fgsm, "pgd_at": pgd}[name]
    return lambda model, x, y: fn(model, x, y, None, settings, None)


@_in_eval
def cw(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: Any, gen: torch.Generator) -> Tensor:
    """CW-L2 (Carlini & Wagner, 2017) with a binary search over c; targeted when given targets."""
    return cw_l2(model, x, y, cfg, gen, target)


def art_classifier(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """ART's wrapper of a [0,1]-input PyTorch classifier (the model must already be in eval mode)."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=num_classes, clip_values=(0.0, 1.0), device_type=_device_type(model))


def _device_type(model: nn.Module) -> str:
    return "gpu" if next(model.parameters()).device.type == "cuda" else "cpu"


@_in_eval
def jsma(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: JSMAConfig, gen: torch.Generator) -> Tensor:
    """JSMA (Papernot et al., 2016) through ART's SaliencyMapMethod, targeted."""
    from art.attacks.evasion import SaliencyMapMethod

    num_classes = int(model(x[:1]).shape[1])
    attack = SaliencyMapMethod(art_classifier(model, x.shape[1:], num_classes), theta=cfg.theta, gamma=cfg.gamma,
                               batch_size=len(x), verbose=False)
    out = x.clone()
    # one call per target class: ART backpropagates once per distinct target in a batch, for every row of it
    for t in target.unique().tolist():
        rows = (target == t).nonzero().squeeze(1)
        onehot = F.one_hot(target[rows], num_classes).cpu().numpy()
        out[rows] = torch.from_numpy(attack.generate(x[rows].cpu().numpy(), y=onehot)).to(x.device, x.dtype)
    return out


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def autoattack_attacks(cfg: AutoAttackConfig, num_classes: int) -> list[str]:
    """The attacks AutoAttack runs for this version and class count (the targeted ones need ≥ 4 classes)."""
    from pyautoattack import AutoAttack

    return _runnable(AutoAttack(nn.Identity(), eps=0.3, version=cfg.version).attacks_to_run, num_classes)


def _runnable(attacks: list[str], num_classes: int) -> list[str]:
    return [a for a in attacks if num_classes >= 4 or a not in ("apgd-t", "fab-t")]


def autoattack_info(cfg: AutoAttackConfig, num_classes: int, warnings: list[str]) -> dict:
    """What AutoAttack ran, for the report: the package version, the exact attack list, its warnings."""
    import pyautoattack

    return {"package": "pyautoattack", "version": pyautoattack.__version__, "mode": cfg.version,
            "attacks": autoattack_attacks(cfg, num_classes), "warnings": warnings}


@_in_eval
def autoattack(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, cfg: "AutoAttackRun", gen: torch.Generator) -> Tensor:
    """AutoAttack through pyautoattack at the L∞ attack ε; its warnings are kept in cfg.warnings."""
    from pyautoattack import AutoAttack

    num_classes = int(model(x[:1]).shape[1])
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    aa = AutoAttack(model, eps=cfg.eps, norm="Linf", seed=seed, version=cfg.config.version, device=x.device)
    wanted = _runnable(aa.attacks_to_run, num_classes)  # the list autoattack_attacks reports, without a second instance
    if wanted != aa.attacks_to_run:  # too few classes for the targeted attacks: the standard list minus those
        aa.attacks_to_run = wanted
        cfg.warnings.append(f"{num_classes} classes: AutoAttack runs {', '.join(wanted)} only")
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    handler = _Collect()
    log = logging.getLogger("auto-attack")
    log.addHandler(handler)
    try:
        adv, _ = aa.run_standard_evaluation(x, y, batch_size=cfg.config.batch_size)
    finally:
        log.removeHandler(handler)
    cfg.warnings.extend(m for m in handler.messages if m not in cfg.warnings)
    return adv.detach()


@dataclass
class AutoAttackRun:
    """AutoAttack's settings for one run, and the warnings its checks raised."""

    config: AutoAttackConfig
    eps: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PixelAttack:
    """An attack on pixels: its function, whether it is targeted, and whether `craft` batches it."""

    fn: Attack
    targeted: bool
    batched: bool = True


ATTACKS: dict[str, PixelAttack] = {
    "fgsm": PixelAttack(fgsm, targeted=False),
    "pgd": PixelAttack(pgd, targeted=False),
    "cw": PixelAttack(cw, targeted=True),  # untargeted when cfg.cw.targeted is False
    "jsma": PixelAttack(jsma, targeted=True),
    "autoattack": PixelAttack(autoattack, targeted=False, batched=False),
}


def attack_settings(name: str, cfg: EvaluateConfig) -> Any:
    """The config section an attack reads."""
    return {"fgsm": cfg.attack, "pgd": cfg.attack, "cw": cfg.cw, "jsma": cfg.jsma, "autoattack": cfg.autoattack}[name]


def attack_cap(name: str, cfg: EvaluateConfig) -> int | None:
    """How many of the evaluated points the attack runs on (None = all)."""
    return getattr(attack_settings(name, cfg), "max_samples", None)


def attack_params(name: str, cfg: EvaluateConfig) -> dict:
    """The settings that decide an attack's numbers, for the report."""
    params = attack_settings(name, cfg).model_dump(mode="json")
    if name == "fgsm":
        params = {"eps": params["eps"], "norm": "Linf"}
    elif name == "pgd":
        params = {**params, "norm": "Linf", "pgd_step_size": cfg.attack.pgd_step_size or pgd_step(cfg.attack.eps, cfg.attack.pgd_steps)}
    elif name == "autoattack":
        params = {**params, "eps": cfg.attack.eps, "norm": "Linf"}
    return params


def expand_targets(y: Tensor, num_classes: int, mode: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(rows, targets): one random target t ≠ y per point, or every t ≠ y (each point repeated C − 1 times)."""
    if mode == "random":
        return torch.arange(len(y)), random_targets(y, num_classes, gen)
    rows = torch.arange(len(y)).repeat_interleave(num_classes - 1)
    shift = torch.arange(1, num_classes).repeat(len(y))
    return rows, (y[rows] + shift) % num_classes


@dataclass
class Crafted:
    """Adversarial images, the evaluated point each row was crafted from, and its target (targeted attacks)."""

    x: Tensor
    point: Tensor
    target: Tensor | None
    params: dict


def craft(name: str, model: nn.Module, x: Tensor, y: Tensor, cfg: EvaluateConfig, seed: int, num_classes: int,
          warnings: list[str] | None = None) -> Crafted:
    """Adversarial versions (on CPU) of the first `max_samples` points of x by the named attack."""
    attack = ATTACKS[name]
    device = next(model.parameters()).device
    cfg = batches.for_evaluation(cfg, device)
    gen = torch.Generator().manual_seed(seed)
    cap = attack_cap(name, cfg)
    n = len(x) if cap is None else min(cap, len(x))
    settings = attack_settings(name, cfg)
    params = attack_params(name, cfg)
    targeted = attack.targeted and (name != "cw" or cfg.cw.targeted)
    if targeted:
        rows, target = expand_targets(y[:n], num_classes, settings.targets, gen)
    else:
        rows, target = torch.arange(n), None
    if name == "autoattack":
        settings = AutoAttackRun(cfg.autoattack, cfg.attack.eps, warnings if warnings is not None else [])
    xs, ys = placement.inputs(device, x[rows], y[rows])
    step = cfg.batch_size if attack.batched else len(xs)
    out = placement.Gather(device)
    for i in range(0, len(xs), step):
        part = slice(i, i + step)
        t = None if target is None else placement.batch(target, part, device)
        out.add(attack.fn(model, placement.batch(xs, part, device), placement.batch(ys, part, device), t, settings, gen))
    return Crafted(out.result(xs[:0].cpu()), rows, target, params)
