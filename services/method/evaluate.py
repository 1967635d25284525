"""Stage 6: clean and robust accuracy of every model, white-box and black-box transfer (method.md, stage 6).

White-box: each attack is crafted on the evaluated model itself. Black-box: crafted once on a
surrogate of another architecture trained on the same data, then fed to every model (the
paper's main setting). The LADDER attack (paper Table 8) is crafted from the vanilla model's
generator and boundary, and is reported in the white-box setting.

Robust accuracy is over all evaluated points (RobustBench convention): a point the model already
misclassifies counts as a failure. Attacks with a cap run on a prefix of the evaluated points (the
points are dealt out class by class, so every prefix is class-balanced, and capped subsets are nested). The
per-point worst case counts a point as robust only if it is classified correctly clean and under
every attack of the setting, over the prefix that every attack covered.
"""

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from services.method import batches, placement
from services.method.attacks import attack_params, craft
from services.method.config import TRAINED_ON, EvaluateConfig
from services.method.models import device_of, eval_mode
from services.method.progress import Progress, silent


@dataclass
class Examples:
    """Adversarial images crafted elsewhere (the LADDER attack): rows, the point each came from, labels."""

    x: Tensor
    point: Tensor
    params: dict
    group: Tensor | None = None  # e.g. the ε index of every row, for a per-group breakdown
    group_values: list[float] | None = None


@torch.no_grad()
def correct_rows(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
    """Per row of x: does the model predict y (eval mode, restored)."""
    device = next(model.parameters()).device
    x, y = placement.inputs(device, x, y)
    out = placement.Gather(device)
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            rows = slice(i, i + batch_size)
            out.add(model(placement.batch(x, rows, device)).argmax(1) == placement.batch(y, rows, device))
    return out.result(torch.zeros(0, dtype=torch.bool))


def per_point(correct: Tensor, point: Tensor, n: int) -> Tensor:
    """A point is robust when every row crafted from it is classified correctly. (n,) bool"""
    out = torch.ones(n, dtype=torch.int8)
    return out.scatter_reduce(0, point, correct.to(torch.int8), "amin").bool()


def fraction(correct: Tensor) -> float | None:
    """The share of True in a bool tensor, exact (count / n in float64, not a float32 mean); None when empty."""
    return int(correct.sum()) / len(correct) if len(correct) else None


def _entry(correct: Tensor, params: dict, examples: Examples | None = None) -> dict:
    entry = {"accuracy": fraction(correct), "n": len(correct), "params": params}
    if examples is not None and examples.group is not None:
        entry["by_group"] = {"values": examples.group_values,
                             "accuracy": [fraction(correct[examples.group == g])
                                          for g in range(len(examples.group_values))]}
    return entry


def transfer_config(cfg: EvaluateConfig) -> EvaluateConfig:
    """The settings transfer examples are crafted with: every PGD step, since an example that only just fools the
    surrogate transfers poorly."""
    return cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"pgd_early_stop": False})})


def evaluate(
    models: dict[str, nn.Module], surrogate: nn.Module | None, x: Tensor, y: Tensor, cfg: EvaluateConfig, seed: int,
    num_classes: int, ladder: Examples | None = None, progress: Progress = silent,
) -> dict:
    """{"models": per model clean_accuracy, attacks.<setting>.<attack>, worst_case.<setting>; "evaluation": what ran}."""
    cfg = batches.for_evaluation(cfg, device_of(next(iter(models.values()))))
    settings = [s for s in cfg.settings if s == "whitebox" or surrogate is not None]
    runs = {s: [a for a in cfg.runs(s) if a != "ladder" or ladder is not None] for s in settings}
    ladder = ladder if "ladder" in runs.get("whitebox", []) else None
    seeds = {a: seed + k for k, a in enumerate(a for a in cfg.attacks if a != "ladder")}
    pixel = [a for a in seeds if any(a in r for r in runs.values())]
    clean = {name: correct_rows(m, x, y, cfg.batch_size) for name, m in models.items()}
    out = {name: {"clean_accuracy": fraction(clean[name]), "trained_on": TRAINED_ON.get(name),
                  "attacks": {s: {} for s in settings}, "worst_case": {}} for name, m in models.items()}
    robust: dict[str, dict[str, dict[str, Tensor]]] = {s: {name: {} for name in models} for s in settings}
    warnings: list[str] = []
    seconds: dict[str, float] = {}
    jobs = len(runs.get("blackbox", [])) + len(models) * len(runs.get("whitebox", [])) or 1
    done = 0

    def record(setting: str, name: str, attack: str, correct: Tensor, point: Tensor, params: dict,
               examples: Examples | None = None) -> None:
        correct = correct & clean[name][point]  # a point the model already misclassifies is not robust
        out[name]["attacks"][setting][attack] = _entry(correct, params, examples)
        robust[setting][name][attack] = per_point(correct, point, int(point.max()) + 1 if len(point) else 0)

    transfer_cfg = transfer_config(cfg)
    for attack in pixel:
        started = time.perf_counter()
        if attack in runs.get("blackbox", []):
            crafted = craft(attack, surrogate, x, y, transfer_cfg, seeds[attack], num_classes, warnings)
            for name, m in models.items():
                record("blackbox", name, attack, correct_rows(m, crafted.x, y[crafted.point], cfg.batch_size),
                       crafted.point, {**crafted.params, "crafted_on": "surrogate"})
            done += 1
            progress("evaluate", done / jobs, {})
        if attack in runs.get("whitebox", []):
            for name, m in models.items():
                crafted = craft(attack, m, x, y, cfg, seeds[attack], num_classes, warnings)
                record("whitebox", name, attack, correct_rows(m, crafted.x, y[crafted.point], cfg.batch_size),
                       crafted.point, crafted.params)
                done += 1
                progress("evaluate", done / jobs, {f"{name}_{attack}": out[name]["attacks"]["whitebox"][attack]["accuracy"]})
        seconds[attack] = time.perf_counter() - started
    if ladder is not None:
        started = time.perf_counter()
        for name, m in models.items():
            record("whitebox", name, "ladder", correct_rows(m, ladder.x, y[ladder.point], cfg.batch_size),
                   ladder.point, ladder.params, ladder)
            done += 1
            progress("evaluate", done / jobs, {})
        seconds["ladder"] = time.perf_counter() - started
    for setting in settings:
        for name in models:
            out[name]["worst_case"][setting] = worst_case(clean[name], robust[setting][name])
    return {
        "models": out,
        "evaluation": {
            "n": len(x), "settings": settings, "attacks": [*pixel, *(["ladder"] if ladder is not None else [])],
            "runs": runs,
            "params": {**{a: attack_params(a, cfg) for a in pixel}, **({"ladder": ladder.params} if ladder else {})},
            "seconds": seconds, "warnings": warnings,
        },
    }


def worst_case(clean: Tensor, robust: dict[str, Tensor]) -> dict:
    """Per-point worst case over clean and every attack, on the prefix of points all of them covered."""
    n = min([len(clean), *(len(r) for r in robust.values())])
    ok = clean[:n].clone()
    for r in robust.values():
        ok &= r[:n]
    return {"accuracy": fraction(ok), "n": n, "attacks": sorted(robust)}


def surrogate_architecture(name: str, target: str) -> str:
    """The black-box surrogate's architecture: `auto` → smallcnn, or lenet when the target is a smallcnn."""
    if name != "auto":
        return name
    return "lenet" if target == "smallcnn" else "smallcnn"
