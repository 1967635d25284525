"""Inference batch sizes per device: the config's `null` batch sizes filled with the device's defaults.

Only batches that do not define the method are sized by device: evaluation (clean accuracy, the attacks'
batches, transfer checks), AutoAttack, generation, and the latents' forward passes (no config field). A GPU
gets batches large enough to keep it busy with a small model; a larger model that runs out of memory halves
them (backoff.py, shown in the report). The training batches (generator, fine-tuning, surrogate) are
hyperparameters of the method, the same on every device. The table depends on the device's type only, never
on its free memory, so that a job with a seed gives the same numbers on any GPU with room for it.
"""

import torch

from services.method.config import EvaluateConfig, LadderConfig

# dotted config field -> batch size by device type (another type, e.g. mps, gets the CPU's)
DEFAULTS: dict[str, dict[str, int]] = {
    "evaluate.batch_size": {"cpu": 500, "cuda": 4096},
    "evaluate.autoattack.batch_size": {"cpu": 250, "cuda": 1000},
    "perturb.batch_size": {"cpu": 1024, "cuda": 8192},
}
LATENTS = {"cpu": 512, "cuda": 8192}


def latents(device: torch.device) -> int:
    """Rows per forward pass when extracting latents on `device`."""
    return LATENTS.get(device.type, LATENTS["cpu"])


def default(field: str, device: torch.device) -> int:
    """The batch size a `null` config field takes on `device`."""
    table = DEFAULTS[field]
    return table.get(device.type, table["cpu"])


def for_evaluation(cfg: EvaluateConfig, device: torch.device) -> EvaluateConfig:
    """The evaluation config with its `null` batch sizes (evaluation, AutoAttack) set for `device`."""
    aa = cfg.autoattack
    if aa.batch_size is None:
        aa = aa.model_copy(update={"batch_size": default("evaluate.autoattack.batch_size", device)})
    size = default("evaluate.batch_size", device) if cfg.batch_size is None else cfg.batch_size
    if size == cfg.batch_size and aa is cfg.autoattack:
        return cfg
    return cfg.model_copy(update={"batch_size": size, "autoattack": aa})


def resolve(config: LadderConfig, device: torch.device) -> LadderConfig:
    """The config with every `null` inference batch size set to the device's default (the same config when none is
    null)."""
    evaluate = for_evaluation(config.evaluate, device)
    perturb = config.perturb
    if perturb.batch_size is None:
        perturb = perturb.model_copy(update={"batch_size": default("perturb.batch_size", device)})
    if evaluate is config.evaluate and perturb is config.perturb:
        return config
    return config.model_copy(update={"evaluate": evaluate, "perturb": perturb})
