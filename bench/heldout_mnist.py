"""The provider's case, end to end as a new user runs it: a vanilla LeNet trained on full MNIST by `ladder train`,
hardened through `ladder serve` + `ladder submit` on a 6,000-digit subset of its training data, and judged on the
whole 10,000-digit test set, which the job never sees.

    .venv/bin/python bench/heldout_mnist.py --seed 0 --max-clean-drop 0.3
        → bench/results/heldout_mnist.json and .md

1. `ladder train --data <MNIST IDX folder> --epochs 10 --seed S` (the paper's recipe) as a subprocess;
2. a stratified 6,000-digit subset of its 60,000 training digits (seeded), saved as the job's training data (no test
   data: the job holds out its own 20 %, and with a budget carves its validation split from the rest);
3. a fresh embedded `ladder serve` and `ladder submit` (subprocesses) with the config {"seed": S, "select":
   {"max_clean_drop": B}} (`--max-clean-drop none`: the service's default configuration with the seed);
4. the vanilla and the downloaded hardened weights on all 10,000 test digits: clean accuracy, the drop, and whether
   the budget held; FGSM and PGD (L∞ 0.3) crafted on an independent surrogate (SmallCNN, 10 epochs on the 60,000
   training digits, seeded apart from the job) on a class-balanced 1,000 of the test digits and transferred.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.service_job and tests.harness, when run as a script

from bench import service_job  # noqa: E402
from services.datasets import channels_first, load_npz, save_npz  # noqa: E402
from services.method.attacks import craft  # noqa: E402
from services.method.config import LadderConfig  # noqa: E402
from services.method.data import balanced_order, stratified_split  # noqa: E402
from services.method.evaluate import correct_rows, fraction, transfer_config  # noqa: E402
from services.method.finetune import accuracy  # noqa: E402
from services.method.models import ModelSpec, build_classifier  # noqa: E402
from services.method.pipeline import train_surrogate  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mnist"
SURROGATE_SEED = 7919  # the surrogate's own seed: independent of the job's


def threads_env(n: int) -> dict[str, str]:
    """The `ladder` commands' threads: more threads than free cores makes torch's barriers spin (many times slower)."""
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "LADDER_THREADS": str(n)}


def ladder(*args: str, log: Path, env: dict[str, str]) -> None:
    """A `ladder` command as a user runs it, with `env` added to ours; its output in `log`, which an error names."""
    with open(log, "w") as f:
        done = subprocess.run([str(ROOT / ".venv/bin/ladder"), *args], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **env}, cwd=ROOT)
    if done.returncode:
        sys.exit(f"ladder {args[0]} failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")


def transfer(models: dict, surrogate, x, y, seed: int) -> dict:
    """Each model's accuracy on FGSM and PGD examples crafted on the surrogate (a misclassified clean point counts
    as broken), as the report's black-box column is computed."""
    cfg = transfer_config(LadderConfig().evaluate).model_copy(update={"max_samples": None})
    out = {name: {} for name in models}
    for k, attack in enumerate(("fgsm", "pgd")):
        adv = craft(attack, surrogate, x, y, cfg, seed + k, 10).x
        for name, model in models.items():
            out[name][attack] = fraction(correct_rows(model, adv, y, 500) & correct_rows(model, x, y, 500))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a folder of MNIST IDX files")
    p.add_argument("--subset", type=int, default=6000, help="training digits the job gets")
    p.add_argument("--max-clean-drop", default="0.3", help="select.max_clean_drop in points, or none: the default")
    p.add_argument("--transfer-points", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heldout_mnist.json")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} is not a folder of MNIST IDX files (see ../shared/datasets/README.md)")
    torch.set_num_threads(args.threads)
    env = threads_env(args.threads)
    budget = None if args.max_clean_drop.lower() == "none" else float(args.max_clean_drop)
    wall = {}
    with tempfile.TemporaryDirectory(prefix="ladder-heldout-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        ladder("train", "--data", args.data, "--epochs", "10", "--seed", str(args.seed), "--out", str(work / "vanilla"),
               log=work / "train.log", env=env)
        wall["ladder train"] = time.perf_counter() - t
        train, test = (channels_first(load_npz(work / f"vanilla/{s}.npz", s)) for s in ("train", "test"))
        subset = stratified_split(train, args.subset / len(train), args.seed)[1]
        save_npz(subset, work / "subset.npz")
        config = {"seed": args.seed, **({} if budget is None else {"select": {"max_clean_drop": budget}})}
        (work / "config.json").write_text(json.dumps(config))

        t = time.perf_counter()
        server, key = service_job.start_embedded(env, work / "service-data", work / "serve.log")
        try:
            t_job = time.perf_counter()
            ladder("submit", "--server", server.url, "--key", key, "--model", str(work / "vanilla/model.safetensors"),
                   "--spec", str(work / "vanilla/spec.json"), "--train", str(work / "subset.npz"),
                   "--config", str(work / "config.json"), "--out", str(work / "job"), log=work / "submit.log", env=env)
            wall["ladder submit (upload to downloaded results)"] = time.perf_counter() - t_job
        finally:
            server.stop()
        wall["ladder serve + submit"] = time.perf_counter() - t
        report = json.loads((work / "job/report.json").read_text())
        submit_log = (work / "submit.log").read_text()

        spec = ModelSpec.model_validate_json((work / "vanilla/spec.json").read_text())
        models = {"vanilla": build_classifier(spec, load_file(str(work / "vanilla/model.safetensors"))).eval(),
                  "hardened": build_classifier(spec, load_file(str(work / "job/hardened.safetensors"))).eval()}

    t = time.perf_counter()
    clean = {name: accuracy(m, test.x, test.y) for name, m in models.items()}
    drop = 100 * (clean["vanilla"] - clean["hardened"])
    cfg = LadderConfig.model_validate({"seed": SURROGATE_SEED})
    surrogate, arch = train_surrogate(spec, train, cfg)
    points = test.subset(balanced_order(test.y, torch.Generator().manual_seed(args.seed))[:args.transfer_points])
    robust = transfer(models, surrogate, points.x, points.y, SURROGATE_SEED)
    wall["judging (whole test set, surrogate, transfer attacks)"] = time.perf_counter() - t

    sel = report.get("selection")
    result = {
        "schema": "ladder.heldout_mnist/1",
        "command": "bench/heldout_mnist.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "seed": args.seed,
        "max_clean_drop_points": budget,
        "data": {"vanilla_train": len(train), "job_train": len(subset), "test": len(test),
                 "transfer_points": len(points)},
        "full_test": {"clean": clean, "clean_drop_points": drop,
                      "within_budget": None if budget is None else drop <= budget + 1e-9},
        "transfer": {"surrogate": {"architecture": arch, "epochs": cfg.evaluate.surrogate_epochs, "seed": SURROGATE_SEED,
                                   "clean_accuracy": accuracy(surrogate, points.x, points.y)},
                     "eps": cfg.evaluate.attack.eps, "accuracy": robust},
        "job_report": {"test_points": report["evaluation"]["n"],
                       "clean": {k: report["models"][k]["clean_accuracy"] for k in report["models"]},
                       "selection": None if sel is None else {
                           k: {"chosen_epoch": m["chosen_epoch"], "why": m["why"]} for k, m in sel["models"].items()},
                       "budget_held_on_test": None if sel is None else sel["budget_held_on_test"]},
        "submit_output_tail": submit_log[-2000:],
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "goal": {"goal": "clean drop on the whole test set ≤ 0.3 points", "value": drop, "met": drop <= 0.3 + 1e-9},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [f"Seed {args.seed}; budget {budget if budget is not None else 'off (default config)'}; vanilla trained on "
             f"{len(train)} digits, the job given {len(subset)}; accuracy % on the whole {len(test)}-digit test set "
             f"(clean) and on {len(points)} of it (transfer from an independent {arch}, L∞ {cfg.evaluate.attack.eps}).",
             "", "| model | clean | transfer FGSM | transfer PGD |", "|---|---|---|---|"]
    for name in models:
        lines.append(f"| {name} | {pct(clean[name])} | {pct(robust[name]['fgsm'])} | {pct(robust[name]['pgd'])} |")
    lines += ["", f"Clean drop {drop:+.2f} points: goal ≤ 0.3 {'met' if result['goal']['met'] else 'NOT met'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
