"""bench/paper_mnist.py end to end on small data (--smoke): the code path of the paper reproduction."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vanilla", "control", "fgsm_at", "pgd_at", "trades", "ladder", "trades_ladder", "ladder_random", "ladder_cavrandom"}


def _smoke(script: str, out: Path, *extra: str) -> dict:
    """Run a bench script with --smoke on mnist5k; its JSON result."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--data", "mnist5k",
                        "--threads", "2", "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_paper_mnist_smoke_run_writes_the_table_and_a_report_shaped_json(tmp_path):
    out = tmp_path / "paper.json"
    result = _smoke("paper_mnist.py", out)
    assert set(result["models"]) == MODELS
    assert set(result["extra_models"]) == {"ladder_raw_eps", "ladder_normal", "ladder_share50"}
    assert result["config"]["perturb"]["random_share"] == 0.85 == result["protocol"]["random_share"]  # the service's default
    for name, m in {**result["models"], **result["extra_models"]}.items():
        assert 0 <= m["clean_accuracy"] <= 1
        assert set(m["attacks"]["blackbox"]) == {"fgsm", "pgd", "cw", "jsma", "autoattack"}, name
        assert set(m["attacks"]["whitebox"]) == {"ladder"}, name  # only the LADDER attack runs white-box
    # the protocol's subsets: 20 per class evaluated; CW and JSMA on 2 per class × 9 targets
    assert result["models"]["vanilla"]["attacks"]["blackbox"]["pgd"]["n"] == 200
    assert result["models"]["vanilla"]["attacks"]["blackbox"]["cw"]["n"] == 20 * 9
    assert result["models"]["vanilla"]["attacks"]["blackbox"]["jsma"]["n"] == 20 * 9
    ranks = result["average_rank"]["blackbox"]
    assert set(ranks) == MODELS and all(1 <= r <= 9 for r in ranks.values())
    assert result["raw_calibration"]["mode"] == "raw" and result["calibration"]["mode"] == "quantiles"
    assert len(result["goals"]) == 6 and all(isinstance(g["met"], bool) for g in result["goals"])
    table = out.with_suffix(".md").read_text()
    assert "| LADDER |" in table and "| LADDER, raw ε |" in table and "/ 99.13" in table  # ours beside the paper's
    assert "| LADDER, normal only (paper) |" in table and "(the previous default) |" in table
    assert result["config"]["generator"]["time_budget_s"] >= 1e8  # trained to its epoch limit, whatever the machine
    assert result["wall_seconds"]["total"] > 0 and "evaluation (surrogate training and every attack)" in result["wall_seconds"]
    assert result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None


@pytest.mark.slow
def test_paper_mnist_smoke_run_with_a_budget_selects_every_model_and_judges_it_on_the_whole_test_set(tmp_path):
    out = tmp_path / "budget.json"
    result = _smoke("paper_mnist.py", out, "--core", "--max-clean-drop", "0.3", "--unseen-validation")
    sel = result["selection"]
    assert result["protocol"]["vanilla_train"] == 2700 and not result["protocol"]["vanilla_saw_validation"]
    assert result["protocol"]["max_clean_drop"] == 0.3 == sel["max_clean_drop_points"] and not result["extra_models"]
    assert set(sel["models"]) == {"control", "ladder"} and result["protocol"]["validation"] == sel["validation"]["n"] == 300
    vanilla = result["models"]["vanilla"]["clean_accuracy"]
    for name, chosen in sel["models"].items():
        assert all(c["clean_drop_points"] <= 0.3 + 1e-9 for c in chosen["curve"] if c["epoch"] == chosen["chosen_epoch"])
        judged = sel["on_test"][name]
        drop = 100 * (vanilla - result["models"][name]["clean_accuracy"])  # the whole test set's
        assert judged["full_test_clean_drop_points"] == pytest.approx(drop)
        assert judged["full_test_within_budget"] == (drop <= 0.3 + 1e-9)
    table = out.with_suffix(".md").read_text()
    assert "Checkpoint selection: budget 0.3 clean points" in table and "| LADDER | " in table.split("Checkpoint selection")[1]


def test_engine_bench_budget_leg_is_the_ratio_of_its_recorded_times():
    from bench.engine import _budget_leg, markdown, summarise

    def report(ladder_clean, selection=None):
        models = {k: {"clean_accuracy": c, "attacks": {"blackbox": {"pgd": {"accuracy": 0.1 * c}}}}
                  for k, c in (("vanilla", 0.98), ("control", 0.985), ("ladder", ladder_clean))}
        return {"models": models, "selection": selection, "stage_seconds": {"finetune": 3.0},
                "finetune": {"seconds": {"ladder": 1.0}}}

    sel = {"max_clean_drop_points": 0.3, "seconds": 2.0, "budget_held_on_test": True,
           "models": {"control": {"chosen_epoch": 0}, "ladder": {"chosen_epoch": 1.25}}}
    off, on = {"seconds": 100.0, "report": report(0.97)}, {"seconds": 108.0, "report": report(0.978, sel)}
    leg = _budget_leg(off, on, switched_on=True)
    assert leg["budget_cost_ratio"] == 1.08 and leg["chosen_epoch"] == {"control": 0, "ladder": 1.25}
    assert _budget_leg(on, off, switched_on=False) == leg  # the config had it on: the switched run is the one without
    base = {"harden_seconds": 1, "service_job_seconds": 1, "service_vs_cli_cpu": 1, "service_vs_cli_stage_sum": 1,
            "service_server_start_seconds": 1, "ladder_vs_pgd_at_time_ratio": 1, "throughput": {"ratio": 1},
            "stage_seconds": {"a": 1}, "service_stage_seconds": {"a": 1}, "reports_agree": True,
            "models": {name: {"clean": c, **dict.fromkeys(("blackbox_fgsm", "blackbox_pgd", "whitebox_fgsm", "whitebox_pgd"), r)}
                       for name, c, r in (("ladder", 0.97, 0.5), ("control", 0.98, 0.2))}}
    summary = summarise([{**base, "budget": leg}, {**base, "budget": {**leg, "budget_cost_ratio": 1.12}}])
    assert summary["budget_cost_ratio"] == pytest.approx(1.10)
    assert summary["budget_ladder_clean_delta_vs_vanilla"] == pytest.approx(-0.2)
    assert "with / without the clean-accuracy budget" in markdown(summary)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_paper_mnist_smoke_run_on_the_gpu(tmp_path):
    result = _smoke("paper_mnist.py", tmp_path / "paper.json", "--device", "cuda")
    assert result["machine"]["device"] == "cuda" and result["machine"]["gpu"]
    assert set(result["models"]) == MODELS and all(0 <= m["clean_accuracy"] <= 1 for m in result["models"].values())


@pytest.mark.slow
def test_ladder_recipes_smoke_run_scores_every_recipe_on_shared_examples(tmp_path):
    out = tmp_path / "recipes.json"
    names = ["vanilla", "control", "ladder", "ladder_random", "ladder_cavrandom", "ladder_high_eps",
             "ladder_random_high_eps", "ladder_cavrandom_high_eps", "ladder_high_eps_kept", "ladder_random_high_eps_kept",
             "ladder_mix", "ladder_mix_high_eps", "control_cosine", "ladder_mix85_high_eps"]
    result = _smoke("ladder_recipes.py", out, "--recipes", ",".join(names[1:]))
    assert list(result["models"]) == names
    models = result["models"]
    assert result["protocol"]["attacked"] == 50  # 5 per class in smoke mode
    for name in names:
        assert all(0 <= models[name][k] <= 1 for k in ("clean", "fgsm", "pgd")), name
    # an ablation changes the direction only: the same ε list as LADDER's at the same quantiles
    assert models["ladder_random"]["eps"] == models["ladder"]["eps"] == models["ladder_cavrandom"]["eps"]
    assert models["ladder_high_eps"]["eps"] == models["ladder_random_high_eps"]["eps"] == models["ladder_mix_high_eps"]["eps"]
    assert models["ladder_mix"]["eps"] == models["ladder"]["eps"] and models["ladder_mix"]["direction"] == "ladder_mix"
    assert max(models["ladder_high_eps"]["eps"]) > max(models["ladder"]["eps"])
    assert "eps" not in models["control"] and len(models["ladder"]["leaves_source"]) == len(models["ladder"]["eps"])
    assert "| ladder_random_high_eps |" in out.with_suffix(".md").read_text()
    # a recipe's fine-tuning settings are its own; the blends differ in their share of the random direction
    assert models["control_cosine"]["finetune"] == {"lr_schedule": "cosine"} and models["control"]["finetune"] == {}
    assert models["control_cosine"]["loss"] != models["control"]["loss"]  # same seed and data: only the schedule differs
    assert models["ladder_mix85_high_eps"]["random_share"] == 0.85 and models["ladder_high_eps"]["random_share"] is None
    assert models["ladder_mix85_high_eps"]["eps"] == models["ladder_mix_high_eps"]["eps"]
    assert models["ladder_mix85_high_eps"]["leaves_source"] != models["ladder_mix_high_eps"]["leaves_source"]
    # the _kept recipes train on the examples the vanilla model still assigns to their source, and no others
    for kept, full in (("ladder_high_eps_kept", "ladder_high_eps"), ("ladder_random_high_eps_kept", "ladder_random_high_eps")):
        assert models[kept]["keep_source"] and not models[full]["keep_source"]
        assert models[kept]["leaves_source"] == models[full]["leaves_source"]
        stays = sum(1 - f for f in models[full]["leaves_source"]) * result["protocol"]["sources"]
        assert models[kept]["examples"] == round(stays) < models[full]["examples"]


def _seeds(*files) -> subprocess.CompletedProcess:
    """bench/seeds.py on some result files."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "seeds.py"), *map(str, files)], capture_output=True, text=True)


def test_seed_spread_table_from_the_committed_gpu_runs():
    runs = [ROOT / "bench" / "results" / "archive" / f"paper_mnist_gpu_seed{s}.json" for s in range(3)]
    r = _seeds(*runs)
    assert r.returncode == 0, r.stderr
    clean = [100 * json.loads(f.read_text())["models"]["vanilla"]["clean_accuracy"] for f in runs]
    mean = sum(clean) / 3
    sd = (sum((c - mean) ** 2 for c in clean) / 2) ** 0.5
    assert f"| vanilla | {mean:.2f} ± {sd:.2f} |" in r.stdout
    # a CPU run and a GPU run are different protocols: refused
    mixed = _seeds(ROOT / "bench" / "results" / "archive" / "paper_mnist_normal_seed0.json", runs[1])
    assert mixed.returncode == 2 and "compare like with like" in mixed.stderr


def test_seed_spread_table_of_the_committed_gpu_recipes():
    runs = [ROOT / "bench" / "results" / f"ladder_recipes_gpu_seed{s}.json" for s in range(3)]
    r = _seeds(*runs)
    assert r.returncode == 0, r.stderr
    assert "| ladder_mix |" in r.stdout and "| vanilla | " in r.stdout and "0.00 ± 0.00 |" in r.stdout
    mixed = _seeds(runs[0], ROOT / "bench" / "results" / "archive" / "paper_mnist_gpu_seed1.json")
    assert mixed.returncode == 2 and "different benches" in mixed.stderr


def test_seed_spread_of_named_models_leaves_out_the_ranks():
    runs = [ROOT / "bench" / "results" / "archive" / f"paper_mnist_share50_seed{s}.json" for s in range(2)]
    r = _seeds("--models", "vanilla,control,ladder", *runs)
    assert r.returncode == 0, r.stderr
    rows = [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:4] == ["| vanilla", "| control (clean fine-tuning)", "| LADDER"] and "| FGSM-AT" not in rows
    assert "avg rank" not in r.stdout and "best average rank" not in r.stdout and "| PGD | +13.69 | +8.27 |" in r.stdout
    missing = _seeds("--models", "vanilla,ladder_share50", *runs)
    assert missing.returncode == 2 and "needs the models" in missing.stderr


def _gpu_bench(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """bench/gpu.py --quick on the CPU (mnist5k, the embedded server: no PostgreSQL needed)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LADDER_")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--device", "cpu", "--threads", "2",
                           "--cache", str(cache), "--out", str(out), *extra], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


@pytest.mark.slow
def test_gpu_bench_quick_on_the_cpu_records_every_number_and_computes_its_ratios(tmp_path):
    from bench.engine import LADDER_STAGES

    out = tmp_path / "gpu.json"
    r = _gpu_bench(out, tmp_path / "cache", "--precisions", "bf16")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    g = json.loads(out.read_text())
    for key in ("service_job_seconds", "inprocess_job_seconds", "service_vs_inprocess", "ladder_vs_pgd_at_time_ratio",
                "gpu_name", "peak_gpu_memory_mb", "stage_seconds", "service_mode", "device", "gpu_utilization", "command",
                "config", "date", "targets", "pgd_at_seconds", "ladder_seconds"):
        assert key in g, key
    assert g["device"] == "cpu" and g["quick"] and g["service_mode"] == "embedded"
    assert g["gpu_name"] is None and g["peak_gpu_memory_mb"] is None and g["gpu_utilization"] is None  # no GPU, no nvidia-smi
    assert g["data"] == {"train": 4000, "test": 1000, "source": "mnist5k (4,000 / 1,000)"}
    assert g["config"]["finetune"]["epochs"] == 1 and g["pgd_at"]["epochs"] == 1 and g["pgd_at"]["finished"]
    assert g["pgd_at"]["eps"] == 0.3 and g["pgd_at"]["steps"] == 10 and not g["pgd_at"]["extrapolated"]
    # both runs did the whole job, on the CPU, and agree (same inputs, seed and device)
    for run in ("inprocess", "service"):
        assert set(g["stage_seconds"][run]) >= {*LADDER_STAGES, "finetune", "evaluate"}, run
        assert g["report_device"][run]["device"] == "cpu"
    assert g["reports_agree"] and g["clean_accuracy"]["inprocess"] == g["clean_accuracy"]["service"]
    # every ratio comes from the recorded seconds; LADDER's time is bench/engine.py's definition
    assert g["service_vs_inprocess"] == g["service_job_seconds"] / g["inprocess_job_seconds"]
    stages = g["stage_seconds"]["inprocess"]
    assert g["ladder_seconds"] == sum(stages[s] for s in LADDER_STAGES) + g["finetune_seconds"]["inprocess"]["ladder"]
    assert g["ladder_vs_pgd_at_time_ratio"] == g["ladder_seconds"] / g["pgd_at_seconds"]
    assert 0 < g["inprocess_job_seconds"] and 0 < g["service_job_seconds"] and 0 < g["pgd_at_seconds"]
    targets = {t["key"]: t for t in g["targets"]}
    assert set(targets) == {"service_job_seconds", "service_vs_inprocess", "ladder_vs_pgd_at_time_ratio"}
    assert [targets[k]["bound"] for k in targets] == [120, 1.2, 0.5]
    for key, t in targets.items():
        assert t["value"] == g[key] and t["met"] == (g[key] <= t["bound"]), key
    assert targets["service_job_seconds"]["applies"] is False  # a quick CPU run says nothing about the H100/H200 target
    assert "| service / in-process wall time |" in r.stdout and "| generator |" in r.stdout
    # the precision asked for ran the whole job again; its numbers are its own, its ratios against fp32's (a)
    fp32, bf16 = g["precision"]["fp32"], g["precision"]["bf16"]
    assert set(g["precision"]) == {"fp32", "bf16"} and fp32["wall_seconds"] == g["inprocess_job_seconds"] and bf16["finished"]
    assert bf16["wall_vs_fp32"] == bf16["wall_seconds"] / fp32["wall_seconds"]
    assert bf16["finetune_vs_fp32"] == bf16["stage_seconds"]["finetune"] / stages["finetune"]
    assert bf16["clean_minus_fp32_points"]["vanilla"] == 0  # not fine-tuned: the precision cannot touch it
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["finetune_loss"]["ladder"] != fp32["finetune_loss"]["ladder"]  # bf16 steps did run
    assert "| bf16 |" in r.stdout

    # the budget guard: what runs past it is stopped and recorded, never waited for (the vanilla model is cached now)
    r = _gpu_bench(tmp_path / "cut.json", tmp_path / "cache", "--budget-s", "2")
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["vanilla"]["cached"] and not cut["inprocess"]["finished"] and "budget" in cut["inprocess"]["why"]
    assert cut["service"]["why"] == cut["pgd_at"]["why"] == "no budget left"
    assert cut["inprocess_job_seconds"] is cut["service_vs_inprocess"] is cut["ladder_vs_pgd_at_time_ratio"] is None
    assert list(cut["precision"]) == ["fp32"]  # none asked for on a CPU
    assert all(t["met"] is None for t in cut["targets"])
