"""The whole method: latents → boundary → generator → adversarial → finetune → evaluate → report.

Each stage's output goes through a `StageStore`, so a run resumes at the first stage whose output
is missing (the CLI stores them as files, the service as job artifacts). Each stage draws its own
seed from the run's seed, so a resumed run gives the same numbers as an uninterrupted one.
"""

import copy
import importlib.metadata
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from torch import Tensor

import services
from services import devices
from services.datasets import ImageData, balanced_order, require_every_class, stratified_split
from services.errors import InputError
from services.method import batches, numerics
from services.method.boundary import fit_boundary
from services.method.attacks import autoattack_info, training_attack
from services.method.config import LADDER_VARIANTS, FinetuneConfig, LadderConfig
from services.method.evaluate import Examples, evaluate, surrogate_architecture
from services.method.finetune import accuracy, fit
from services.method.generator import fidelity, resolve_preset, train_generator
from services.method.latents import extract_latents
from services.method.rank import report_ranks
from services.method.select import Judge, Selector, make_proxy, within
from services.method.models import Classifier, ModelSpec, build_classifier, device_of, load_net_weights, net_weights, prepare
from services.method.perturb import calibrate, directions, generate, random_targets
from services.method.progress import Progress, silent

log = logging.getLogger(__name__)
STAGES = ("latents", "boundary", "generator", "adversarial", "finetune", "evaluate")
REPORT_SCHEMA = "ladder.report/2"  # docs/report.md
STAGE_SCHEMA = 2  # bump when a stage's stored output changes shape, so old stored stages are not reused
VARIANT_DIRECTIONS = {"ladder": "boundary", "ladder_random": "random", "ladder_cavrandom": "cav_random"}


class StageStore(Protocol):
    """Where stage outputs live between stages; `load` answers None for a stage not yet done. `notes` are how an
    output was made (e.g. the ops that kept it from being bit-exact), kept beside it."""

    def load(self, stage: str) -> Any | None: ...

    def save(self, stage: str, value: Any, notes: dict[str, Any] | None = None) -> None: ...

    def notes(self, stage: str) -> dict[str, Any]: ...


class MemoryStore:
    """Keeps stage outputs in a dict (one process, no resume)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.kept_notes: dict[str, dict[str, Any]] = {}

    def load(self, stage: str) -> Any | None:
        """The stage's output, or None."""
        return self.values.get(stage)

    def save(self, stage: str, value: Any, notes: dict[str, Any] | None = None) -> None:
        """Keep the stage's output."""
        self.values[stage] = value
        self.kept_notes[stage] = notes or {}

    def notes(self, stage: str) -> dict[str, Any]:
        """The notes saved with the stage's output."""
        return self.kept_notes.get(stage, {})


@dataclass
class HardenResult:
    """Every trained model (vanilla, control, ladder and variants), the report and its HTML page."""

    models: dict[str, Classifier]
    report: dict
    html: str | None  # None when the page could not be rendered (logged): the weights and numbers still count


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage, derived from the run's seed."""
    return seed * 1009 + STAGES.index(stage) * 7 + 1


def validation_seed(seed: int) -> int:
    """The seed of the validation split (select.py), derived from the run's seed apart from every stage's."""
    return stage_seed(seed, "finetune") + 101


def versions() -> dict[str, str]:
    """Library versions that decide the numbers."""
    return {
        "ladder": services.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__,
        "art": importlib.metadata.version("adversarial-robustness-toolbox"),
        "autoattack": importlib.metadata.version("pyautoattack"),
    }


def per_class(y: torch.Tensor, k: int | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to k samples of every class (all when k is None), sorted."""
    if k is None:
        return torch.arange(len(y))
    idx = [(y == c).nonzero().squeeze(1) for c in y.unique().tolist()]
    return torch.cat([i[torch.randperm(len(i), generator=gen)[:k]] for i in idx]).sort().values


def train_surrogate(
    spec: ModelSpec, train: ImageData, cfg: LadderConfig, progress: Progress = silent, device: torch.device | str = "cpu",
) -> tuple[Classifier, str]:
    """The black-box surrogate: another architecture trained on the same data (seeded by the run), on `device`."""
    arch = surrogate_architecture(cfg.evaluate.surrogate_architecture, spec.architecture)
    seed = stage_seed(cfg.seed, "evaluate")
    torch.manual_seed(seed)
    surrogate = build_classifier(surrogate_spec(spec, arch)).to(device)
    fit(surrogate, train.x, train.y, epochs=cfg.evaluate.surrogate_epochs, lr=cfg.evaluate.surrogate_lr,
        momentum=cfg.evaluate.surrogate_momentum,
        batch_size=cfg.finetune.batch_size, seed=seed, stage="evaluate", progress=progress)
    return surrogate, arch


def surrogate_spec(spec: ModelSpec, architecture: str) -> ModelSpec:
    """The surrogate's spec: the model's input, classes and normalisation, another architecture."""
    return spec.model_copy(update={"architecture": architecture, "latent_layer": None})


def split_inputs(train: ImageData, test: ImageData | None, cfg: LadderConfig, num_classes: int) -> tuple[ImageData, ImageData]:
    """The run's training and test data: `test` when given, else a stratified hold-out of `train`."""
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, cfg.seed)
    require_every_class(train, num_classes, 3, "training data")
    if len(test) == 0:
        raise InputError("the test split is empty; give test data or a larger test_fraction in the config")
    return train, test


def validation_split(train: ImageData, validation: ImageData | None, cfg: LadderConfig,
                     num_classes: int) -> tuple[ImageData, ImageData | None, bool]:
    """(the data the stages train on, checkpoint selection's validation data, whether it was uploaded): `validation`
    when given, else a stratified `select.validation_fraction` carved from `train`; None when the selection is off."""
    if cfg.select.max_clean_drop is None:
        if validation is not None:
            raise InputError("validation data is used only by checkpoint selection; set select.max_clean_drop in the "
                             "config, or leave the validation data out")
        return train, None, False
    if validation is not None:
        require_every_class(validation, num_classes, 1, "validation data")
        return train, validation, True
    train, validation = stratified_split(train, cfg.select.validation_fraction, validation_seed(cfg.seed))
    require_every_class(validation, num_classes, 1, "the validation split (select.validation_fraction)")
    require_every_class(train, num_classes, 3, "training data after the validation split (select.validation_fraction)")
    return train, validation, False


def evaluation_points(test: ImageData, cfg: LadderConfig) -> ImageData:
    """The test points evaluated (all, or a stratified `max_samples`), dealt out class by class so that
    every prefix (the subset of an attack with a cap) is class-balanced: a cap of 500 on 10 classes
    attacks 50 points of each."""
    n = cfg.evaluate.max_samples
    seed = stage_seed(cfg.seed, "evaluate")
    if n is not None and len(test) > n:
        test = stratified_split(test, n / len(test), seed)[1]
    return test.subset(balanced_order(test.y, torch.Generator().manual_seed(seed)))


class Run:
    """One LADDER run over a StageStore: `output(stage)` loads a stage's stored output or computes
    and stores it (its inputs, the earlier stages, likewise), so any process can run any one stage.
    Every stage but the boundary fit (on the CPU) runs on the model's device (move the model to a GPU to
    use one); data, latents, examples and stored weights stay on the CPU."""

    def __init__(self, model: Classifier, spec: ModelSpec, train: ImageData, test: ImageData, config: LadderConfig,
                 store: StageStore | None = None, progress: Progress = silent, validation: ImageData | None = None):
        self.device = device_of(model)
        config = batches.resolve(config, self.device)  # the batch sizes that ran, in the report too
        train, self.val, self.val_uploaded = validation_split(train, validation, config, spec.num_classes)
        self.model, self.spec, self.train, self.test, self.cfg = model, spec, train, test, config
        self.store = store or MemoryStore()
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._values: dict[str, Any] = {}
        numerics.setup()
        model.eval()
        self.split = prepare(model, spec, config.latent_layer)
        resolve_preset(config.generator.preset, spec.input_shape)  # refuse a preset that cannot fit before any work

    def output(self, name: str) -> Any:
        """The stage's output: from this run, from the store, or computed now and stored."""
        if name in self._values:
            return self._values[name]
        started = time.perf_counter()
        value = self.store.load(name)
        if value is None:
            inputs = [self.output(s) for s in STAGES[:STAGES.index(name)]]  # earlier stages first, timed on their own
            started = time.perf_counter()
            with numerics.watch() as nondeterministic:
                value = getattr(self, f"_{name}")(*inputs)
            self.store.save(name, value, {"not_bit_exact": nondeterministic} if nondeterministic else None)
        self.seconds[name] = time.perf_counter() - started  # a stored stage: the time to load it
        self.progress(name, 1.0, {})
        self._values[name] = value
        return value

    def _latents(self) -> Tensor:
        return extract_latents(self.split, self.train.x, batches.latents(self.device), self.progress)

    def _boundary(self, z: Tensor) -> Any:
        return fit_boundary(z, self.train.y, self.spec.num_classes, self.cfg.boundary,
                            stage_seed(self.cfg.seed, "boundary"), self.progress)

    def _generator(self, z: Tensor, boundary: Any) -> Any:
        return train_generator(z, self.train.x, self.cfg.generator, stage_seed(self.cfg.seed, "generator"), self.progress,
                               self.device, self.cfg.precision)

    def sources(self, z: Tensor, boundary: Any, variants: list[str]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The adversarial stage's inputs: source latents and labels (`perturb.samples_per_class` per class, classes
        mixed), a random target each, and the latent step of LADDER and of each named LADDER variant."""
        cfg, y = self.cfg, self.train.y
        gen = torch.Generator().manual_seed(stage_seed(cfg.seed, "adversarial"))
        src = per_class(y, cfg.perturb.samples_per_class, gen)
        src = src[torch.randperm(len(src), generator=gen)]  # calibration and flip checks take leading rows: mix classes
        zs, ys = z[src], y[src]
        targets = random_targets(ys, self.spec.num_classes, gen)
        steps = {name: directions(boundary, zs, ys, targets, VARIANT_DIRECTIONS[name], gen, cfg.perturb.cav_noise)
                 for name in variants if name in LADDER_VARIANTS}
        # LADDER's own draws (its blend's random direction) come after the variants', so that the ablations get
        # the same draws whatever the share
        ladder = directions(boundary, zs, ys, targets, "boundary", gen, cfg.perturb.cav_noise, cfg.perturb.random_share)
        return zs, ys, targets, {"ladder": ladder, **steps}

    def _adversarial(self, z: Tensor, boundary: Any, gfit: Any) -> dict:
        cfg, progress = self.cfg, self.progress
        generator = gfit.build().to(self.device)
        zs, ys, targets, steps = self.sources(z, boundary, cfg.variants)
        cal_n = min(len(zs), cfg.perturb.calibration_samples)
        head = self.split.head
        # ε is calibrated along the boundary normal, also when LADDER's step blends in a random direction
        normal = steps["ladder"][:cal_n] if cfg.perturb.random_share == 0 else boundary.direction(zs[:cal_n], ys[:cal_n], targets[:cal_n])
        cal = calibrate(head, zs[:cal_n], normal, targets[:cal_n], cfg.perturb.crossing_quantiles, cfg.perturb.eps)
        out = {"calibration": cal, "variant_crossing_rate": {}, "examples": {}}
        for name, step in steps.items():
            if name != "ladder" or cfg.perturb.random_share > 0:  # at LADDER's ε list: a variant changes the direction only
                out["variant_crossing_rate"][name] = calibrate(
                    head, zs[:cal_n], step[:cal_n], targets[:cal_n], None, cal.eps).crossing_rate
            out["examples"][name] = generate(generator, self.model, zs, ys, targets, step, cal.eps,
                                             cfg.perturb.batch_size, progress)
        return out

    def trainings(self, adv: dict) -> dict[str, dict]:
        """How each compared model is fine-tuned: `fit` arguments beyond the shared data and budget."""
        f, b = self.cfg.finetune, self.cfg.baselines
        ladder = (adv["examples"]["ladder"].x, adv["examples"]["ladder"].y)
        runs = {"control": {"alpha": 1.0}, "ladder": {"alpha": f.alpha, "extra": ladder}}
        for name in self.cfg.variants:
            if name in LADDER_VARIANTS:
                ex = adv["examples"][name]
                runs[name] = {"alpha": f.alpha, "extra": (ex.x, ex.y)}
            elif name == "fgsm_at":
                runs[name] = {"alpha": b.fgsm_alpha, "craft": training_attack(name, b)}
            elif name == "pgd_at":
                runs[name] = {"alpha": 0.0, "craft": training_attack(name, b)}
            elif name == "trades":
                runs[name] = {"alpha": 1.0, "trades": (b.trades_beta, training_attack("trades", b))}
            elif name == "trades_ladder":
                runs[name] = {"alpha": f.alpha, "extra": ladder, "trades": (b.trades_beta, training_attack("trades", b))}
        return runs

    def _finetune(self, z: Tensor, boundary: Any, gfit: Any, adv: dict) -> dict:
        weights, history, seconds, chosen = {}, {}, {}, {}
        runs = self.trainings(adv)
        out: dict[str, Any] = {}
        judge = uploaded = uploaded_weights = None
        if self.val is not None:  # every model's checkpoints judged on the same proxy, the uploaded model's first
            started = time.perf_counter()
            surrogate, _ = train_surrogate(self.spec, self.train, self.cfg, device=self.device)
            proxy = make_proxy(surrogate, self.val, self.cfg.select, self.cfg.evaluate,
                               validation_seed(self.cfg.seed), self.spec.num_classes)
            judge = Judge(proxy, self.cfg.select.objective, self.cfg.evaluate.batch_size)
            uploaded, uploaded_weights = judge(self.model), net_weights(self.model)  # every model's epoch 0
            out["surrogate"] = net_weights(surrogate)  # the evaluation's, trained once
            out["selection_seconds"] = time.perf_counter() - started
        for i, (name, how) in enumerate(runs.items()):
            started = time.perf_counter()
            selector = None if judge is None else Selector(uploaded, uploaded_weights, self.cfg.select.max_clean_drop,
                                                           judge)
            weights[name], history[name] = self.finetune_one(
                how, lambda s, frac, met, i=i: self.progress("finetune", (i + frac) / len(runs), met), selector=selector)
            if selector is not None:
                chosen[name] = selector.summary()
            seconds[name] = time.perf_counter() - started
        out.update(weights=weights, loss=history, seconds=seconds)
        if judge is not None:
            out["selection"] = chosen
        return out

    def finetune_one(self, how: dict, progress: Progress = silent, finetune: FinetuneConfig | None = None,
                     selector: Selector | None = None) -> tuple[dict[str, Tensor], list[float]]:
        """Fine-tune a copy of the uploaded model with the run's data and budget (`how`: one of `trainings`; `finetune`:
        other fine-tuning settings than the run's): its weights and loss per epoch. With a `selector`, every epoch is
        scored and the weights are the selector's choice."""
        f, train = finetune or self.cfg.finetune, self.train
        m = copy.deepcopy(self.model)
        history = fit(m, train.x, train.y, epochs=f.epochs, lr=f.lr, momentum=f.momentum, batch_size=f.batch_size,
                      schedule=f.lr_schedule, seed=stage_seed(self.cfg.seed, "finetune"), **how, progress=progress,
                      precision=self.cfg.precision, on_check=None if selector is None else selector.on_check,
                      checks_per_epoch=self.cfg.select.checks_per_epoch)
        return (net_weights(m) if selector is None else selector.finish()), history

    def models(self) -> dict[str, Classifier]:
        """vanilla, control, ladder and the variants, built from the finetune stage's weights."""
        models = {"vanilla": self.model}
        for name, state in self.output("finetune")["weights"].items():
            models[name] = copy.deepcopy(self.model)  # any architecture, custom (.pt2) ones included
            load_net_weights(models[name], state)
            models[name].eval()
        return models

    def _evaluate(self, z: Tensor, boundary: Any, gfit: Any, adv: dict, tuned: dict) -> dict:
        cfg, progress, ev = self.cfg, self.progress, self.cfg.evaluate
        seed = stage_seed(cfg.seed, "evaluate")
        surrogate = arch = None
        share = 0.0
        if "blackbox" in ev.settings and "surrogate" in tuned:  # trained by the fine-tuning stage for the selection
            arch = surrogate_architecture(ev.surrogate_architecture, self.spec.architecture)
            surrogate = build_classifier(surrogate_spec(self.spec, arch), tuned["surrogate"]).to(self.device).eval()
        elif "blackbox" in ev.settings:
            share = 0.15
            surrogate, arch = train_surrogate(self.spec, self.train, cfg, lambda s, frac, met: progress("evaluate", share * frac, met),
                                              self.device)
        points = evaluation_points(self.test, cfg)
        ladder = self.ladder_attack(boundary, gfit, adv, points) if "ladder" in ev.runs("whitebox") else None
        results = evaluate(self.models(), surrogate, points.x, points.y, ev, seed, self.spec.num_classes, ladder,
                           lambda s, frac, met: progress("evaluate", share + (1 - share) * frac, met))
        if "autoattack" in ev.attacks:
            results["evaluation"]["autoattack"] = autoattack_info(ev.autoattack, self.spec.num_classes,
                                                                  results["evaluation"]["warnings"])
        results["surrogate"] = None if surrogate is None else {
            "architecture": arch, "clean_accuracy": accuracy(surrogate, points.x, points.y), "epochs": ev.surrogate_epochs}
        return results

    def ladder_attack(self, boundary: Any, gfit: Any, adv: dict, points: ImageData) -> Examples:
        """The LADDER attack (paper Table 8): test points moved along the vanilla model's boundary normals by
        its generator, every calibrated ε, a random target per point; labelled with the source class."""
        gen = torch.Generator().manual_seed(stage_seed(self.cfg.seed, "evaluate") + 101)
        eps = adv["calibration"].eps
        z = extract_latents(self.split, points.x, batches.latents(self.device))
        targets = random_targets(points.y, self.spec.num_classes, gen)
        step = directions(boundary, z, points.y, targets, "boundary", gen)
        ex = generate(gfit.build().to(self.device), self.model, z, points.y, targets, step, eps, self.cfg.perturb.batch_size)
        n = len(points)
        return Examples(ex.x, torch.arange(n).repeat(len(eps)), {"eps": eps, "targets": "random", "crafted_on": "vanilla"},
                        torch.arange(len(eps)).repeat_interleave(n), eps)

    def html(self, report: dict) -> str | None:
        """The report as one self-contained page, with generated examples along the ε list; None (and a logged
        error) when rendering fails: a page is a view of report.json and never costs a run its results."""
        try:
            from services.report import render_html  # matplotlib and the template load only when a page is made

            return render_html(report, self.gallery())
        except Exception:
            log.exception("the report page could not be rendered; report.json holds every number")
            return None

    def gallery(self, pairs: int = 4) -> dict:
        """Generated examples along the ε list for a few (source → target) pairs of test images: the original,
        its reconstruction G(Φ(x)), then G(z + ε·β⊙d) for every ε (the paper's Fig. 7/10)."""
        _, boundary, gfit, adv = (self.output(s) for s in STAGES[:4])
        eps = adv["calibration"].eps
        gen = torch.Generator().manual_seed(stage_seed(self.cfg.seed, "evaluate") + 202)
        classes = torch.randperm(self.spec.num_classes, generator=gen).tolist()
        picked = []  # (source, target, test index)
        for k in range(min(pairs, self.spec.num_classes)):
            s, t = classes[k], classes[(k + 1) % len(classes)]
            idx = (self.test.y == s).nonzero().squeeze(1)
            if len(idx):
                picked.append((s, t, int(idx[torch.randint(len(idx), (1,), generator=gen)])))
        if not picked:
            return {"eps": eps, "pairs": []}
        src, tgt, idx = (torch.tensor(c) for c in zip(*picked))
        x = self.test.x[idx]
        z = extract_latents(self.split, x, batches.latents(self.device))
        step = directions(boundary, z, src, tgt, "boundary", gen)
        rows = generate(gfit.build().to(self.device), self.model, z, src, tgt, step, [0.0, *eps]).x.view(len(eps) + 1, len(x), *x.shape[1:])
        return {"eps": eps, "pairs": [{"source": s, "target": t, "images": torch.cat([x[k : k + 1], rows[:, k]]).numpy()}
                                      for k, (s, t, _) in enumerate(picked)]}

    def calibration(self, adv: dict) -> dict:
        """The ε list of the adversarial stage's output, with latent crossing and image flip rates per ε."""
        return {
            "mode": "raw" if self.cfg.perturb.eps is not None else "quantiles",
            "table": [
                {**row, "image_flip_rate": adv["examples"]["ladder"].image_flip_rate[i]}
                for i, row in enumerate(adv["calibration"].table())
            ],
            "variant_crossing_rate": adv["variant_crossing_rate"],
            "curve": {"eps": adv["calibration"].grid_eps, "crossing_rate": adv["calibration"].grid_crossing_rate},
            "examples": len(adv["examples"]["ladder"].y),
        }

    def report(self, stage_seconds: dict[str, float] | None = None, reused_seconds: dict[str, float] | None = None) -> dict:
        """The evaluation report of the run (stage times: this process's, unless given; `reused_seconds`: the time of
        the stages whose stored output a later attempt loaded, after a crash)."""
        cfg, train, spec, split = self.cfg, self.train, self.spec, self.split
        z, boundary, gfit, adv, tuned, ev = (self.output(s) for s in STAGES)
        hold = gfit.holdout_index
        return {
            "schema": REPORT_SCHEMA,
            "config": cfg.model_dump(mode="json"),
            "seeds": {"run": cfg.seed, **{s: stage_seed(cfg.seed, s) for s in STAGES}},
            "versions": versions(),
            "device": devices.describe(self.device),
            "spec": spec.model_dump(mode="json"),
            "data": {"train": len(train), "test": len(self.test), "evaluated": ev["evaluation"]["n"]},
            "latent": {"layer": split.layer, "dim": split.dim},
            "stage_seconds": stage_seconds if stage_seconds is not None else self.seconds,
            "stage_reused_seconds": reused_seconds or {},
            "determinism": {  # numerics.setup; a stage that used an op torch has no deterministic version of is named
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "not_bit_exact": {s: ops for s in STAGES if (ops := self.store.notes(s).get("not_bit_exact"))},
            },
            "boundary": {
                "pairs": len(boundary.pairs),
                "train_accuracy_mean": boundary.train_accuracy.mean().item(),
                "holdout_accuracy_mean": boundary.holdout_accuracy.mean().item(),
                "holdout_accuracy_min": boundary.holdout_accuracy.min().item(),
                **boundary.fit,
            },
            "generator": {
                "preset": gfit.preset, "epochs": gfit.epochs, "stopped": gfit.stopped,
                **fidelity(gfit.build().to(self.device), self.model, z[hold], train.x[hold], train.y[hold], train.x),
            },
            "calibration": self.calibration(adv),
            "finetune": {"loss": tuned["loss"], "seconds": tuned["seconds"]},
            "surrogate": ev["surrogate"],
            "evaluation": ev["evaluation"],
            "models": ev["models"],
            "average_rank": report_ranks(ev["models"], ev["evaluation"]["settings"]),
            "selection": self.selection(tuned, ev),
        }

    def selection(self, tuned: dict, ev: dict) -> dict | None:
        """Which checkpoint each fine-tuned model returns and why (select.py), and whether the budget also held on the
        test points; None when the selection is off."""
        if self.val is None:
            return None
        sel = self.cfg.select
        vanilla = ev["models"]["vanilla"]["clean_accuracy"]
        on_test = {}
        for name in tuned["selection"]:
            drop = 100 * (vanilla - ev["models"][name]["clean_accuracy"])
            on_test[name] = {"clean_drop_points": drop, "within_budget": within(drop, sel.max_clean_drop)}
        return {
            "max_clean_drop_points": sel.max_clean_drop, "objective": sel.objective,
            "validation": {"n": len(self.val), "robust_points": min(sel.robust_points, len(self.val)),
                           "source": "uploaded" if self.val_uploaded else "carved",
                           "fraction": None if self.val_uploaded else sel.validation_fraction},
            "seconds": tuned["selection_seconds"],
            "models": tuned["selection"],
            "on_test": on_test,
            "budget_held_on_test": all(t["within_budget"] for t in on_test.values()),
        }


def harden(
    model: Classifier, spec: ModelSpec, train: ImageData, test: ImageData, config: LadderConfig,
    store: StageStore | None = None, progress: Progress = silent, validation: ImageData | None = None,
) -> HardenResult:
    """Run LADDER on `model` with its training data; evaluate vanilla, control, LADDER and variants on `test`;
    choose checkpoints on `validation` (else on a split of `train`) when select.max_clean_drop is set."""
    run = Run(model, spec, train, test, config, store, progress, validation)
    run.output(STAGES[-1])
    report = run.report()
    return HardenResult(run.models(), report, run.html(report))
