"""Upper bounds on what a job may cost, checked when it is submitted (`check_bounds`).

LadderConfig's own validation says what is meaningful (epochs ≥ 1, fractions in [0, 1], …); these
maxima say what an operator lets one job spend, so that one tenant cannot hold every worker with
`finetune.epochs: 1e9`. Each is a setting (`LADDER_MAX_EPOCHS`, …, services/settings.py) that an
operator can raise. The defaults admit the paper's protocol (bench/paper_mnist.py: full MNIST,
every variant, CW and JSMA on 500 points against every target, AutoAttack on 1,000).

Not bounded here, on purpose:
- `generator.time_budget_s`: it can only stop the generator early (at `generator.max_epochs` the
  stage ends anyway, and that is bounded), so a large one costs nothing; it must be finite, as every
  number in a config must (LadderConfig refuses NaN and ±Infinity).
- `generator.patience`: it only stops training early, like the time budget.
- batch sizes and `boundary.attention_rank`: they change memory, not the amount of work, and each is
  capped by the data (a batch larger than the data set is the data set; the rank by the latent width).
- a sample count left at `null` ("all"), and an explicit one larger than the data: both mean the
  uploaded data's size, which the upload caps (`LADDER_MAX_DATA_BYTES`, …) bound.
"""

from typing import Any

from services.errors import InputError
from services.method.config import LadderConfig
from services.settings import Settings, get_settings

# (field of LadderConfig, the setting that bounds its value)
VALUE_LIMITS: tuple[tuple[str, str], ...] = (
    ("finetune.epochs", "max_epochs"),
    ("generator.max_epochs", "max_epochs"),
    ("evaluate.surrogate_epochs", "max_epochs"),
    ("boundary.samples_per_class", "max_samples"),
    ("boundary.holdout_per_class", "max_samples"),
    ("perturb.samples_per_class", "max_samples"),
    ("perturb.calibration_samples", "max_samples"),
    ("evaluate.max_samples", "max_samples"),
    ("evaluate.cw.max_samples", "max_samples"),
    ("evaluate.jsma.max_samples", "max_samples"),
    ("evaluate.autoattack.max_samples", "max_samples"),
    ("boundary.newton_steps", "max_steps"),
    ("boundary.attention_steps", "max_steps"),
    ("evaluate.attack.pgd_steps", "max_steps"),
    ("evaluate.cw.max_iter", "max_steps"),
    ("evaluate.cw.binary_search_steps", "max_steps"),
    ("baselines.pgd_steps", "max_steps"),
)
# (list field of LadderConfig, the setting that bounds its length)
COUNT_LIMITS: tuple[tuple[str, str], ...] = (
    ("perturb.eps", "max_eps_values"),  # each ε adds a copy of the source images to the adversarial set
    ("perturb.crossing_quantiles", "max_eps_values"),  # one calibrated ε each
    ("variants", "max_variants"),  # each variant is one more model fine-tuned and evaluated
)


def _field(config: LadderConfig, path: str) -> Any:
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _raise(setting: str) -> str:
    return f"an operator can raise the limit with LADDER_{setting.upper()}"


def check_bounds(config: LadderConfig, settings: Settings | None = None) -> None:
    """Refuse (InputError, 422) the first field of `config` above its maximum (under `settings`, default: the
    process's), in one line that names the field, its value, the limit and the setting that raises it."""
    settings = settings or get_settings()
    for path, setting in VALUE_LIMITS:
        value, limit = _field(config, path), getattr(settings, setting)
        if value is not None and value > limit:
            raise InputError(f"config: {path} = {value:,} is above the limit of {limit:,}; "
                             f"send at most {limit:,} ({_raise(setting)})")
    for path, setting in COUNT_LIMITS:
        value, limit = _field(config, path), getattr(settings, setting)
        if value is not None and len(value) > limit:
            raise InputError(f"config: {path} has {len(value):,} values, above the limit of {limit:,}; "
                             f"send at most {limit:,} ({_raise(setting)})")
