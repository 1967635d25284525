"""The run's report (docs/report.md) assembled from its stages' outputs, and the gallery of its page: generated
examples along the ε list. The page itself is services/report's."""

from typing import Any

import torch

from services.method import batches
from services.method.generator import fidelity
from services.method.latents import extract_latents
from services.method.perturb import directions, generate
from services.method.pipeline import AdversarialOutput, EvaluateOutput, FinetuneOutput, Run
from services.method.rank import report_ranks
from services.method.select import within
from services.method.stages import STAGES, stage_seed

REPORT_SCHEMA = "ladder.report/2"  # docs/report.md


def build_report(run: Run, stage_seconds: dict[str, float] | None = None, reused_seconds: dict[str, float] | None = None,
                 environment: dict[str, Any] | None = None) -> dict:
    """The evaluation report of the run (stage times: the run's own, unless given; `reused_seconds`: the time of
    the stages whose stored output a later attempt loaded, after a crash; `environment`: where it ran,
    services/environment.py)."""
    cfg, train, spec, split = run.cfg, run.train, run.spec, run.split
    boundary, gfit = run.output("boundary"), run.output("generator")
    z, adv, tuned, ev = run.output("latents"), run.output("adversarial"), run.output("finetune"), run.output("evaluate")
    hold = gfit.holdout_index
    return {
        "schema": REPORT_SCHEMA,
        "config": cfg.model_dump(mode="json"),
        "seeds": {"run": cfg.seed, **{s: stage_seed(cfg.seed, s) for s in STAGES}},
        **(environment or {}),
        "spec": spec.model_dump(mode="json"),
        "data": {"train": len(train), "test": len(run.test), "evaluated": ev.evaluation["n"]},
        "latent": {"layer": split.layer, "dim": split.dim},
        "stage_seconds": stage_seconds if stage_seconds is not None else run.seconds,
        "stage_reused_seconds": reused_seconds or {},
        "determinism": {  # numerics.setup; a stage that used an op torch has no deterministic version of is named
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "not_bit_exact": {s: ops for s in STAGES if (ops := run.store.notes(s).get("not_bit_exact"))},
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
            **fidelity(gfit.build().to(run.device), run.model, z[hold], train.x[hold], train.y[hold], train.x),
        },
        "calibration": calibration(run, adv),
        "finetune": {"loss": tuned.loss, "seconds": tuned.seconds},
        "surrogate": ev.surrogate,
        "evaluation": ev.evaluation,
        "models": ev.models,
        "average_rank": report_ranks(ev.models, ev.evaluation["settings"]),
        "selection": selection(run, tuned, ev),
    }


def calibration(run: Run, adv: AdversarialOutput) -> dict:
    """The ε list of the adversarial stage's output, with latent crossing and image flip rates per ε."""
    return {
        "mode": "raw" if run.cfg.perturb.eps is not None else "quantiles",
        "table": [
            {**row, "image_flip_rate": adv.examples["ladder"].image_flip_rate[i]}
            for i, row in enumerate(adv.calibration.table())
        ],
        "variant_crossing_rate": adv.variant_crossing_rate,
        "curve": {"eps": adv.calibration.grid_eps, "crossing_rate": adv.calibration.grid_crossing_rate},
        "examples": len(adv.examples["ladder"].y),
    }


def selection(run: Run, tuned: FinetuneOutput, ev: EvaluateOutput) -> dict | None:
    """Which checkpoint each fine-tuned model returns and why (select.py), and whether the budget also held on the
    test points; None when the selection is off."""
    if run.val is None or tuned.selection is None:
        return None
    sel = run.cfg.select
    assert sel.max_clean_drop is not None  # a validation set exists only under a budget
    vanilla = ev.models["vanilla"]["clean_accuracy"]
    on_test = {}
    for name in tuned.selection:
        drop = 100 * (vanilla - ev.models[name]["clean_accuracy"])
        on_test[name] = {"clean_drop_points": drop, "within_budget": within(drop, sel.max_clean_drop)}
    return {
        "max_clean_drop_points": sel.max_clean_drop, "objective": sel.objective,
        "validation": {"n": len(run.val), "robust_points": min(sel.robust_points, len(run.val)),
                       "source": "uploaded" if run.val_uploaded else "carved",
                       "fraction": None if run.val_uploaded else sel.validation_fraction},
        "seconds": tuned.selection_seconds,
        "models": tuned.selection,
        "on_test": on_test,
        "budget_held_on_test": all(t["within_budget"] for t in on_test.values()),
    }


def gallery(run: Run, pairs: int = 4) -> dict:
    """Generated examples along the ε list for a few (source → target) pairs of test images: the original,
    its reconstruction G(Φ(x)), then G(z + ε·β⊙d) for every ε (the paper's Fig. 7/10)."""
    boundary, gfit, adv = run.output("boundary"), run.output("generator"), run.output("adversarial")
    eps = adv.calibration.eps
    gen = torch.Generator().manual_seed(stage_seed(run.cfg.seed, "evaluate") + 202)
    classes = torch.randperm(run.spec.num_classes, generator=gen).tolist()
    picked = []  # (source, target, test index)
    for k in range(min(pairs, run.spec.num_classes)):
        s, t = classes[k], classes[(k + 1) % len(classes)]
        idx = (run.test.y == s).nonzero().squeeze(1)
        if len(idx):
            picked.append((s, t, int(idx[torch.randint(len(idx), (1,), generator=gen)])))
    if not picked:
        return {"eps": eps, "pairs": []}
    src, tgt, idx = (torch.tensor(c) for c in zip(*picked))
    x = run.test.x[idx]
    z = extract_latents(run.split, x, batches.latents(run.device))
    step = directions(boundary, z, src, tgt, "boundary", gen)
    rows = generate(gfit.build().to(run.device), run.model, z, src, tgt, step, [0.0, *eps]).x
    rows = rows.view(len(eps) + 1, len(x), *x.shape[1:])
    return {"eps": eps, "pairs": [{"source": s, "target": t, "images": torch.cat([x[k : k + 1], rows[:, k]]).numpy()}
                                  for k, (s, t, _) in enumerate(picked)]}
