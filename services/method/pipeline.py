"""The whole method: latents → boundary → generator → adversarial → finetune → evaluate → report.

Each stage's output goes through a `StageStore`, so a run resumes at the first stage whose output
is missing (the CLI stores them as files, the service as job artifacts). Each stage draws its own
seed from the run's seed, so a resumed run gives the same numbers as an uninterrupted one.
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from services.method import batches, numerics
from services.method.attacks import autoattack_info, training_attack
from services.method.boundary import Boundary, fit_boundary
from services.method.config import LADDER_VARIANTS, FinetuneConfig, LadderConfig
from services.method.data import ImageData, balanced_order, require_every_class, stratified_split
from services.method.errors import InputError
from services.method.evaluate import Examples, evaluate, surrogate_architecture
from services.method.finetune import accuracy, fit
from services.method.generator import GeneratorFit, resolve_preset, train_generator
from services.method.latents import extract_latents
from services.method.models import Classifier, ModelSpec, build_classifier, device_of, load_net_weights, net_weights, prepare
from services.method.perturb import Adversarial, Calibration, calibrate, directions, generate, random_targets
from services.method.progress import Progress, silent
from services.method.select import Judge, Selector, make_proxy
from services.method.stages import STAGES, stage_seed, validation_seed

STAGE_SCHEMA = 3  # bump when a stage's stored output changes shape, so old stored stages are not reused
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
class AdversarialOutput:
    """The adversarial stage: LADDER's ε list, the crossing rate of each variant's direction at it, and the
    generated examples of LADDER and of each LADDER variant."""

    calibration: Calibration
    variant_crossing_rate: dict[str, list[float]]
    examples: dict[str, Adversarial]


@dataclass
class FinetuneOutput:
    """The finetune stage: every fine-tuned model's weights, loss per epoch and seconds; under a clean-accuracy
    budget, also each model's chosen checkpoint and why (select.py), and the surrogate the selection trained."""

    weights: dict[str, dict[str, Tensor]]
    loss: dict[str, list[float]]
    seconds: dict[str, float]
    selection: dict[str, dict] | None = None
    selection_seconds: float | None = None
    surrogate: dict[str, Tensor] | None = None  # the evaluation's too: trained once


@dataclass
class EvaluateOutput:
    """The evaluate stage: every model's accuracies (evaluate.py), how they were measured, and the surrogate."""

    models: dict[str, dict]
    evaluation: dict
    surrogate: dict | None  # architecture, clean accuracy on the evaluated points, epochs; None without black-box


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
        """The stage's output: from this run, from the store, or computed now (from its inputs, by name) and stored."""
        if name in self._values:
            return self._values[name]
        started = time.perf_counter()
        value = self.store.load(name)
        if value is None:
            stage = STAGE_TABLE[name]
            inputs = {i: self.output(i) for i in stage.inputs}  # earlier stages first, timed on their own
            started = time.perf_counter()
            with numerics.watch() as nondeterministic:
                value = stage.compute(self, **inputs)
            self.store.save(name, value, {"not_bit_exact": nondeterministic} if nondeterministic else None)
        self.seconds[name] = time.perf_counter() - started  # a stored stage: the time to load it
        self.progress(name, 1.0, {})
        self._values[name] = value
        return value

    def latents(self) -> Tensor:
        """Φ(x) of every training image (method.md, stage 1)."""
        return extract_latents(self.split, self.train.x, batches.latents(self.device), self.progress)

    def boundary(self, latents: Tensor) -> Boundary:
        """The attention SVM of every class pair (stage 2)."""
        return fit_boundary(latents, self.train.y, self.spec.num_classes, self.cfg.boundary,
                            stage_seed(self.cfg.seed, "boundary"), self.progress)

    def generator(self, latents: Tensor) -> GeneratorFit:
        """G: latents → images, trained on the training images (stage 3)."""
        return train_generator(latents, self.train.x, self.cfg.generator, stage_seed(self.cfg.seed, "generator"),
                               self.progress, self.device, self.cfg.precision)

    def sources(self, z: Tensor, boundary: Boundary, variants: list[str]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
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

    def adversarial(self, latents: Tensor, boundary: Boundary, generator: GeneratorFit) -> AdversarialOutput:
        """LADDER's examples: source latents moved along the boundary normal at the calibrated ε list, mapped to
        images by G (stage 4); likewise for each LADDER variant."""
        cfg, progress = self.cfg, self.progress
        g = generator.build().to(self.device)
        zs, ys, targets, steps = self.sources(latents, boundary, cfg.variants)
        cal_n = min(len(zs), cfg.perturb.calibration_samples)
        head = self.split.head
        # ε is calibrated along the boundary normal, also when LADDER's step blends in a random direction
        normal = (steps["ladder"][:cal_n] if cfg.perturb.random_share == 0
                  else boundary.direction(zs[:cal_n], ys[:cal_n], targets[:cal_n]))
        cal = calibrate(head, zs[:cal_n], normal, targets[:cal_n], cfg.perturb.crossing_quantiles, cfg.perturb.eps)
        out = AdversarialOutput(cal, {}, {})
        for name, step in steps.items():
            if name != "ladder" or cfg.perturb.random_share > 0:  # at LADDER's ε list: a variant changes the direction only
                out.variant_crossing_rate[name] = calibrate(
                    head, zs[:cal_n], step[:cal_n], targets[:cal_n], None, cal.eps).crossing_rate
            out.examples[name] = generate(g, self.model, zs, ys, targets, step, cal.eps, cfg.perturb.batch_size, progress)
        return out

    def trainings(self, adv: AdversarialOutput) -> dict[str, dict]:
        """How each compared model is fine-tuned: `fit` arguments beyond the shared data and budget."""
        f, b = self.cfg.finetune, self.cfg.baselines
        ladder = (adv.examples["ladder"].x, adv.examples["ladder"].y)
        runs: dict[str, dict[str, Any]] = {"control": {"alpha": 1.0}, "ladder": {"alpha": f.alpha, "extra": ladder}}
        for name in self.cfg.variants:
            if name in LADDER_VARIANTS:
                ex = adv.examples[name]
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

    def finetune(self, adversarial: AdversarialOutput) -> FinetuneOutput:
        """Every compared model fine-tuned from the uploaded one (stage 5, Eq. 9 for LADDER), each returning the
        checkpoint the clean-accuracy budget allows (select.py) when it is on."""
        runs = self.trainings(adversarial)
        out = FinetuneOutput({}, {}, {})
        judge = uploaded = uploaded_weights = None
        if self.val is not None:  # every model's checkpoints judged on the same proxy, the uploaded model's first
            started = time.perf_counter()
            surrogate, _ = train_surrogate(self.spec, self.train, self.cfg, device=self.device)
            proxy = make_proxy(surrogate, self.val, self.cfg.select, self.cfg.evaluate,
                               validation_seed(self.cfg.seed), self.spec.num_classes)
            judge = Judge(proxy, self.cfg.select.objective, self.cfg.evaluate.batch_size)
            uploaded, uploaded_weights = judge(self.model), net_weights(self.model)  # every model's epoch 0
            out.surrogate = net_weights(surrogate)
            out.selection_seconds = time.perf_counter() - started
            out.selection = {}
        for i, (name, how) in enumerate(runs.items()):
            started = time.perf_counter()
            selector = None if judge is None else Selector(uploaded, uploaded_weights, self.cfg.select.max_clean_drop,
                                                           judge)
            out.weights[name], out.loss[name] = self.finetune_one(
                how, lambda s, frac, met, i=i: self.progress("finetune", (i + frac) / len(runs), met), selector=selector)
            if selector is not None and out.selection is not None:
                out.selection[name] = selector.summary()
            out.seconds[name] = time.perf_counter() - started
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
        for name, state in self.output("finetune").weights.items():
            models[name] = copy.deepcopy(self.model)  # any architecture, custom (.pt2) ones included
            load_net_weights(models[name], state)
            models[name].eval()
        return models

    def evaluate(self, boundary: Boundary, generator: GeneratorFit, adversarial: AdversarialOutput,
                 finetune: FinetuneOutput) -> EvaluateOutput:
        """Every model on the test points: clean, and under each attack black-box (from a surrogate) and white-box,
        the LADDER attack included (stage 6)."""
        cfg, progress, ev = self.cfg, self.progress, self.cfg.evaluate
        seed = stage_seed(cfg.seed, "evaluate")
        surrogate: Classifier | None = None
        arch = None
        share = 0.0
        if "blackbox" in ev.settings and finetune.surrogate is not None:  # trained by the fine-tuning stage's selection
            arch = surrogate_architecture(ev.surrogate_architecture, self.spec.architecture)
            surrogate = build_classifier(surrogate_spec(self.spec, arch), finetune.surrogate).to(self.device).eval()
        elif "blackbox" in ev.settings:
            share = 0.15
            surrogate, arch = train_surrogate(self.spec, self.train, cfg,
                                              lambda s, frac, met: progress("evaluate", share * frac, met), self.device)
        points = evaluation_points(self.test, cfg)
        ladder = self.ladder_attack(boundary, generator, adversarial, points) if "ladder" in ev.runs("whitebox") else None
        results = evaluate(self.models(), surrogate, points.x, points.y, ev, seed, self.spec.num_classes, ladder,
                           lambda s, frac, met: progress("evaluate", share + (1 - share) * frac, met))
        if "autoattack" in ev.attacks:
            results["evaluation"]["autoattack"] = autoattack_info(ev.autoattack, self.spec.num_classes,
                                                                  results["evaluation"]["warnings"])
        return EvaluateOutput(results["models"], results["evaluation"], None if surrogate is None else {
            "architecture": arch, "clean_accuracy": accuracy(surrogate, points.x, points.y), "epochs": ev.surrogate_epochs})

    def ladder_attack(self, boundary: Boundary, gfit: GeneratorFit, adv: AdversarialOutput, points: ImageData) -> Examples:
        """The LADDER attack (paper Table 8): test points moved along the vanilla model's boundary normals by
        its generator, every calibrated ε, a random target per point; labelled with the source class."""
        gen = torch.Generator().manual_seed(stage_seed(self.cfg.seed, "evaluate") + 101)
        eps = adv.calibration.eps
        z = extract_latents(self.split, points.x, batches.latents(self.device))
        targets = random_targets(points.y, self.spec.num_classes, gen)
        step = directions(boundary, z, points.y, targets, "boundary", gen)
        ex = generate(gfit.build().to(self.device), self.model, z, points.y, targets, step, eps, self.cfg.perturb.batch_size)
        n = len(points)
        return Examples(ex.x, torch.arange(n).repeat(len(eps)), {"eps": eps, "targets": "random", "crafted_on": "vanilla"},
                        torch.arange(len(eps)).repeat_interleave(n), eps)


@dataclass(frozen=True)
class Stage:
    """One stage of the method: the Run method that computes it, and the earlier stages it takes, by name."""

    compute: Callable[..., Any]
    inputs: tuple[str, ...]


STAGE_TABLE: dict[str, Stage] = {
    "latents": Stage(Run.latents, ()),
    "boundary": Stage(Run.boundary, ("latents",)),
    "generator": Stage(Run.generator, ("latents",)),
    "adversarial": Stage(Run.adversarial, ("latents", "boundary", "generator")),
    "finetune": Stage(Run.finetune, ("adversarial",)),
    "evaluate": Stage(Run.evaluate, ("boundary", "generator", "adversarial", "finetune")),
}
assert tuple(STAGE_TABLE) == STAGES, "the stage table follows services/method/stages.py"
