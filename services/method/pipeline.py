"""The whole method: latents → boundary → generator → adversarial → finetune → evaluate → report.

Each stage's output goes through a `StageStore`, so a run resumes at the first stage whose output
is missing (the CLI stores them as files, the service as job artifacts). Each stage draws its own
seed from the run's seed, so a resumed run gives the same numbers as an uninterrupted one.
"""

import copy
import platform
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torchvision

import services
from services.datasets import ImageData, stratified_split
from services.method.boundary import fit_boundary
from services.method.config import LadderConfig
from services.method.evaluate import evaluate, surrogate_architecture
from services.method.finetune import accuracy, fit
from services.method.generator import fidelity, resolve_preset, train_generator
from services.method.latents import extract_latents
from services.method.models import Classifier, ModelSpec, build_classifier, net_weights, prepare
from services.method.perturb import calibrate, directions, generate, random_targets
from services.method.progress import Progress, silent

STAGES = ("latents", "boundary", "generator", "adversarial", "finetune", "evaluate")
STAGE_SCHEMA = 1  # bump when a stage's stored output changes shape, so old stored stages are not reused
VARIANT_DIRECTIONS = {"ladder": "boundary", "ladder_random": "random", "ladder_cavrandom": "cav_random"}


class StageStore(Protocol):
    """Where stage outputs live between stages; `load` answers None for a stage not yet done."""

    def load(self, stage: str) -> Any | None: ...

    def save(self, stage: str, value: Any) -> None: ...


class MemoryStore:
    """Keeps stage outputs in a dict (one process, no resume)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def load(self, stage: str) -> Any | None:
        """The stage's output, or None."""
        return self.values.get(stage)

    def save(self, stage: str, value: Any) -> None:
        """Keep the stage's output."""
        self.values[stage] = value


@dataclass
class HardenResult:
    """Every trained model (vanilla, control, ladder and variants) and the report."""

    models: dict[str, Classifier]
    report: dict


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage, derived from the run's seed."""
    return seed * 1009 + STAGES.index(stage) * 7 + 1


def versions() -> dict[str, str]:
    """Library versions that decide the numbers."""
    return {
        "ladder": services.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__,
    }


def _per_class(y: torch.Tensor, k: int | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to k samples of every class (all when k is None), sorted."""
    if k is None:
        return torch.arange(len(y))
    idx = [(y == c).nonzero().squeeze(1) for c in y.unique().tolist()]
    return torch.cat([i[torch.randperm(len(i), generator=gen)[:k]] for i in idx]).sort().values


def train_surrogate(spec: ModelSpec, train: ImageData, cfg: LadderConfig, progress: Progress = silent) -> tuple[Classifier, str]:
    """The black-box surrogate: another architecture trained on the same data (seeded by the run)."""
    arch = surrogate_architecture(cfg.evaluate.surrogate_architecture, spec.architecture)
    seed = stage_seed(cfg.seed, "evaluate")
    torch.manual_seed(seed)
    surrogate = build_classifier(spec.model_copy(update={"architecture": arch, "latent_layer": None}))
    fit(surrogate, train.x, train.y, epochs=cfg.evaluate.surrogate_epochs, lr=cfg.evaluate.surrogate_lr,
        momentum=cfg.evaluate.surrogate_momentum,
        batch_size=cfg.finetune.batch_size, seed=seed, stage="evaluate", progress=progress)
    return surrogate, arch


def evaluation_subset(test: ImageData, cfg: LadderConfig) -> ImageData:
    """The test points evaluated: all, or a stratified `max_samples` of them."""
    n = cfg.evaluate.max_samples
    if n is None or len(test) <= n:
        return test
    return stratified_split(test, n / len(test), stage_seed(cfg.seed, "evaluate"))[1]


def harden(
    model: Classifier, spec: ModelSpec, train: ImageData, test: ImageData, config: LadderConfig,
    store: StageStore | None = None, progress: Progress = silent,
) -> HardenResult:
    """Run LADDER on `model` with its training data; evaluate vanilla, control, LADDER and variants on `test`."""
    store = store or MemoryStore()
    cfg, times = config, {}
    model.eval()
    split = prepare(model, spec, cfg.latent_layer)
    resolve_preset(cfg.generator.preset, spec.input_shape)  # refuse a preset that cannot fit before any work
    num_classes = spec.num_classes

    def stage(name: str, run):
        started = time.perf_counter()
        value = store.load(name)
        if value is None:
            value = run()
            store.save(name, value)
        progress(name, 1.0, {})
        times[name] = time.perf_counter() - started
        return value

    z = stage("latents", lambda: extract_latents(split, train.x, progress=progress))
    boundary = stage("boundary", lambda: fit_boundary(z, train.y, num_classes, cfg.boundary, stage_seed(cfg.seed, "boundary"), progress))
    gfit = stage("generator", lambda: train_generator(z, train.x, cfg.generator, stage_seed(cfg.seed, "generator"), progress))
    generator = gfit.build()

    def adversarial() -> dict:
        gen = torch.Generator().manual_seed(stage_seed(cfg.seed, "adversarial"))
        src = _per_class(train.y, cfg.perturb.samples_per_class, gen)
        src = src[torch.randperm(len(src), generator=gen)]  # calibration and flip checks take leading rows: mix classes
        zs, ys = z[src], train.y[src]
        targets = random_targets(ys, num_classes, gen)
        steps = {name: directions(boundary, zs, ys, targets, VARIANT_DIRECTIONS[name], gen, cfg.perturb.cav_noise)
                 for name in ["ladder", *cfg.variants]}
        cal_n = min(len(zs), cfg.perturb.calibration_samples)
        cal = calibrate(split.head, zs[:cal_n], steps["ladder"][:cal_n], targets[:cal_n],
                        cfg.perturb.crossing_quantiles, cfg.perturb.eps)
        out = {"calibration": cal, "variant_crossing_rate": {}, "examples": {}}
        for name, step in steps.items():
            if name != "ladder":  # variants use LADDER's ε list: the ablation changes the direction only
                out["variant_crossing_rate"][name] = calibrate(
                    split.head, zs[:cal_n], step[:cal_n], targets[:cal_n], None, cal.eps).crossing_rate
            out["examples"][name] = generate(generator, model, zs, ys, targets, step, cal.eps,
                                             cfg.perturb.batch_size, progress)
        return out

    adv = stage("adversarial", adversarial)

    def finetune() -> dict:
        f = cfg.finetune
        weights, history, seconds = {}, {}, {}
        runs = {"control": None, **{name: ex for name, ex in adv["examples"].items()}}
        for i, (name, ex) in enumerate(runs.items()):
            started = time.perf_counter()
            m = copy.deepcopy(model)
            history[name] = fit(
                m, train.x, train.y, epochs=f.epochs, lr=f.lr, momentum=f.momentum, batch_size=f.batch_size,
                seed=stage_seed(cfg.seed, "finetune"), alpha=1.0 if ex is None else f.alpha,
                extra=None if ex is None else (ex.x, ex.y),
                progress=lambda s, frac, met, i=i: progress("finetune", (i + frac) / len(runs), met),
            )
            weights[name] = net_weights(m)
            seconds[name] = time.perf_counter() - started
        return {"weights": weights, "loss": history, "seconds": seconds}

    tuned = stage("finetune", finetune)
    models = {"vanilla": model}
    for name, state in tuned["weights"].items():
        models[name] = build_classifier(spec, state)

    def evaluation() -> dict:
        surrogate, arch = train_surrogate(spec, train, cfg, lambda s, frac, met: progress("evaluate", 0.3 * frac, met))
        subset = evaluation_subset(test, cfg)
        results = evaluate(models, surrogate, subset.x, subset.y, cfg.evaluate, stage_seed(cfg.seed, "evaluate"),
                           lambda s, frac, met: progress("evaluate", 0.3 + 0.7 * frac, met))
        return {"models": results, "surrogate": {"architecture": arch, "clean_accuracy": accuracy(surrogate, subset.x, subset.y),
                                                 "epochs": cfg.evaluate.surrogate_epochs}, "n": len(subset)}

    ev = stage("evaluate", evaluation)
    hold = gfit.holdout_index
    report = {
        "schema": "ladder.report/1",
        "config": cfg.model_dump(mode="json"),
        "seeds": {"run": cfg.seed, **{s: stage_seed(cfg.seed, s) for s in STAGES}},
        "versions": versions(),
        "spec": spec.model_dump(mode="json"),
        "data": {"train": len(train), "test": len(test), "evaluated": ev["n"]},
        "latent": {"layer": split.layer, "dim": split.dim},
        "stage_seconds": times,
        "boundary": {
            "pairs": len(boundary.pairs),
            "train_accuracy_mean": boundary.train_accuracy.mean().item(),
            "holdout_accuracy_mean": boundary.holdout_accuracy.mean().item(),
            "holdout_accuracy_min": boundary.holdout_accuracy.min().item(),
            **boundary.fit,
        },
        "generator": {
            "preset": gfit.preset, "epochs": gfit.epochs, "stopped": gfit.stopped,
            **fidelity(generator, model, z[hold], train.x[hold], train.y[hold], train.x),
        },
        "calibration": {
            "mode": "raw" if cfg.perturb.eps is not None else "quantiles",
            "table": [
                {**row, "image_flip_rate": adv["examples"]["ladder"].image_flip_rate[i]}
                for i, row in enumerate(adv["calibration"].table())
            ],
            "variant_crossing_rate": adv["variant_crossing_rate"],
            "curve": {"eps": adv["calibration"].grid_eps, "crossing_rate": adv["calibration"].grid_crossing_rate},
            "examples": len(adv["examples"]["ladder"].y),
        },
        "finetune": {"loss": tuned["loss"], "seconds": tuned["seconds"]},
        "surrogate": ev["surrogate"],
        "models": ev["models"],
    }
    return HardenResult(models, report)
