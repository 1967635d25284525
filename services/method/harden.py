"""The method in one call: a model and its data in, every trained model, the report and its gallery out."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.method.config import LadderConfig
from services.method.data import ImageData
from services.method.models import Classifier, ModelSpec
from services.method.pipeline import Run, StageStore
from services.method.progress import Progress, silent
from services.method.report import build_report, gallery
from services.method.stages import STAGES


@dataclass
class HardenResult:
    """Every trained model (vanilla, control, ladder and variants), the report, and what generates its page's
    gallery (on demand: services/report.page runs it where a failure costs the page only)."""

    models: dict[str, Classifier]
    report: dict
    gallery: Callable[[], dict]


def harden(
    model: Classifier, spec: ModelSpec, train: ImageData, test: ImageData, config: LadderConfig,
    store: StageStore | None = None, progress: Progress = silent, validation: ImageData | None = None,
    environment: dict[str, Any] | None = None,
) -> HardenResult:
    """Run LADDER on `model` with its training data; evaluate vanilla, control, LADDER and variants on `test`;
    choose checkpoints on `validation` (else on a split of `train`) when select.max_clean_drop is set.
    `environment`: the report's record of where it ran (services/environment.py)."""
    run = Run(model, spec, train, test, config, store, progress, validation)
    run.output(STAGES[-1])
    return HardenResult(run.models(), build_report(run, environment=environment), lambda: gallery(run))
