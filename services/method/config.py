"""The method's configuration: one validated model with the paper's defaults (method.md).

Every number a run depends on lives here, so that a report that echoes `LadderConfig.model_dump()`
together with its seed is enough to repeat the run.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LRSchedule = Literal["constant", "cosine"]


# The seed and the stage seeds derived from it (pipeline.stage_seed: seed·1009 + …, then + a few hundred) must fit
# torch's 64-bit generator seed; 2**53 is also the largest integer a JSON client (JavaScript) keeps exactly.
SEED_LIMIT = 2**53


class _Section(BaseModel):
    # allow_inf_nan=False: NaN or ±Infinity (which Python's JSON parser accepts) is refused in every field
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BoundaryConfig(_Section):
    """Stage 2: one attention SVM per unordered class pair, all pairs fitted in one batch."""

    samples_per_class: int = Field(200, ge=2, description="fit samples per class (paper: n = 400 per pair)")
    holdout_per_class: int = Field(50, ge=1, description="held-out samples per class for the pair's accuracy")
    attention_rank: int = Field(16, ge=1, description="rank of the attention map A (D×D when ≥ D)")
    l2: float = Field(1e-3, gt=0, description="L2 penalty on w")
    newton_steps: int = Field(50, ge=1, description="cap on finite-Newton steps for the linear SVM (exact at stop)")
    attention_steps: int = Field(30, ge=1, description="L-BFGS iterations refining attention and SVM together")


class GeneratorConfig(_Section):
    """Stage 3: G maps latents back to [0,1] images; trained on a time/epoch budget."""

    preset: Literal["auto", "mnist", "generic"] = "auto"
    loss: Literal["l2", "l1"] = "l2"
    max_epochs: int = Field(15, ge=1, description="the binding limit by default, so runs repeat on any machine")
    time_budget_s: float = Field(300.0, gt=0, description="a safety cap on wall time (makes runs machine-dependent)")
    patience: int = Field(6, ge=1, description="epochs without held-out improvement before stopping")
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)


class PerturbConfig(_Section):
    """Stage 4: x̂ = G(z + ε·β⊙d) for a random target per sample and every ε; label = source."""

    eps: list[float] | None = Field(None, description="raw ε values; None = calibrate per model")
    crossing_quantiles: list[float] = Field(
        [0.5, 0.75, 0.9, 0.95, 0.99], description="calibrated ε: where these fractions of latents cross (along the "
                                                  "normal); the paper's protocol favours the top half (docs/method.md)"
    )
    calibration_samples: int = Field(2000, ge=10)
    samples_per_class: int | None = Field(None, ge=1, description="source images per class; None = all")
    batch_size: int | None = Field(None, ge=1, description="generation batch; null = the device's default "
                                                         "(services/method/batches.py)")
    cav_noise: float = Field(0.01, gt=0, description="LADDER_cavRandom: β ⊙ (d + N(0, I)·noise) (authors: /100)")
    random_share: float = Field(
        0.85, ge=0, le=1,
        description="LADDER's step: √(1−s)·β⊙d + √s·r, r a random direction as long as β⊙d (0 = the paper's "
                    "normal, 1 = LADDER_Random); ε is still calibrated along the normal (docs/paper-reproduction.md)",
    )

    @field_validator("eps")
    @classmethod
    def _positive_eps(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(e <= 0 for e in v)):
            raise ValueError("eps must be a non-empty list of positive numbers, or null to calibrate")
        return v

    @field_validator("crossing_quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < q < 1 for q in v) or sorted(set(v)) != v:
            raise ValueError("crossing_quantiles must be increasing fractions strictly between 0 and 1")
        return v


class FinetuneConfig(_Section):
    """Stage 5: J = α·CE(f(x), y) + (1 − α)·CE(f(x̂), y); paper Table 6 (MNIST) defaults."""

    epochs: int = Field(10, ge=1, description="passes over the clean training set (authors: 100)")
    lr: float = Field(0.01, gt=0)
    lr_schedule: LRSchedule = Field(
        "constant", description="the learning rate per step: constant (the paper's), or a cosine from lr towards 0")
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_size: int = Field(64, ge=1)
    alpha: float = Field(0.5, ge=0, le=1, description="1.0 = the clean-only control")


class AttackConfig(_Section):
    """L∞ attacks (FGSM, PGD) in [0,1] pixel space."""

    eps: float = Field(0.3, gt=0, le=1, description="paper: 0.3 on MNIST")
    pgd_steps: int = Field(40, ge=1, description="Madry et al. (MNIST): 40")
    pgd_step_size: float | None = Field(None, gt=0, description="None = 2.5·eps/steps (Madry et al.)")
    pgd_random_start: bool = True
    pgd_early_stop: bool = Field(True, description="a point stops at its first misclassified iterate (kept); "
                                                   "false = every point takes every step")


class CWConfig(_Section):
    """CW-L2 (Carlini & Wagner, 2017): Adam on tanh-space pixels, a binary search over the constant c."""

    targeted: bool = Field(True, description="the paper's setting; False = untargeted")
    targets: Literal["random", "all"] = Field("random", description="targeted: one random target per point, or all")
    binary_search_steps: int = Field(6, ge=1, description="searches over c (never 1: that is CW without a search)")
    max_iter: int = Field(100, ge=1, description="Adam steps per value of c")
    lr: float = Field(0.05, gt=0, description="Adam learning rate in tanh space")
    initial_const: float = Field(0.1, gt=0, description="first c; ×10 until success, then bisection")
    confidence: float = Field(0.0, ge=0, description="κ: the logit margin the example must reach")
    max_samples: int | None = Field(100, ge=1, description="evaluated points attacked (a prefix of them); None = all")


class JSMAConfig(_Section):
    """JSMA (Papernot et al., 2016), targeted, through ART's SaliencyMapMethod."""

    theta: float = Field(1.0, description="change applied to each chosen pixel (ART: theta)")
    gamma: float = Field(0.1, gt=0, le=1, description="largest fraction of pixels changed")
    targets: Literal["random", "all"] = "random"
    max_samples: int | None = Field(100, ge=1, description="points attacked; ART's JSMA is slow on CPU")


class AutoAttackConfig(_Section):
    """AutoAttack (Croce & Hein, 2020) through the authors' package, L∞ at the attack ε."""

    version: Literal["standard", "plus", "rand"] = "standard"
    max_samples: int | None = Field(200, ge=1, description="points attacked (a prefix of them); None = all")
    batch_size: int | None = Field(None, ge=1, description="null = the device's default (services/method/batches.py)")


AttackName = Literal["fgsm", "pgd", "cw", "jsma", "autoattack", "ladder"]
ATTACK_NAMES: tuple[str, ...] = ("fgsm", "pgd", "cw", "jsma", "autoattack", "ladder")


class EvaluateConfig(_Section):
    """Stage 6: clean, white-box and black-box transfer accuracy of every model under every attack."""

    attacks: list[AttackName] = Field(list(ATTACK_NAMES), description="ladder: the vanilla model's own generator and boundary")
    settings: list[Literal["whitebox", "blackbox"]] = ["whitebox", "blackbox"]
    whitebox_attacks: list[AttackName] | None = Field(
        None, description="the attacks also run white-box on every model; None = all of `attacks` (the paper's "
                          "Table 2 is black-box only, with the LADDER attack white-box: [ladder])")
    attack: AttackConfig = AttackConfig()
    cw: CWConfig = CWConfig()
    jsma: JSMAConfig = JSMAConfig()
    autoattack: AutoAttackConfig = AutoAttackConfig()
    max_samples: int | None = Field(1000, ge=1, description="test points evaluated (stratified); None = all")
    batch_size: int | None = Field(None, ge=1, description="evaluation, attack and latent batches; null = the "
                                                         "device's default (services/method/batches.py)")
    surrogate_architecture: str = Field("auto", description="black-box model; auto = smallcnn (lenet for a smallcnn)")
    surrogate_epochs: int = Field(10, ge=1)
    surrogate_lr: float = Field(0.01, gt=0)
    surrogate_momentum: float = Field(0.9, ge=0, lt=1)

    @field_validator("surrogate_architecture")
    @classmethod
    def _known_architecture(cls, v: str) -> str:
        from services.method.models import available_architectures

        if v != "auto" and v not in available_architectures():
            raise ValueError(f"unknown architecture {v!r}; use auto, a zoo net or a torchvision builder name")
        return v

    @field_validator("attacks", "settings")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list without repeats")
        return v

    @model_validator(mode="after")
    def _whitebox_subset(self) -> "EvaluateConfig":
        if self.whitebox_attacks is not None and not set(self.whitebox_attacks) <= set(self.attacks):
            raise ValueError(f"whitebox_attacks must be a subset of attacks {self.attacks}")
        return self

    def runs(self, setting: str) -> list[str]:
        """The attacks run in a setting: `attacks` (black-box: the pixel attacks; white-box: `whitebox_attacks`)."""
        if setting not in self.settings:
            return []
        if setting == "blackbox":
            return [a for a in self.attacks if a != "ladder"]  # the LADDER attack needs the target's own generator
        return [a for a in self.attacks if self.whitebox_attacks is None or a in self.whitebox_attacks]


class BaselinesConfig(_Section):
    """The pixel-space defences compared on request, fine-tuned like LADDER (same epochs, lr, batch, data)."""

    eps: float = Field(0.3, gt=0, le=1, description="training ε (L∞)")
    pgd_steps: int = Field(10, ge=1, description="PGD steps per training batch (PGD-AT and TRADES' inner maximisation)")
    pgd_step_size: float | None = Field(None, gt=0, description="None = 2.5·eps/steps")
    fgsm_alpha: float = Field(0.5, ge=0, lt=1, description="FGSM-AT: weight of the clean loss (Goodfellow et al.: 0.5)")
    trades_beta: float = Field(6.0, gt=0, description="TRADES: weight of the KL term (Zhang et al.: 6)")


Variant = Literal["ladder_random", "ladder_cavrandom", "fgsm_at", "pgd_at", "trades", "trades_ladder"]
LADDER_VARIANTS = ("ladder_random", "ladder_cavrandom")
# the attack each model was trained on: its column is left out of the model's average rank (as in the paper)
TRAINED_ON: dict[str, str] = {"fgsm_at": "fgsm", "pgd_at": "pgd", "ladder": "ladder", "trades_ladder": "ladder"}


class SelectConfig(_Section):
    """Which checkpoint a fine-tuned model returns (services/method/select.py): off, the last epoch's; on, the
    most robust one on a validation split whose clean accuracy there stays within a budget of the uploaded model's."""

    max_clean_drop: float | None = Field(
        0.3, ge=0, le=100, description="points of validation clean accuracy a model may lose against the uploaded "
                                       "model; null = off: the last epoch's weights, no validation split")
    objective: Literal["transfer_pgd", "transfer_worst", "transfer_autoattack", "rank"] = Field(
        "transfer_pgd", description="chosen within the budget: the best validation accuracy under PGD transferred from "
                                    "the surrogate, the worse of transfer FGSM and PGD, transfer AutoAttack, or the best "
                                    "average rank among the model's checkpoints over clean accuracy and transfer FGSM, "
                                    "PGD and AutoAttack")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="of the training data, stratified; used by no "
                                                                      "stage's training and in no reported number")
    robust_points: int = Field(500, ge=10, description="validation points the transfer examples are crafted from")
    checks_per_epoch: int = Field(4, ge=1, le=100, description="checkpoints scored per epoch, evenly spaced in steps, "
                                                               "the last at the epoch's end")


class LadderConfig(_Section):
    """Everything a hardening run depends on. Defaults follow the paper unless method.md decides otherwise."""

    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="every random draw of the run derives from it (0 ≤ seed < 2**53)")
    latent_layer: str | None = Field(None, description="overrides the spec's latent_layer")
    variants: list[Variant] = Field([], description="models trained besides vanilla, control and ladder")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="stratified hold-out when no test data is given")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="arithmetic of generator training and fine-tuning steps: fp32; tf32 (TF32 matmuls and "
                            "convolutions, GPUs only); bf16 (bf16 autocast, also on the CPU). Attacks and evaluation "
                            "stay fp32. fp32 is the default until a GPU benchmark shows the others keep accuracy")
    boundary: BoundaryConfig = BoundaryConfig()
    generator: GeneratorConfig = GeneratorConfig()
    perturb: PerturbConfig = PerturbConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    select: SelectConfig = SelectConfig()

    @model_validator(mode="after")
    def _unique_variants(self) -> "LadderConfig":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must not repeat")
        return self
