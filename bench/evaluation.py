"""Evaluation benchmark: our PGD against ART's and plain loops, and the evaluation stage of a default job.

    .venv/bin/python bench/evaluation.py            # → bench/results/evaluation.json

Part 1 times PGD-L∞ (ε = 0.3, 40 steps of 0.01875, random start) on the same 1,000 mnist5k test
digits and the same trained LeNet, in one process, alternating the implementations and taking
the median of the repeats:
  - ours: services.method.attacks.pgd through craft (batches of 500), as the evaluation runs it:
    a point stops at its first misclassified iterate (`pgd_early_stop`, the default);
  - ours, textbook: the same with `pgd_early_stop: false`, every point takes all 40 steps;
  - ART: ProjectedGradientDescentPyTorch (batch 500, one random init);
  - torchattacks-style: the loop of torchattacks' PGD.forward (3.5.1), written out here because the
    package pins requests 2.25 and would break the service's dependencies: clone, detach and
    requires_grad per step, torch.autograd.grad on the input, batches of 500;
  - plain loop: the textbook loop, loss.backward() on a leaf input (parameter gradients are
    computed too), batches of 500.
It also checks that the four reach similar robust accuracy (same attack, different random starts).

Part 2 runs a default `ladder harden` job on mnist5k (4,000 train / 1,000 test, the default
configuration: vanilla, control and LADDER, every attack in both settings) and records the
evaluate stage's wall time, its share of the whole job, and the time per attack.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.datasets import mnist5k  # noqa: E402
from services.method.attacks import art_classifier, craft, pgd_step  # noqa: E402
from services.method.config import EvaluateConfig, LadderConfig  # noqa: E402
from services.method.data import stratified_split  # noqa: E402
from services.method.finetune import accuracy, fit  # noqa: E402
from services.method.models import ModelSpec, build_classifier  # noqa: E402
from services.method.pipeline import Run  # noqa: E402
from services.method.report import build_report  # noqa: E402
from services.method.stages import STAGES  # noqa: E402

EPS, STEPS = 0.3, 40
STEP = pgd_step(EPS, STEPS)
BATCH = 500


def plain_pgd(model, x, y, gen):
    """The textbook loop: a leaf input, loss.backward() (parameter gradients too), sign step, projection."""
    out = []
    for i in range(0, len(x), BATCH):
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        adv = (xb + EPS * (torch.rand(xb.shape, generator=gen) * 2 - 1)).clamp(0, 1)
        for _ in range(STEPS):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), yb)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                adv = adv + STEP * adv.grad.sign()
                adv = torch.min(torch.max(adv, xb - EPS), xb + EPS).clamp(0, 1)
        out.append(adv.detach())
    return torch.cat(out)


def torchattacks_pgd(model, x, y, gen):
    """torchattacks.PGD.forward's loop (v3.5.1): per step, clone/detach, requires_grad, autograd.grad on the input."""
    out = []
    for i in range(0, len(x), BATCH):
        images, labels = x[i : i + BATCH].clone().detach(), y[i : i + BATCH].clone().detach()
        adv = images.clone().detach()
        adv = adv + torch.empty_like(adv).uniform_(-EPS, EPS, generator=gen)
        adv = torch.clamp(adv, min=0, max=1).detach()
        for _ in range(STEPS):
            adv.requires_grad = True
            cost = F.cross_entropy(model(adv), labels)
            grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
            adv = adv.detach() + STEP * grad.sign()
            delta = torch.clamp(adv - images, min=-EPS, max=EPS)
            adv = torch.clamp(images + delta, min=0, max=1).detach()
        out.append(adv)
    return torch.cat(out)


def time_pgd(model, spec, x, y, repeats: int) -> dict:
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    cfg = EvaluateConfig(attack={"eps": EPS, "pgd_steps": STEPS}, batch_size=BATCH)
    textbook = EvaluateConfig(attack={"eps": EPS, "pgd_steps": STEPS, "pgd_early_stop": False}, batch_size=BATCH)
    art = ProjectedGradientDescentPyTorch(art_classifier(model, spec.input_shape, spec.num_classes), norm=float("inf"),
                                          eps=EPS, eps_step=STEP, max_iter=STEPS, num_random_init=1, batch_size=BATCH,
                                          verbose=False)
    xn, yn = x.numpy(), y.numpy()
    impls = {
        "ours": lambda: craft("pgd", model, x, y, cfg, 0, spec.num_classes).x,
        "ours_textbook": lambda: craft("pgd", model, x, y, textbook, 0, spec.num_classes).x,
        "art": lambda: torch.from_numpy(art.generate(xn, y=yn)),
        "torchattacks_style": lambda: torchattacks_pgd(model, x, y, torch.Generator().manual_seed(0)),
        "plain_loop": lambda: plain_pgd(model, x, y, torch.Generator().manual_seed(0)),
    }
    seconds = {k: [] for k in impls}
    robust = {}
    model.eval()
    for _ in range(repeats):
        for name, fn in impls.items():  # interleaved, so drifts of the shared machine hit every implementation
            started = time.perf_counter()
            adv = fn()
            seconds[name].append(time.perf_counter() - started)
            robust[name] = accuracy(model, adv, y)
            assert (adv - x).abs().max() <= EPS + 1e-5 and adv.min() >= 0 and adv.max() <= 1, name
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "points": len(x), "eps": EPS, "steps": STEPS, "step_size": STEP, "batch_size": BATCH, "repeats": repeats,
        "seconds": seconds, "median_seconds": median, "robust_accuracy": robust,
        "speedup_vs": {k: median[k] / median["ours"] for k in impls if k != "ours"},
    }


def default_job(model, spec, train, test) -> dict:
    run = Run(model, spec, train, test, LadderConfig())
    started = time.perf_counter()
    run.output(STAGES[-1])
    total = time.perf_counter() - started
    report = build_report(run)
    return {
        "stage_seconds": run.seconds, "total_seconds": total, "evaluate_seconds": run.seconds["evaluate"],
        "evaluate_share": run.seconds["evaluate"] / total,
        "attack_seconds": report["evaluation"]["seconds"],
        "subsets": {a: report["models"]["vanilla"]["attacks"]["whitebox"][a]["n"] for a in report["evaluation"]["attacks"]},
        "autoattack": report["evaluation"].get("autoattack"),
        "accuracy": {name: {"clean": m["clean_accuracy"],
                            **{f"{s}.{a}": e["accuracy"] for s, attacks in m["attacks"].items() for a, e in attacks.items()},
                            **{f"worst.{s}": w["accuracy"] for s, w in m["worst_case"].items()}}
                     for name, m in report["models"].items()},
        "average_rank": report["average_rank"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-job", action="store_true", help="only the PGD timing")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluation.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = stratified_split(mnist5k(), 0.2, 0)
    spec = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])
    torch.manual_seed(0)
    model = build_classifier(spec)
    fit(model, train.x, train.y, epochs=10, lr=0.01, momentum=0.5, batch_size=64, seed=0)
    print(f"vanilla LeNet: clean accuracy {accuracy(model, test.x, test.y):.4f}", flush=True)
    pgd = time_pgd(model, spec, test.x, test.y, args.repeats)
    print(json.dumps(pgd["median_seconds"]), json.dumps(pgd["speedup_vs"]), flush=True)
    result = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu"},
        "pgd": pgd, "pgd_speedup_vs_art": pgd["speedup_vs"]["art"],
        "pgd_speedup_vs_art_textbook": pgd["median_seconds"]["art"] / pgd["median_seconds"]["ours_textbook"],
    }
    if not args.skip_job:
        job = default_job(model, spec, train, test)
        print(json.dumps(job["stage_seconds"]), flush=True)
        result.update(default_job=job, default_evaluation_seconds=job["evaluate_seconds"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
