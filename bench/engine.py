"""Engine benchmark: LADDER against PGD adversarial training on mnist5k, LeNet, CPU, 2 threads;
and the same job through the embedded service against `ladder harden`.

For each seed, in one process run:
1. train a vanilla LeNet for 10 epochs (the paper's recipe) on 4,000 mnist5k digits;
2. time the whole `ladder harden` command (the default configuration with the seed) as a
   subprocess, exactly as a user runs it, and read its report;
2b. run the same job (same weights, spec, train/test data and config file) through the embedded
   `ladder serve` over HTTP (bench/service_job.py), timed from the upload to the downloaded report;
   the server starts fresh for it and its start-up is recorded apart. The CLI runs first on even
   seeds, the service on odd ones. Both reports must give the same accuracies (same seed, CPU),
   else the script exits with an error after writing its results;
2c. time the same `ladder harden` with the clean-accuracy budget switched (`--budget`, 0.3 points, on if the
   config has it off, else off): `budget_cost_ratio` = with / without, in the same order-alternated run, and what
   the budget changed (the chosen checkpoints, the accuracies);
3. fine-tune the same vanilla weights with PGD-AT (Madry: L∞ ε = 0.3, 10 steps of 2.5ε/10,
   random start, adversarial loss only) on the job's training data (less its validation split, under a budget)
   for the same epochs, batch size and learning rate, returning its last weights (no selection);
4. evaluate PGD-AT against the same surrogate and the same transfer examples as the report
   (the surrogate is retrained from the run's seed; its accuracy must match the report's);
5. time generation (directions + G) against G's pure forward pass on the same latents.

Writes bench/results/engine.json and prints a markdown summary for docs/benchmarks.md.
Run:  .venv/bin/python bench/engine.py [--seeds 0 1 2] [--budget 0.3] [--config '{"finetune": {"alpha": 0.75}}' --out FILE]
Needs nothing running: the embedded server keeps its state (SQLite, artifacts) in the run's temp folder.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.service_job and tests.harness, when run as a script

from bench import service_job  # noqa: E402
from services.checkpoints import DirectoryStore  # noqa: E402
from services.datasets import mnist5k, save_npz  # noqa: E402
from services.method.attacks import pgd  # noqa: E402
from services.method.config import AttackConfig, LadderConfig  # noqa: E402
from services.method.data import stratified_split  # noqa: E402
from services.method.evaluate import evaluate  # noqa: E402
from services.method.finetune import accuracy, fit  # noqa: E402
from services.method.models import ModelSpec, build_classifier, net_weights  # noqa: E402
from services.method.perturb import directions, generate, random_targets  # noqa: E402
from services.method.pipeline import evaluation_points, train_surrogate, validation_split  # noqa: E402
from services.method.stages import stage_seed  # noqa: E402

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


# Both children get the same threads and device whatever the shell set: the ratio compares the code paths only.
CHILD_ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "LADDER_DEVICE": "cpu"}


def run_cli(run: Path, files: dict) -> dict:
    """The whole `ladder harden` command as a subprocess, as a user runs it: its wall time (Python start-up
    included) and its report."""
    started = time.perf_counter()
    subprocess.run(
        [str(ROOT / ".venv/bin/ladder"), "harden", "--model", str(files["model"]), "--spec", str(files["spec"]),
         "--train", str(files["train"]), "--test", str(files["test"]), "--config", str(files["config"]),
         "--out", str(run / "out")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **CHILD_ENV}, cwd=ROOT,
    )
    return {"seconds": time.perf_counter() - started, "report": json.loads((run / "out/report.json").read_text())}


def run_service(run: Path, files: dict) -> dict:
    """The same files through a fresh embedded `ladder serve` over HTTP: its start-up (until /readyz answers) apart
    from the job's wall time (upload to downloaded report); the report. Fails loudly if the job does not succeed."""
    started = time.perf_counter()
    server, key = service_job.start_embedded(CHILD_ENV, run / "service-data", run / "serve.log")
    start_seconds = time.perf_counter() - started
    try:
        job = service_job.run_job(server.url, key, files, run / "service-out")
    finally:
        server.stop()
    if not job["finished"]:
        raise RuntimeError(f"the service job did not finish: {job.get('why')}\n{server.tail()}")
    return {"seconds": job["wall_seconds"], "server_start_seconds": start_seconds, "report": job["report"]}


def _accuracies(report: dict) -> dict:
    """Every model's clean and per-attack accuracy, as "setting_attack" keys."""
    return {name: {"clean": m["clean_accuracy"], **{f"{s}_{a}": r["accuracy"] for s, attacks in m["attacks"].items()
                                                    for a, r in attacks.items()}}
            for name, m in report["models"].items()}


def run_seed(seed: int, work: Path, overrides: dict, budget: float | None) -> dict:
    """Everything for one seed; returns its raw numbers."""
    train, test = stratified_split(mnist5k(), 0.2, 0)
    torch.manual_seed(seed)
    vanilla = build_classifier(SPEC)
    fit(vanilla, train.x, train.y, epochs=10, lr=0.01, momentum=0.5, batch_size=64, seed=seed)
    run = work / f"seed{seed}"
    run.mkdir(parents=True)
    files = {"model": run / "vanilla.safetensors", "spec": run / "spec.json", "train": run / "train.npz",
             "test": run / "test.npz", "config": run / "config.json"}
    save_file(net_weights(vanilla), str(files["model"]))
    files["spec"].write_text(SPEC.model_dump_json())
    save_npz(train, files["train"])
    save_npz(test, files["test"])
    config = LadderConfig.model_validate({**overrides, "seed": seed})
    files["config"].write_text(config.model_dump_json())
    # the same command with the budget switched: on at `budget` points if the config has it off, else off
    other = config.model_copy(update={"select": config.select.model_copy(
        update={"max_clean_drop": budget if config.select.max_clean_drop is None else None})})
    budget_files = {**files, "config": run / "config-budget.json"}
    budget_files["config"].write_text(other.model_dump_json())
    # alternate the order, so whatever the first run warms (page cache, CPU clocks) favours neither side on average
    first = "cli" if seed % 2 == 0 else "service"
    if first == "cli":
        cli, service = run_cli(run, files), run_service(run, files)
        switched = run_cli(run / "budget", budget_files) if budget is not None else None
    else:
        switched = run_cli(run / "budget", budget_files) if budget is not None else None
        service, cli = run_service(run, files), run_cli(run, files)
    harden_seconds, report = cli["seconds"], cli["report"]
    service_stages = service["report"]["stage_seconds"]
    # the stages both reports timed; their sums compare the work itself, without uploads, polls or start-up
    common = [k for k in report["stage_seconds"] if k in service_stages]

    # what the job's stages trained on: the budget carves its validation split from `train` first
    stage_train = validation_split(train, None, config, SPEC.num_classes)[0]
    f = config.finetune
    attack = AttackConfig(eps=0.3, pgd_steps=10, pgd_early_stop=False)  # training: every step
    gen = torch.Generator().manual_seed(seed)
    pgd_at = copy.deepcopy(vanilla)
    started = time.perf_counter()
    fit(pgd_at, stage_train.x, stage_train.y, epochs=f.epochs, lr=f.lr, momentum=f.momentum, batch_size=f.batch_size, seed=seed,
        schedule=f.lr_schedule, alpha=0.0, craft=lambda m, x, y: pgd(m, x, y, None, attack, gen))
    pgd_at_seconds = time.perf_counter() - started

    surrogate, _ = train_surrogate(SPEC, stage_train, config)
    subset = evaluation_points(test, config)
    assert accuracy(surrogate, subset.x, subset.y) == report["surrogate"]["clean_accuracy"], "surrogate differs from the report's"
    pgd_at_eval = evaluate({"pgd_at": pgd_at}, surrogate, subset.x, subset.y, config.evaluate, stage_seed(seed, "evaluate"),
                           SPEC.num_classes)["models"]
    assert abs(accuracy(vanilla, subset.x, subset.y) - report["models"]["vanilla"]["clean_accuracy"]) < 1e-12

    ladder_seconds = sum(report["stage_seconds"][s] for s in LADDER_STAGES) + report["finetune"]["seconds"]["ladder"]
    models = {**report["models"], **pgd_at_eval}
    cli_acc, service_acc = _accuracies(report), _accuracies(service["report"])
    return {
        "seed": seed,
        "harden_seconds": harden_seconds,
        "first": first,
        "service_job_seconds": service["seconds"],
        "service_server_start_seconds": service["server_start_seconds"],
        "service_vs_cli_cpu": service["seconds"] / harden_seconds,
        "service_vs_cli_stage_sum": sum(service_stages[k] for k in common) / sum(report["stage_seconds"][k] for k in common),
        "compared_stages": common,
        "reports_agree": cli_acc == service_acc,
        # kept only when they differ: the evidence for main()'s error
        **({} if cli_acc == service_acc else {"service_models": service_acc}),
        "stage_seconds": report["stage_seconds"],
        "service_stage_seconds": service_stages,
        "finetune_seconds": report["finetune"]["seconds"],
        "ladder_seconds": ladder_seconds,
        "pgd_at_seconds": pgd_at_seconds,
        "ladder_vs_pgd_at_time_ratio": ladder_seconds / pgd_at_seconds,
        "throughput": _throughput(run / "out", report, vanilla, stage_train, seed),
        "generator": report["generator"],
        "calibration": report["calibration"]["table"],
        "surrogate": report["surrogate"],
        "models": _accuracies({"models": models}),
        **({} if switched is None else {"budget": _budget_leg(cli, switched, config.select.max_clean_drop is None)}),
    }


def _budget_leg(cli: dict, switched: dict, switched_on: bool) -> dict:
    """The same `ladder harden` with the clean-accuracy budget on against off: the wall-time ratio (the cost of the
    validation passes, less the work the smaller training split saves) and what the budget changed."""
    on, off = (switched, cli) if switched_on else (cli, switched)
    sel = on["report"]["selection"]
    return {
        "max_clean_drop_points": sel["max_clean_drop_points"],
        "on_seconds": on["seconds"], "off_seconds": off["seconds"],
        "budget_cost_ratio": on["seconds"] / off["seconds"],
        "selection_seconds": sel["seconds"],
        "chosen_epoch": {k: m["chosen_epoch"] for k, m in sel["models"].items()},
        "budget_held_on_test": sel["budget_held_on_test"],
        "stage_seconds_on": on["report"]["stage_seconds"], "finetune_seconds_on": on["report"]["finetune"]["seconds"],
        "models_on": _accuracies(on["report"]), "models_off": _accuracies(off["report"]),
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
    per_run = {
        "harden_seconds": [r["harden_seconds"] for r in runs],
        "service_job_seconds": [r["service_job_seconds"] for r in runs],
        "service_vs_cli_cpu": [r["service_vs_cli_cpu"] for r in runs],
        "service_vs_cli_stage_sum": [r["service_vs_cli_stage_sum"] for r in runs],
        "service_server_start_seconds": [r["service_server_start_seconds"] for r in runs],
        "ladder_vs_pgd_at_time_ratio": [r["ladder_vs_pgd_at_time_ratio"] for r in runs],
        "generation_vs_forward_throughput": [r["throughput"]["ratio"] for r in runs],
        "clean_accuracy_delta_vs_control": clean_delta,
        "transfer_pgd_accuracy_delta_vs_control": pgd_delta,
    }
    if all("budget" in r for r in runs):
        b = lambda f: [f(r["budget"]) for r in runs]  # noqa: E731
        per_run.update(
            budget_cost_ratio=b(lambda r: r["budget_cost_ratio"]),
            budget_clean_delta_vs_control=b(lambda r: 100 * (r["models_on"]["ladder"]["clean"] - r["models_on"]["control"]["clean"])),
            budget_ladder_clean_delta_vs_vanilla=b(
                lambda r: 100 * (r["models_on"]["ladder"]["clean"] - r["models_on"]["vanilla"]["clean"])),
            budget_transfer_pgd_delta_vs_vanilla=b(
                lambda r: 100 * (r["models_on"]["ladder"]["blackbox_pgd"] - r["models_on"]["vanilla"]["blackbox_pgd"])))
    return {
        **{k: statistics.fmean(v) for k, v in per_run.items()},
        "reports_agree": all(r["reports_agree"] for r in runs),
        "spread": {k: _stats(v) for k, v in per_run.items()},
        "models": models,
        "stage_seconds": {s: _stats([r["stage_seconds"][s] for r in runs]) for s in runs[0]["stage_seconds"]},
        "service_stage_seconds": {s: _stats([r["service_stage_seconds"][s] for r in runs])
                                  for s in runs[0]["service_stage_seconds"]},
    }


def markdown(summary: dict) -> str:
    """The tables for docs/benchmarks.md."""
    s = summary["spread"]
    f = lambda k, unit="": f"{s[k]['mean']:.2f}{unit} ± {s[k]['std']:.2f} (min {s[k]['min']:.2f}, max {s[k]['max']:.2f})"  # noqa: E731
    lines = [
        "| measure | mean ± std over seeds |", "|---|---|",
        f"| whole `ladder harden`, seconds | {f('harden_seconds')} |",
        f"| same job through the embedded service (upload → downloaded report), seconds | {f('service_job_seconds')} |",
        f"| service / `ladder harden` wall time (target ≤ 1.1) | {f('service_vs_cli_cpu')} |",
        f"| service / `ladder harden`, sum of the report's stage times | {f('service_vs_cli_stage_sum')} |",
        f"| embedded server start-up (not in the job's time), seconds | {f('service_server_start_seconds')} |",
        f"| LADDER / PGD-AT wall time | {f('ladder_vs_pgd_at_time_ratio')} |",
        f"| generation / pure G forward throughput | {f('generation_vs_forward_throughput')} |",
        f"| LADDER − control, clean accuracy (points) | {f('clean_accuracy_delta_vs_control')} |",
        f"| LADDER − control, transfer PGD accuracy (points) | {f('transfer_pgd_accuracy_delta_vs_control')} |",
    ]
    if "budget_cost_ratio" in s:
        lines += [
            f"| `ladder harden` with / without the clean-accuracy budget, wall time (target ≤ 1.15) | {f('budget_cost_ratio')} |",
            f"| with the budget: LADDER − control, clean accuracy (points) | {f('budget_clean_delta_vs_control')} |",
            f"| with the budget: LADDER − vanilla, clean accuracy (points) | {f('budget_ladder_clean_delta_vs_vanilla')} |",
            f"| with the budget: LADDER − vanilla, transfer PGD accuracy (points) | {f('budget_transfer_pgd_delta_vs_vanilla')} |",
        ]
    lines += ["", "| model | clean | transfer FGSM | transfer PGD | white-box FGSM | white-box PGD |", "|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        cell = lambda k, m=m: f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}"  # noqa: E731
        lines.append(f"| {name} | {cell('clean')} | {cell('blackbox_fgsm')} | {cell('blackbox_pgd')} | "
                     f"{cell('whitebox_fgsm')} | {cell('whitebox_pgd')} |")
    lines += ["", "| stage | `ladder harden` seconds | service seconds |", "|---|---|---|"]
    service = summary["service_stage_seconds"]
    cell = lambda v: "n/a" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"  # noqa: E731
    for k in [*summary["stage_seconds"], *(k for k in service if k not in summary["stage_seconds"])]:
        lines.append(f"| {k} | {cell(summary['stage_seconds'].get(k))} | {cell(service.get(k))} |")
    return "\n".join(lines)


def main() -> None:
    """Run every seed, then write the JSON and print the markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=json.loads, default={}, help="LadderConfig overrides as JSON (default: none)")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="also run `ladder harden` with select.max_clean_drop at this many points (or off, if the "
                             "config sets it), for budget_cost_ratio; a negative value skips it")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/engine.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(seed, Path(tmp), args.config, None if args.budget < 0 else args.budget))
            r = runs[-1]
            print(f"seed {seed}: harden {r['harden_seconds']:.0f}s, service {r['service_job_seconds']:.0f}s "
                  f"(×{r['service_vs_cli_cpu']:.3f}, {r['first']} first), reports agree: {r['reports_agree']}",
                  file=sys.stderr, flush=True)
    summary = summarise(runs)
    result = {
        "command": " ".join(["python bench/engine.py --seeds", *map(str, args.seeds), "--budget", str(args.budget)]
                            + ([f"--config '{json.dumps(args.config)}'"] if args.config else [])),
        "date": time.strftime("%Y-%m-%d"),
        "config_overrides": args.config,
        "config": LadderConfig.model_validate(args.config).model_dump(mode="json"),  # each run's seed is its own
        "machine": {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        **summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(summary))
    if not summary["reports_agree"]:  # after writing: the numbers that disagree are in the file
        differ = [r["seed"] for r in runs if not r["reports_agree"]]
        sys.exit(f"the service's report and `ladder harden`'s give different accuracies for seeds {differ}; "
                 f"compare runs[].models with runs[].service_models in {args.out}")


if __name__ == "__main__":
    main()
