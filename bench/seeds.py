"""The spread over seeds of bench/paper_mnist.py or bench/ladder_recipes.py results: mean ± sample standard
deviation per model and column.

    .venv/bin/python bench/seeds.py bench/results/paper_mnist{,_seed1}.json
    .venv/bin/python bench/seeds.py bench/results/ladder_recipes_gpu_seed{0,1,2}.json
    .venv/bin/python bench/seeds.py --models vanilla,control,ladder bench/results/paper_mnist{,_seed1,_seed2}.json
        → a markdown table on stdout (docs/paper-reproduction.md quotes them)

Every file must come from the same protocol (the same command but the seed): the script refuses a mix. With
--models, full runs and --core runs may be mixed: only the named models are compared, without the average rank
(it depends on which models are ranked) and the goals that need it.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_mnist import NAMES  # noqa: E402

COLUMNS = [("clean", None), ("FGSM", "fgsm"), ("JSMA", "jsma"), ("PGD", "pgd"), ("CW", "cw"), ("AutoAttack", "autoattack")]


def cell(model: dict, attack: str | None) -> float | None:
    """Accuracy in % of one column (None: the attack the model was trained on, or not run)."""
    if attack is None:
        return 100 * model["clean_accuracy"]
    entry = model["attacks"]["blackbox"].get(attack)
    return None if entry is None or model.get("trained_on") == attack else 100 * entry["accuracy"]


def spread(values: list[float | None], digits: int = 2) -> str:
    """'mean ± sd' over the seeds ('–' when a seed has no value)."""
    if any(v is None for v in values):
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def protocol_key(result: dict, models: list[str] | None = None) -> dict:
    """What must be equal across the seeds' files: the protocol, the configuration but its seed (attack caps,
    random_share, …), the device's kind and the models compared (with `models`: those models, whatever else the
    files trained)."""
    skip = {"seed"} if models is None else {"seed", "variants"}  # a --core run trains no variants
    key = {"protocol": result["protocol"], "config": {k: v for k, v in result.get("config", {}).items() if k not in skip},
           "device": result["machine"].get("device", "cpu")}
    if models is None:
        return {**key, "models": sorted(result["models"]), "extra": sorted(result.get("extra_models", {}))}
    key["protocol"] = {k: v for k, v in result["protocol"].items() if k != "raw_eps"}  # None in a --core run
    return {**key, "models": [m for m in models if m in result["models"]]}


def table(results: list[dict], models: list[str] | None = None) -> str:
    """Per model: every column and the average rank as mean ± sd; then LADDER − vanilla and the goals per seed.
    With `models`: those models only, and no rank (nor the goals that need one)."""
    seeds = [r["seed"] for r in results]
    head = [c for c, _ in COLUMNS] + ["LADDER attack (white-box)"] + (["avg rank"] if models is None else [])
    lines = [f"Seeds {', '.join(map(str, seeds))}; accuracy %, mean ± sample standard deviation over the seeds "
             f"(n = {len(seeds)}); –: the attack a model was trained on.", "",
             "| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in models or [*results[0]["models"], *results[0].get("extra_models", {})]:
        ms = [r["models"].get(name) or r["extra_models"][name] for r in results]
        cells = [spread([cell(m, a) for m in ms]) for _, a in COLUMNS]
        cells.append(spread([100 * m["attacks"]["whitebox"]["ladder"]["accuracy"] for m in ms]))
        if models is None:  # extra models are outside the ranking
            cells.append(spread([r["average_rank"]["blackbox"].get(name) for r in results]))
        lines.append(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    lines += ["", "| LADDER − vanilla, points | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "|---" * (len(seeds) + 2) + "|"]
    for label, attack in COLUMNS[:1] + [c for c in COLUMNS if c[1] in ("fgsm", "pgd")]:
        d = [cell(r["models"]["ladder"], attack) - cell(r["models"]["vanilla"], attack) for r in results]
        lines.append(f"| {label} | " + " | ".join(f"{v:+.2f}" for v in d) + f" | {spread(d)} |")
    lines += ["", "| goal | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for k, g in enumerate(results[0]["goals"]):
        if models is not None and "rank" in g["goal"]:
            continue
        lines.append(f"| {g['goal']} | " + " | ".join("met" if r["goals"][k]["met"] else "not met" for r in results) + " |")
    return "\n".join(lines) + "\n"


def recipes_table(results: list[dict]) -> str:
    """Per recipe: clean, FGSM and PGD accuracy and their gains over vanilla (points), mean ± sd over the seeds."""
    seeds = [r["seed"] for r in results]
    lines = [f"Seeds {', '.join(map(str, seeds))}; accuracy %, and Δ against vanilla in points, mean ± sample standard "
             f"deviation over the seeds (n = {len(seeds)}).", "",
             "| recipe | clean | FGSM | PGD | Δ clean | Δ FGSM | Δ PGD |", "|---|---|---|---|---|---|---|"]
    for name in results[0]["models"]:
        ms = [r["models"][name] for r in results]
        vs = [r["models"]["vanilla"] for r in results]
        cells = [spread([100 * m[k] for m in ms]) for k in ("clean", "fgsm", "pgd")]
        cells += [spread([100 * (m[k] - v[k]) for m, v in zip(ms, vs)]) for k in ("clean", "fgsm", "pgd")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="paper_mnist.py JSON files, one per seed")
    p.add_argument("--models", type=lambda v: v.split(","),
                   help="comma-separated: compare these models only (full and --core runs may be mixed)")
    args = p.parse_args(argv)
    results = [json.loads(f.read_text()) for f in args.results]
    if len({r.get("schema") for r in results}) != 1:
        p.error("the files come from different benches; compare like with like")
    keys = [protocol_key(r, args.models) for r in results]
    if args.models and any(k["models"] != args.models for k in keys):
        p.error(f"every file needs the models {args.models}")
    if any(k != keys[0] for k in keys):
        p.error("the files differ in more than the seed (protocol or device); compare like with like")
    if len({r["seed"] for r in results}) != len(results):
        p.error("two files have the same seed")
    if results[0].get("schema") == "ladder.recipes/1":
        print(recipes_table(results), end="")
    else:
        print(table(results, args.models), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
