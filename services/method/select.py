"""Checkpoint selection on a validation split: the most robust checkpoint within a clean-accuracy budget.

Each fine-tuned model is scored during its training (`select.checks_per_epoch` times an epoch) on validation data that is neither trained on nor reported:
its clean accuracy on every validation point, and a cheap robustness proxy, its accuracy on transfer examples
crafted once from the surrogate on a fixed, class-balanced subset of them. The uploaded model is scored the
same way and is always a candidate (epoch 0), so a job never returns a model worse than the one it got, by its
own measure. The chosen checkpoint maximises the objective among those whose clean drop against the uploaded
model stays within the budget; ties go to the higher clean accuracy, then to the earlier epoch.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from services.datasets import ImageData, balanced_order
from services.method.attacks import craft
from services.method.config import EvaluateConfig, SelectConfig
from services.method.evaluate import correct_rows, fraction, transfer_config
from services.method.models import net_weights

# objective -> the transfer attacks it needs
PROXY_ATTACKS = {"transfer_pgd": ("pgd",), "transfer_worst": ("fgsm", "pgd")}


def within(drop_points: float, budget_points: float) -> bool:
    """Whether a clean drop keeps to the budget; one equal to it does, whatever the float rounding."""
    return drop_points <= budget_points + 1e-9


@dataclass
class Proxy:
    """What a checkpoint is judged on: every validation point clean, and per attack the transfer examples crafted
    from the surrogate on the first `len(point)` points of `x`."""

    x: Tensor
    y: Tensor
    adversarial: dict[str, Tensor]
    point: Tensor


def make_proxy(surrogate: nn.Module, val: ImageData, cfg: SelectConfig, ev: EvaluateConfig, seed: int,
               num_classes: int) -> Proxy:
    """The validation points (in a class-balanced order) and their transfer examples, crafted once."""
    val = val.subset(balanced_order(val.y, torch.Generator().manual_seed(seed)))
    n = min(cfg.robust_points, len(val))
    transfer = transfer_config(ev).model_copy(update={"max_samples": None})  # crafted as the report's are
    adversarial, point = {}, torch.arange(n)
    for k, attack in enumerate(PROXY_ATTACKS[cfg.objective]):
        crafted = craft(attack, surrogate, val.x[:n], val.y[:n], transfer, seed + 1 + k, num_classes)
        adversarial[attack] = crafted.x
    return Proxy(val.x, val.y, adversarial, point)


def score(model: nn.Module, proxy: Proxy, objective: str, batch_size: int) -> dict[str, float]:
    """The model's validation clean accuracy, its accuracy under each proxy attack (a point it already
    misclassifies is not robust) and the objective."""
    clean = correct_rows(model, proxy.x, proxy.y, batch_size)
    out = {"clean": fraction(clean)}
    for attack, adv in proxy.adversarial.items():
        out[f"transfer_{attack}"] = fraction(correct_rows(model, adv, proxy.y[proxy.point], batch_size)
                                             & clean[proxy.point])
    out["objective"] = min(out[f"transfer_{a}"] for a in PROXY_ATTACKS[objective])
    return out


@dataclass
class Judge:
    """Scores a model on the proxy (`score`), the same way for every checkpoint of every model of a run."""

    proxy: Proxy
    objective: str
    batch_size: int

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return score(model, self.proxy, self.objective, self.batch_size)


@dataclass
class Selector:
    """One model's checkpoints, offered in training order; keeps the best one within the budget (the uploaded model,
    epoch 0, until a checkpoint beats it)."""

    uploaded: dict[str, float]
    uploaded_weights: dict[str, Tensor]
    budget_points: float
    judge: Judge | None = None  # for on_check
    curve: list[dict] = field(default_factory=list)
    epoch: float = 0
    weights: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        self.curve.append({"epoch": 0, **self.uploaded, "clean_drop_points": 0.0, "within_budget": True})
        self.best = self.uploaded
        self.weights = self.uploaded_weights

    def drop(self, s: dict[str, float]) -> float:
        return 100 * (self.uploaded["clean"] - s["clean"])

    def offer(self, epoch: float, s: dict[str, float], weights: Callable[[], dict[str, Tensor]]) -> None:
        """The score of the checkpoint at `epoch` (in epochs, 0.25 = a quarter of the first); `weights()` copies its
        weights, called only when it is the best so far."""
        ok = within(self.drop(s), self.budget_points)
        self.curve.append({"epoch": epoch, **s, "clean_drop_points": self.drop(s), "within_budget": ok})
        if ok and (s["objective"], s["clean"]) > (self.best["objective"], self.best["clean"]):
            self.best, self.epoch, self.weights = s, epoch, weights()

    def on_check(self, epoch: float, model: nn.Module) -> None:
        """fit's hook: score the model as it is at `epoch` and offer it."""
        self.offer(epoch, self.judge(model), lambda: net_weights(model))

    def summary(self) -> dict:
        """For the report: the checkpoint chosen (its position in epochs; 0 = the uploaded weights), why, and the
        validation curve."""
        if self.epoch == 0:
            feasible = [c for c in self.curve[1:] if c["within_budget"]]
            why = ("no checkpoint kept the validation clean drop within the budget" if not feasible else
                   "no checkpoint within the budget beat the uploaded model's objective")
            why = f"the uploaded weights: {why}"
        else:
            why = (f"epoch {self.epoch:g}: the best objective among the checkpoints whose validation clean drop is "
                   f"within {self.budget_points:g} points")
        return {"chosen_epoch": self.epoch, "uploaded_weights": self.epoch == 0, "why": why,
                "validation": self.best, "curve": self.curve}
