"""bench/paper_mnist.py end to end on small data (--smoke): the code path of the paper reproduction."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vanilla", "control", "fgsm_at", "pgd_at", "trades", "ladder", "trades_ladder", "ladder_random", "ladder_cavrandom"}


@pytest.mark.slow
def test_paper_mnist_smoke_run_writes_the_table_and_a_report_shaped_json(tmp_path):
    out = tmp_path / "paper.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "paper_mnist.py"), "--smoke", "--data", "mnist5k",
                        "--threads", "2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["models"]) == MODELS and set(result["extra_models"]) == {"ladder_raw_eps"}
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
    assert result["wall_seconds"]["total"] > 0 and "evaluation (surrogate training and every attack)" in result["wall_seconds"]
