"""Engine benchmark: LADDER against PGD adversarial training on mnist5k, LeNet, CPU, 2 threads.

For each seed, in one process run:
1. train a vanilla LeNet for 10 epochs (the paper's recipe) on 4,000 mnist5k digits;
2. time the whole `ladder harden` command (default configuration, basic evaluation) as a
   subprocess, exactly as a user runs it, and read its report;
3. fine-tune the same vanilla weights with PGD-AT (Madry: L∞ ε = 0.3, 10 steps of 2.5ε/10,
   random start, adversarial loss only) for the same epochs, batch size and learning rate;
4. evaluate PGD-AT against the same surrogate and the same transfer examples as the report
   (the surrogate is retrained from the run's seed; its accuracy must match the report's);
5. time generation (directions + G) against G's pure forward pass on the same latents.

Writes bench/results/engine.json and prints a markdown summary for docs/benchmarks.md.
Run:  .venv/bin/python bench/engine.py [--seeds 0 1 2] [--config '{"finetune": {"alpha": 0.75}}' --out FILE]
"""

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.checkpoints import DirectoryStore
from services.datasets import mnist5k, save_npz, stratified_split
from services.method.attacks import pgd
from services.method.config import AttackConfig, LadderConfig
from services.method.evaluate import evaluate
from services.method.finetune import accuracy, fit
from services.method.models import ModelSpec, build_classifier, net_weights
from services.method.perturb import directions, generate, random_targets
from services.method.pipeline import evaluation_points, stage_seed, train_surrogate

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])
LADDER_STAGES = ("latents", "boundary", "generator", "adversarial")


def _throughput(run_dir: Path, report: dict, model, train, seed: int) -> dict:
    """Generation (directions + G) against G's pure forward pass on the same latents, images per second."""
    stages = next((run_dir / "stages").iterdir())
    store = DirectoryStore(stages)
    z, boundary, gfit = store.load("latents"), store.load("boundary"), store.load("generator")
    g = gfit.build()
    eps = [row["eps"] for row in report["calibration"]["table"]]
    gen = torch.Generator().manual_seed(seed)
    targets = random_targets(train.y, 10, gen)
    started = time.perf_counter()
    step = directions(boundary, z, train.y, targets, "boundary", gen)
    generate(g, model, z, train.y, targets, step, eps, batch_size=1024)
    generation = time.perf_counter() - started
    shifted = torch.cat([z + e * step for e in eps])
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(shifted), 1024):
            g(shifted[i : i + 1024])
    forward = time.perf_counter() - started
    n = len(shifted)
    return {"images": n, "generation_per_s": n / generation, "forward_per_s": n / forward, "ratio": forward / generation}


def run_seed(seed: int, work: Path, overrides: dict) -> dict:
    """Everything for one seed; returns its raw numbers."""
    train, test = stratified_split(mnist5k(), 0.2, 0)
    torch.manual_seed(seed)
    vanilla = build_classifier(SPEC)
    fit(vanilla, train.x, train.y, epochs=10, lr=0.01, momentum=0.5, batch_size=64, seed=seed)
    run = work / f"seed{seed}"
    run.mkdir(parents=True)
    save_file(net_weights(vanilla), str(run / "vanilla.safetensors"))
    (run / "spec.json").write_text(SPEC.model_dump_json())
    save_npz(train, run / "train.npz")
    save_npz(test, run / "test.npz")
    config = LadderConfig.model_validate({**overrides, "seed": seed})
    (run / "config.json").write_text(config.model_dump_json())
    started = time.perf_counter()
    subprocess.run(
        [str(ROOT / ".venv/bin/ladder"), "harden", "--model", str(run / "vanilla.safetensors"), "--spec", str(run / "spec.json"),
         "--train", str(run / "train.npz"), "--test", str(run / "test.npz"), "--config", str(run / "config.json"),
         "--out", str(run / "out")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    harden_seconds = time.perf_counter() - started
    report = json.loads((run / "out/report.json").read_text())

    f = config.finetune
    attack = AttackConfig(eps=0.3, pgd_steps=10, pgd_early_stop=False)  # training: every step
    gen = torch.Generator().manual_seed(seed)
    pgd_at = copy.deepcopy(vanilla)
    started = time.perf_counter()
    fit(pgd_at, train.x, train.y, epochs=f.epochs, lr=f.lr, momentum=f.momentum, batch_size=f.batch_size, seed=seed,
        schedule=f.lr_schedule, alpha=0.0, craft=lambda m, x, y: pgd(m, x, y, None, attack, gen))
    pgd_at_seconds = time.perf_counter() - started

    surrogate, _ = train_surrogate(SPEC, train, config)
    subset = evaluation_points(test, config)
    assert accuracy(surrogate, subset.x, subset.y) == report["surrogate"]["clean_accuracy"], "surrogate differs from the report's"
    pgd_at_eval = evaluate({"pgd_at": pgd_at}, surrogate, subset.x, subset.y, config.evaluate, stage_seed(seed, "evaluate"),
                           SPEC.num_classes)["models"]
    assert abs(accuracy(vanilla, subset.x, subset.y) - report["models"]["vanilla"]["clean_accuracy"]) < 1e-12

    ladder_seconds = sum(report["stage_seconds"][s] for s in LADDER_STAGES) + report["finetune"]["seconds"]["ladder"]
    models = {**report["models"], **pgd_at_eval}
    return {
        "seed": seed,
        "harden_seconds": harden_seconds,
        "stage_seconds": report["stage_seconds"],
        "finetune_seconds": report["finetune"]["seconds"],
        "ladder_seconds": ladder_seconds,
        "pgd_at_seconds": pgd_at_seconds,
        "ladder_vs_pgd_at_time_ratio": ladder_seconds / pgd_at_seconds,
        "throughput": _throughput(run / "out", report, vanilla, train, seed),
        "generator": report["generator"],
        "calibration": report["calibration"]["table"],
        "surrogate": report["surrogate"],
        "models": {
            name: {"clean": m["clean_accuracy"], **{f"{s}_{a}": r["accuracy"] for s, attacks in m["attacks"].items() for a, r in attacks.items()}}
            for name, m in models.items()
        },
    }


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    """Means and spreads over seeds, with the headline keys."""
    pts = lambda f: [100 * f(r) for r in runs]  # noqa: E731 — accuracy deltas in points
    clean_delta = pts(lambda r: r["models"]["ladder"]["clean"] - r["models"]["control"]["clean"])
    pgd_delta = pts(lambda r: r["models"]["ladder"]["blackbox_pgd"] - r["models"]["control"]["blackbox_pgd"])
    models = {name: {k: _stats([r["models"][name][k] for r in runs]) for k in runs[0]["models"][name]}
              for name in runs[0]["models"]}
    return {
        "harden_seconds": statistics.fmean(r["harden_seconds"] for r in runs),
        "ladder_vs_pgd_at_time_ratio": statistics.fmean(r["ladder_vs_pgd_at_time_ratio"] for r in runs),
        "generation_vs_forward_throughput": statistics.fmean(r["throughput"]["ratio"] for r in runs),
        "clean_accuracy_delta_vs_control": statistics.fmean(clean_delta),
        "transfer_pgd_accuracy_delta_vs_control": statistics.fmean(pgd_delta),
        "spread": {
            "harden_seconds": _stats([r["harden_seconds"] for r in runs]),
            "ladder_vs_pgd_at_time_ratio": _stats([r["ladder_vs_pgd_at_time_ratio"] for r in runs]),
            "generation_vs_forward_throughput": _stats([r["throughput"]["ratio"] for r in runs]),
            "clean_accuracy_delta_vs_control": _stats(clean_delta),
            "transfer_pgd_accuracy_delta_vs_control": _stats(pgd_delta),
        },
        "models": models,
        "stage_seconds": {s: _stats([r["stage_seconds"][s] for r in runs]) for s in runs[0]["stage_seconds"]},
    }


def markdown(summary: dict) -> str:
    """The tables for docs/benchmarks.md."""
    s = summary["spread"]
    f = lambda k, unit="": f"{s[k]['mean']:.2f}{unit} ± {s[k]['std']:.2f} (min {s[k]['min']:.2f}, max {s[k]['max']:.2f})"  # noqa: E731
    lines = [
        "| measure | mean ± std over seeds |", "|---|---|",
        f"| whole `ladder harden`, seconds | {f('harden_seconds')} |",
        f"| LADDER / PGD-AT wall time | {f('ladder_vs_pgd_at_time_ratio')} |",
        f"| generation / pure G forward throughput | {f('generation_vs_forward_throughput')} |",
        f"| LADDER − control, clean accuracy (points) | {f('clean_accuracy_delta_vs_control')} |",
        f"| LADDER − control, transfer PGD accuracy (points) | {f('transfer_pgd_accuracy_delta_vs_control')} |",
        "", "| model | clean | transfer FGSM | transfer PGD | white-box FGSM | white-box PGD |", "|---|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        cell = lambda k: f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}"  # noqa: E731
        lines.append(f"| {name} | {cell('clean')} | {cell('blackbox_fgsm')} | {cell('blackbox_pgd')} | "
                     f"{cell('whitebox_fgsm')} | {cell('whitebox_pgd')} |")
    lines += ["", "| stage | seconds (mean ± std) |", "|---|---|"]
    lines += [f"| {k} | {v['mean']:.1f} ± {v['std']:.1f} |" for k, v in summary["stage_seconds"].items()]
    return "\n".join(lines)


def main() -> None:
    """Run every seed, then write the JSON and print the markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=json.loads, default={}, help="LadderConfig overrides as JSON (default: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/engine.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(seed, Path(tmp), args.config))
            print(f"seed {seed}: harden {runs[-1]['harden_seconds']:.0f}s", file=sys.stderr, flush=True)
    summary = summarise(runs)
    result = {
        "command": " ".join(["python bench/engine.py --seeds", *map(str, args.seeds)]
                            + ([f"--config '{json.dumps(args.config)}'"] if args.config else [])),
        "config_overrides": args.config,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        **summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
