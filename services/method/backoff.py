"""Out of GPU memory: a stage that runs out halves the batch sizes it uses and runs again, down to a floor; below
it the stage fails with a message that says what to change. What was halved is kept with the stage's output and
shown in the report (`memory_backoff`), since a smaller batch can change a stage's numbers (fine-tuning most)."""

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from services.method import batches
from services.method.config import LadderConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
FLOOR = 8  # below this a batch no longer fills a GPU usefully: a larger GPU (or a smaller model) is the answer
# the batch sizes each stage's GPU work takes from the config (latents: a fixed batch; boundary: on the CPU)
BATCH_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "latents": (), "boundary": (),
    "generator": (("generator", "batch_size"),),
    "adversarial": (("perturb", "batch_size"),),
    "finetune": (("finetune", "batch_size"),),
    "evaluate": (("evaluate", "batch_size"), ("evaluate", "autoattack", "batch_size"), ("finetune", "batch_size"),
                 ("perturb", "batch_size")),
    "report": (("perturb", "batch_size"),),
}


class OutOfMemory(Exception):
    """The stage ran out of GPU memory even at the smallest batch sizes it may use."""


def halved(config: LadderConfig, stage: str) -> tuple[LadderConfig, dict[str, int]]:
    """The config with the stage's batch sizes halved, and the new sizes by dotted name; OutOfMemory below FLOOR."""
    data = config.model_dump(mode="json")
    changed = {}
    for path in BATCH_FIELDS[stage]:
        *parents, name = path
        section = data
        for p in parents:
            section = section[p]
        if section[name] // 2 >= FLOOR:
            section[name] //= 2
            changed[".".join(path)] = section[name]
    if not changed:
        fields = ", ".join(".".join(p) for p in BATCH_FIELDS[stage]) or "none it can shrink"
        raise OutOfMemory(f"stage {stage} ran out of GPU memory at the smallest batch sizes it may use ({fields}; "
                          f"floor {FLOOR}); run it on a GPU with more memory, or with a smaller model or input size")
    return LadderConfig.model_validate(data), changed


def with_backoff(run: Callable[[LadderConfig], T], config: LadderConfig, stage: str, device: torch.device,
                 on_halve: Callable[[dict[str, int]], None] = lambda changed: None) -> T:
    """`run(config)`; on CUDA out-of-memory, again with the stage's batch sizes halved (`on_halve` hears of each)."""
    config = batches.resolve(config, device)  # halving needs numbers: the device's defaults for the unset sizes
    while True:
        try:
            return run(config)
        except torch.OutOfMemoryError:
            if device.type != "cuda":
                raise
            gc.collect()  # the failed attempt's tensors, before the cache is handed back
            torch.cuda.empty_cache()
            config, changed = halved(config, stage)
            log.warning("stage %s ran out of GPU memory; again with %s", stage,
                        ", ".join(f"{k}={v}" for k, v in changed.items()))
            on_halve(changed)
