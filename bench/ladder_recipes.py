"""Which LADDER examples make LeNet robust? Recipes compared on full MNIST with one seed (issue 5's follow-up).

    .venv/bin/python bench/ladder_recipes.py --seed 0
        → bench/results/ladder_recipes.json and bench/results/ladder_recipes.md (about 20 minutes on 2 cores)
    python bench/ladder_recipes.py --seed 1 --device cuda --out bench/results/ladder_recipes_gpu_seed1.json
        (every stage on the GPU: a few minutes)

The paper bench (bench/paper_mnist.py) runs the whole Table 2 protocol once per seed (75 minutes).
This one holds everything but the examples fixed and varies only how they are made:
  - the vanilla LeNet (the paper's recipe), the latents, the boundary and the generator are trained once,
    as bench/paper_mnist.py --core does (the generator to its epoch limit, 15, with no wall-time cap, so the
    numbers do not depend on the machine's speed);
  - every recipe fine-tunes a copy of the vanilla weights with the pipeline's own `Run.finetune_one`
    (3 epochs, α = 0.5, SGD lr 0.01, momentum 0.5, batch 64, the same seed), on the same 4,500
    sources and random targets (`Run.sources`); a recipe changes the ε list or the latent direction;
  - each model is scored on the whole test set (clean) and on transfer FGSM and PGD (L∞ ε = 0.3,
    40 steps, random start, crafted once on the SmallCNN surrogate) on 200 test digits per class.
The recipes: the clean-only control; LADDER at the calibrated ε (crossing quantiles 0.1 … 0.9, the
service's default until November 2026) and at larger ε (quantiles 0.5 … 0.99, the default since); and at
each ε list the two ablations, LADDER_Random (a random latent direction of the same norm) and LADDER_cavRandom.
The `_kept` recipes test why the normal loses to a random direction: they drop every generated example the
vanilla model no longer assigns to its source class (an example labelled with a class it has left is a wrong label), for both
directions alike. The `ladder_mix` recipes move half-way between the two: (normal step + random step) / √2,
boundary-guided still, with a random component as long as the normal one (the same length as LADDER's step,
since a random direction in D dimensions is nearly orthogonal to the normal); `ladder_mix70` and `ladder_mix85`
put 70 % and 85 % of the step's squared length on the random direction (`ladder_mix85_high_eps` is the service's
LADDER now: perturb.random_share 0.85 at quantiles 0.5 … 0.99). The `_cosine` recipes fine-tune with the learning
rate decayed to 0 along a cosine (finetune.lr_schedule) instead of the paper's constant rate.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_mnist import DEFAULT_DATA, SPEC, changed, configure, load_mnist, log  # noqa: E402

from services.method.attacks import fgsm, pgd  # noqa: E402
from services.method.config import AttackConfig  # noqa: E402
from services.method.finetune import accuracy, fit  # noqa: E402
from services.method.models import build_classifier, device_of, load_net_weights  # noqa: E402
from services.method.perturb import blend, calibrate, generate  # noqa: E402
from services.method.pipeline import MemoryStore, Run, per_class, train_surrogate  # noqa: E402

DEFAULT_Q = [0.1, 0.25, 0.5, 0.75, 0.9]
HIGH_Q = [0.5, 0.75, 0.9, 0.95, 0.99]
MID_Q = [0.25, 0.5, 0.75, 0.9, 0.95]
COSINE = {"lr_schedule": "cosine"}
# (name, crossing quantiles of the ε list, latent direction, keep only the examples the vanilla model still
# assigns to their source class, fine-tuning settings changed; quantiles None = the clean-only control)
RECIPES = [
    ("control", None, None, False, {}),
    ("ladder", DEFAULT_Q, "ladder", False, {}),
    ("ladder_random", DEFAULT_Q, "ladder_random", False, {}),
    ("ladder_cavrandom", DEFAULT_Q, "ladder_cavrandom", False, {}),
    ("ladder_high_eps", HIGH_Q, "ladder", False, {}),
    ("ladder_random_high_eps", HIGH_Q, "ladder_random", False, {}),
    ("ladder_cavrandom_high_eps", HIGH_Q, "ladder_cavrandom", False, {}),
    ("ladder_high_eps_kept", HIGH_Q, "ladder", True, {}),
    ("ladder_random_high_eps_kept", HIGH_Q, "ladder_random", True, {}),
    ("ladder_mix", DEFAULT_Q, "ladder_mix", False, {}),
    ("ladder_mix_high_eps", HIGH_Q, "ladder_mix", False, {}),
    # the learning rate decayed to 0 along a cosine over the same 3 epochs (finetune.lr_schedule)
    ("control_cosine", None, None, False, COSINE),
    ("ladder_cosine", DEFAULT_Q, "ladder", False, COSINE),
    ("ladder_random_cosine", DEFAULT_Q, "ladder_random", False, COSINE),
    ("ladder_mix_cosine", DEFAULT_Q, "ladder_mix", False, COSINE),
    ("ladder_random_mid_eps_cosine", MID_Q, "ladder_random", False, COSINE),
    ("ladder_mix_mid_eps_cosine", MID_Q, "ladder_mix", False, COSINE),
    ("ladder_random_high_eps_cosine", HIGH_Q, "ladder_random", False, COSINE),
    ("ladder_mix_high_eps_cosine", HIGH_Q, "ladder_mix", False, COSINE),
    # more of the random direction in the blend (perturb.random_share 0.7 and 0.85)
    ("ladder_mix70_mid_eps", MID_Q, "ladder_mix70", False, {}),
    ("ladder_mix70_high_eps", HIGH_Q, "ladder_mix70", False, {}),
    ("ladder_mix85_high_eps", HIGH_Q, "ladder_mix85", False, {}),
]
# the blends' random shares (LADDER with perturb.random_share = s; ladder_mix85 is the service's default)
MIX_SHARES = {"ladder_mix": 0.5, "ladder_mix70": 0.7, "ladder_mix85": 0.85}


TRANSFER = AttackConfig(pgd_early_stop=False)  # as the evaluation crafts transfer PGD: every point takes every step


def transfer_sets(surrogate: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """FGSM and textbook PGD crafted on the surrogate (on its device; the examples come back on the CPU)."""
    surrogate.eval()
    gen = torch.Generator().manual_seed(seed)
    dev = device_of(surrogate)
    chunks = [(x[i : i + 500].to(dev), y[i : i + 500].to(dev)) for i in range(0, len(x), 500)]
    return {"fgsm": torch.cat([fgsm(surrogate, a, b, None, TRANSFER, gen).cpu() for a, b in chunks]),
            "pgd": torch.cat([pgd(surrogate, a, b, None, TRANSFER, gen).cpu() for a, b in chunks])}


def score(model: torch.nn.Module, test, attacked: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Clean accuracy on the whole test set; accuracy on each transferred set."""
    return {"clean": accuracy(model, test.x, test.y), **{k: accuracy(model, v, y) for k, v in attacked.items()}}


def markdown(result: dict) -> str:
    """One row per recipe: ε, image flip rate, clean, FGSM, PGD and the gains over vanilla."""
    v = result["models"]["vanilla"]
    lines = [f"Seed {result['seed']}, {result['protocol']['finetune_epochs']} fine-tuning epochs, "
             f"transfer attacks on {result['protocol']['attacked']} test digits. Accuracy %; Δ: points against vanilla.", "",
             "| model | ε list | vanilla's prediction leaves y, % per ε | examples trained on | clean (Δ) | FGSM (Δ) | PGD (Δ) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        eps = "–" if m.get("eps") is None else ", ".join(f"{e:.1f}" for e in m["eps"])
        flips = "–" if m.get("leaves_source") is None else ", ".join(f"{100 * f:.0f}" for f in m["leaves_source"])
        cells = [f"{100 * m[k]:.2f} ({100 * (m[k] - v[k]):+.2f})" for k in ("clean", "fgsm", "pgd")]
        kept = f"{m['examples']:,}" + (" (kept)" if m.get("keep_source") else "") if "examples" in m else "–"
        lines.append(f"| {name} | {eps} | {flips} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a folder of MNIST IDX files, or mnist5k")
    p.add_argument("--smoke", action="store_true", help="small data and budgets: checks the code, not the method")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ladder_recipes.json"))
    p.add_argument("--attacked-per-class", type=int, default=200)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--recipes", default=",".join(r[0] for r in RECIPES), help="comma-separated subset of the recipes")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to run every stage on the GPU (data stays on the CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = load_mnist(args.data, args.smoke, args.seed)
    if args.smoke:
        args.attacked_per_class = min(args.attacked_per_class, 5)
    torch.manual_seed(args.seed)
    vanilla = build_classifier(SPEC).to(device)
    fit(vanilla, train.x, train.y, epochs=1 if args.smoke else 10, lr=0.01, momentum=0.5, batch_size=64, seed=args.seed, stage="vanilla")
    log(f"vanilla: {accuracy(vanilla, test.x, test.y):.4f}")

    ns = argparse.Namespace(seed=args.seed, core=True, sources_per_class=20 if args.smoke else 450,
                            finetune_epochs=1 if args.smoke else 3, cw_per_class=50, autoattack_per_class=100, smoke=args.smoke,
                            # "ladder" is the paper's normal; the blend is the ladder_mix recipes
                            random_share=0.0, crossing_quantiles=None)
    cfg = configure(ns)
    run = Run(vanilla, SPEC, train, test, cfg, MemoryStore())
    z, boundary, gfit = (run.output(s) for s in ("latents", "boundary", "generator"))
    generator = gfit.build().to(device)
    zs, ys, targets, steps = run.sources(z, boundary, ["ladder_random", "ladder_cavrandom"])
    steps.update({name: blend(steps["ladder"], steps["ladder_random"], share) for name, share in MIX_SHARES.items()})
    log(f"stages: {json.dumps({k: round(v, 1) for k, v in run.seconds.items()})}, generator epochs {gfit.epochs}")

    surrogate, arch = train_surrogate(SPEC, train, cfg, device=device)
    points = per_class(test.y, args.attacked_per_class, torch.Generator().manual_seed(args.seed + 123))
    xa, ya = test.x[points], test.y[points]
    attacked = transfer_sets(surrogate, xa, ya, args.seed + 5)
    log(f"surrogate {arch}: clean {accuracy(surrogate, test.x, test.y):.4f}")

    chosen = args.recipes.split(",")
    models = {"vanilla": score(vanilla, test, attacked, ya)}
    n_cal = cfg.perturb.calibration_samples
    eps_at: dict[tuple, list[float]] = {}  # per quantile list: its ε (recipes share them)
    made: dict[tuple, tuple] = {}  # per (quantiles, direction): the examples and the vanilla model's verdict on each

    def examples(quantiles: list[float], direction: str) -> tuple:
        q = tuple(quantiles)
        if q not in eps_at:  # ε from LADDER's own crossing distances, whatever the direction: a variant changes it only
            eps_at[q] = calibrate(run.split.head, zs[:n_cal], steps["ladder"][:n_cal], targets[:n_cal], quantiles).eps
        if (q, direction) not in made:
            ex = generate(generator, vanilla, zs, ys, targets, steps[direction], eps_at[q])
            with torch.no_grad():  # per example: does the vanilla model still predict the source class?
                stays = torch.cat([vanilla(ex.x[i : i + 2048].to(device)).argmax(1).cpu() == ex.y[i : i + 2048]
                                   for i in range(0, len(ex.y), 2048)])
            made[q, direction] = eps_at[q], ex, stays
        return made[q, direction]

    for name, quantiles, direction, keep_source, tuning in RECIPES:
        if name not in chosen:
            continue
        tick = time.perf_counter()
        if quantiles is None:
            how, entry = {"alpha": 1.0}, {}
        else:
            eps, ex, stays = examples(quantiles, direction)
            n = len(zs)
            leaves = [1 - stays[k * n : (k + 1) * n].float().mean().item() for k in range(len(eps))]
            kept = stays if keep_source else torch.ones_like(stays)
            how, entry = {"alpha": cfg.finetune.alpha, "extra": (ex.x[kept], ex.y[kept])}, {
                "quantiles": quantiles, "direction": direction, "eps": eps, "leaves_source": leaves,
                "keep_source": keep_source, "examples": int(kept.sum()), "random_share": MIX_SHARES.get(direction)}
        # alpha and epochs stay the run's: a recipe changes the optimiser's settings only
        assert set(tuning) <= {"lr", "lr_schedule", "momentum", "batch_size"}, tuning
        weights, loss = run.finetune_one(how, finetune=changed(cfg.finetune, tuning))
        entry["finetune"] = tuning
        model = build_classifier(SPEC).to(device)
        load_net_weights(model, weights)
        model.eval()
        models[name] = {**entry, **score(model, test, attacked, ya), "loss": loss, "seconds": round(time.perf_counter() - tick, 1)}
        m = models[name]
        log(f"{name}: clean {m['clean']:.4f} fgsm {m['fgsm']:.4f} pgd {m['pgd']:.4f} ({m['seconds']} s)")

    result = {
        "schema": "ladder.recipes/1", "seed": args.seed,
        "command": "bench/ladder_recipes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": {"train": len(train), "test": len(test), "attacked": len(ya), "finetune_epochs": cfg.finetune.epochs,
                     "alpha": cfg.finetune.alpha, "sources": len(zs), "generator_epochs": gfit.epochs,
                     "surrogate": arch, "attack": TRANSFER.model_dump()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "models": models,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
