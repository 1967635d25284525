"""Stage 6: clean accuracy and robust accuracy, white-box and black-box transfer (method.md, stage 6).

White-box: each attack is crafted on the evaluated model itself. Black-box: crafted once on a
surrogate of another architecture trained on the same data, then fed to every model (the
paper's main setting). Robust accuracy is over all evaluated points (RobustBench convention).
"""

from torch import Tensor, nn

from services.method.attacks import craft
from services.method.config import EvaluateConfig
from services.method.finetune import accuracy
from services.method.progress import Progress, silent


def evaluate(
    models: dict[str, nn.Module], surrogate: nn.Module, x: Tensor, y: Tensor, cfg: EvaluateConfig, seed: int,
    progress: Progress = silent,
) -> dict:
    """Per model: clean_accuracy and attacks.<whitebox|blackbox>.<attack>.{accuracy, n, params}."""
    params = cfg.attack.model_dump()
    out = {name: {"clean_accuracy": accuracy(m, x, y), "attacks": {"whitebox": {}, "blackbox": {}}}
           for name, m in models.items()}
    jobs = len(cfg.attacks) * (1 + len(models))
    done = 0
    for k, attack in enumerate(cfg.attacks):
        transfer = craft(attack, surrogate, x, y, cfg.attack, seed + k, cfg.batch_size)
        done += 1
        progress("evaluate", done / jobs, {})
        for name, m in models.items():
            out[name]["attacks"]["blackbox"][attack] = {"accuracy": accuracy(m, transfer, y), "n": len(x), "params": params}
            own = craft(attack, m, x, y, cfg.attack, seed + k, cfg.batch_size)
            out[name]["attacks"]["whitebox"][attack] = {"accuracy": accuracy(m, own, y), "n": len(x), "params": params}
            done += 1
            progress("evaluate", done / jobs, {f"{name}_{attack}": out[name]["attacks"]["whitebox"][attack]["accuracy"]})
    return out


def surrogate_architecture(name: str, target: str) -> str:
    """The black-box surrogate's architecture: `auto` → smallcnn, or lenet when the target is a smallcnn."""
    if name != "auto":
        return name
    return "lenet" if target == "smallcnn" else "smallcnn"

