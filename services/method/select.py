"""Checkpoint selection on a validation split: the most robust checkpoint within a clean-accuracy budget.

Each fine-tuned model is scored during its training (`select.checks_per_epoch` times an epoch) on validation data
that is neither trained on nor reported: its clean accuracy on every validation point, and a cheap robustness proxy,
its accuracy on transfer examples crafted once from the surrogate on a fixed, class-balanced subset of them (PGD,
the worse of FGSM and PGD, AutoAttack, or the average rank among the model's checkpoints over all of them and clean
accuracy: `select.objective`). The uploaded model is scored the same way and is always a candidate (epoch 0), so a
job never returns a model worse than the one it got, by its own measure. The chosen checkpoint has the best
objective among those whose clean drop against the uploaded model stays within the budget; ties go to the higher
clean accuracy, then to the earlier checkpoint.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from services.method.attacks import craft
from services.method.config import EvaluateConfig, SelectConfig
from services.method.data import ImageData, balanced_order
from services.method.evaluate import correct_rows, fraction, transfer_config
from services.method.models import net_weights
from services.method.rank import average_rank

# objective -> the transfer attacks it needs
PROXY_ATTACKS = {"transfer_pgd": ("pgd",), "transfer_worst": ("fgsm", "pgd"), "transfer_autoattack": ("autoattack",),
                 "rank": ("fgsm", "pgd", "autoattack")}
SEED_OFFSET = {"pgd": 1, "fgsm": 2, "autoattack": 3}  # an attack's draws whatever the objective


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
    transfer = transfer_config(ev)  # crafted as the report's are, on all n points
    transfer = transfer.model_copy(update={"max_samples": None,
                                           "autoattack": transfer.autoattack.model_copy(update={"max_samples": None})})
    adversarial, point = {}, torch.arange(n)
    for attack in PROXY_ATTACKS[cfg.objective]:
        crafted = craft(attack, surrogate, val.x[:n], val.y[:n], transfer, seed + SEED_OFFSET[attack], num_classes)
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
    # rank: the average rank among a model's checkpoints, which the Selector sets once it has them all
    out["objective"] = None if objective == "rank" else min(out[f"transfer_{a}"] for a in PROXY_ATTACKS[objective])
    return out


@dataclass
class Judge:
    """Scores a model on the proxy (`score`), the same way for every checkpoint of every model of a run."""

    proxy: Proxy
    objective: str
    batch_size: int

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return score(model, self.proxy, self.objective, self.batch_size)


def _columns(s: dict[str, float]) -> dict[str, float]:
    """The columns the rank objective ranks on: validation clean accuracy and every transfer attack's."""
    return {k: v for k, v in s.items() if k == "clean" or k.startswith("transfer_")}


def _dominates(a: dict[str, float], b: dict[str, float], strictly: bool = True) -> bool:
    """Whether `a` is at least as good as `b` on every rank column (and better on one, if `strictly`): then `a`'s rank
    is no worse than `b`'s among any set of checkpoints, so `b` can never be the one chosen."""
    ca, cb = _columns(a), _columns(b)
    return all(ca[k] >= cb[k] for k in ca) and (not strictly or any(ca[k] > cb[k] for k in ca))


@dataclass
class Selector:
    """One model's checkpoints, offered in training order; keeps the best one within the budget (the uploaded model,
    epoch 0, until a checkpoint beats it). With the rank objective, a checkpoint's worth depends on all the others:
    the Selector keeps the weights of every feasible checkpoint that no other one beats on every column, and chooses
    in `finish`, the lowest average rank (ties: higher clean accuracy, then the earlier checkpoint)."""

    uploaded: dict[str, float]
    uploaded_weights: dict[str, Tensor]
    budget_points: float
    judge: Judge | None = None  # for on_check
    curve: list[dict] = field(default_factory=list)
    epoch: float = 0
    weights: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        self.curve.append({"epoch": 0, **self.uploaded, "clean_drop_points": 0.0, "within_budget": True})
        self.best = dict(self.uploaded)
        self.weights = self.uploaded_weights
        self.ranked = self.uploaded["objective"] is None
        self.kept = [(0, self.curve[0], self.uploaded_weights)]  # rank: (epoch, curve entry, weights)

    def drop(self, s: dict[str, float]) -> float:
        return 100 * (self.uploaded["clean"] - s["clean"])

    def offer(self, epoch: float, s: dict[str, float], weights: Callable[[], dict[str, Tensor]]) -> None:
        """The score of the checkpoint at `epoch` (in epochs, 0.25 = a quarter of the first); `weights()` copies its
        weights, called only when it may be chosen."""
        ok = within(self.drop(s), self.budget_points)
        entry = {"epoch": epoch, **s, "clean_drop_points": self.drop(s), "within_budget": ok}
        self.curve.append(entry)
        if not ok:
            return
        if self.ranked:
            if not any(_dominates(k[1], entry, strictly=False) for k in self.kept):  # an equal earlier one wins ties
                self.kept = [k for k in self.kept if not _dominates(entry, k[1])] + [(epoch, entry, weights())]
        elif (s["objective"], s["clean"]) > (self.best["objective"], self.best["clean"]):
            self.best, self.epoch, self.weights = s, epoch, weights()

    def on_check(self, epoch: float, model: nn.Module) -> None:
        """fit's hook: score the model as it is at `epoch` and offer it."""
        self.offer(epoch, self.judge(model), lambda: net_weights(model))

    def finish(self) -> dict[str, Tensor]:
        """The chosen weights, once every checkpoint has been offered. Rank: every feasible checkpoint's average rank
        among them all becomes its objective (an infeasible one's stays None), and the best kept one is chosen."""
        if self.ranked:
            feasible = [c for c in self.curve if c["within_budget"]]
            for c, r in zip(feasible, average_rank({i: _columns(c) for i, c in enumerate(feasible)}).values()):
                c["objective"] = r
            epoch, entry, self.weights = min(self.kept, key=lambda k: (k[1]["objective"], -k[1]["clean"], k[0]))
            self.epoch = epoch
            self.best = {k: v for k, v in entry.items() if k not in ("epoch", "clean_drop_points", "within_budget")}
        return self.weights

    def summary(self) -> dict:
        """For the report: the checkpoint chosen (its position in epochs; 0 = the uploaded weights), why, and the
        validation curve."""
        self.finish()
        what = "average rank" if self.ranked else "objective"
        if self.epoch == 0:
            feasible = [c for c in self.curve[1:] if c["within_budget"]]
            why = ("no checkpoint kept the validation clean drop within the budget" if not feasible else
                   f"no checkpoint within the budget beat the uploaded model's {what}")
            why = f"the uploaded weights: {why}"
        else:
            why = (f"epoch {self.epoch:g}: the best {what} among the checkpoints whose validation clean drop is "
                   f"within {self.budget_points:g} points")
        return {"chosen_epoch": self.epoch, "uploaded_weights": self.epoch == 0, "why": why,
                "validation": self.best, "curve": self.curve}
