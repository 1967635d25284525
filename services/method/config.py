"""The method's configuration: one validated model with the paper's defaults (method.md).

Every number a run depends on lives here, so that a report that echoes `LadderConfig.model_dump()`
together with its seed is enough to repeat the run.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        [0.1, 0.25, 0.5, 0.75, 0.9], description="calibrated ε: where these fractions of latents cross"
    )
    calibration_samples: int = Field(2000, ge=10)
    samples_per_class: int | None = Field(None, ge=1, description="source images per class; None = all")
    batch_size: int = Field(1024, ge=1)
    cav_noise: float = Field(0.01, gt=0, description="LADDER_cavRandom: β ⊙ (d + N(0, I)·noise) (authors: /100)")

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
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_size: int = Field(64, ge=1)
    alpha: float = Field(0.5, ge=0, le=1, description="1.0 = the clean-only control")


class AttackConfig(_Section):
    """L∞ attacks in [0,1] pixel space."""

    eps: float = Field(0.3, gt=0, le=1, description="paper: 0.3 on MNIST")
    pgd_steps: int = Field(40, ge=1, description="Madry et al. (MNIST): 40")
    pgd_step_size: float | None = Field(None, gt=0, description="None = 2.5·eps/steps (Madry et al.)")
    pgd_random_start: bool = True


class EvaluateConfig(_Section):
    """Stage 6: clean, white-box and black-box transfer accuracy of every model."""

    attacks: list[Literal["fgsm", "pgd"]] = ["fgsm", "pgd"]
    attack: AttackConfig = AttackConfig()
    max_samples: int | None = Field(1000, ge=1, description="test points evaluated (stratified); None = all")
    batch_size: int = Field(500, ge=1)
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


class LadderConfig(_Section):
    """Everything a hardening run depends on. Defaults follow the paper unless method.md decides otherwise."""

    seed: int = Field(0, ge=0)
    latent_layer: str | None = Field(None, description="overrides the spec's latent_layer")
    variants: list[Literal["ladder_random", "ladder_cavrandom"]] = []
    test_fraction: float = Field(0.2, gt=0, lt=1, description="stratified hold-out when no test data is given")
    boundary: BoundaryConfig = BoundaryConfig()
    generator: GeneratorConfig = GeneratorConfig()
    perturb: PerturbConfig = PerturbConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _unique_variants(self) -> "LadderConfig":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must not repeat")
        return self
