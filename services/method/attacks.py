"""Pixel-space L∞ attacks (FGSM, PGD) in [0,1] on a model with its normalisation inside.

Written here rather than taken from ART because they run batched on the model's own device,
take a seeded generator for PGD's random start, never touch parameter gradients
(torch.autograd.grad w.r.t. the input only), and always attack in eval mode, restoring the
model's mode afterwards. New attacks register in ATTACKS with the same signature.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.method.config import AttackConfig
from services.method.models import eval_mode

Attack = Callable[[nn.Module, Tensor, Tensor, AttackConfig, torch.Generator], Tensor]


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def _in_eval(attack: Attack) -> Attack:
    def run(model: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig, gen: torch.Generator) -> Tensor:
        with eval_mode(model):
            return attack(model, x, y, cfg, gen).detach()

    run.__doc__ = attack.__doc__
    return run


@_in_eval
def fgsm(model: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig, gen: torch.Generator) -> Tensor:
    """FGSM (Goodfellow et al., 2015): x + ε·sign(∇ₓ CE), clipped to [0,1]."""
    return (x + cfg.eps * _input_grad(model, x, y).sign()).clamp(0, 1)


@_in_eval
def pgd(model: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig, gen: torch.Generator) -> Tensor:
    """PGD-L∞ (Madry et al., 2018): random start in the ε-ball, `pgd_steps` signed-gradient steps, projection."""
    step = cfg.pgd_step_size or 2.5 * cfg.eps / cfg.pgd_steps
    adv = x.clone()
    if cfg.pgd_random_start:
        noise = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
        adv = (x + cfg.eps * noise).clamp(0, 1)
    for _ in range(cfg.pgd_steps):
        adv = adv + step * _input_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - cfg.eps), x + cfg.eps).clamp(0, 1)
    return adv


ATTACKS: dict[str, Attack] = {"fgsm": fgsm, "pgd": pgd}


def craft(attack: str, model: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig, seed: int, batch_size: int = 500) -> Tensor:
    """Adversarial versions of x (on CPU) by the named attack, batched on the model's device."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = [ATTACKS[attack](model, x[i : i + batch_size].to(device), y[i : i + batch_size].to(device), cfg, gen).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)
