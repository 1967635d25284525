"""The whole method on a small slice: report shape, determinism, resume from stored stages."""

import math

import pytest
import torch

from services import checkpoints
from services.checkpoints import DirectoryStore
from services.environment import environment
from services.method.boundary import Boundary
from services.method.harden import harden
from services.method.pipeline import MemoryStore, Run
from services.method.rank import report_ranks
from services.method.report import gallery
from services.method.stages import STAGES
from services.report import page

from .conftest import quick_config


@pytest.fixture(scope="module")
def run(lenet):
    store = MemoryStore()
    seen = []
    result = harden(lenet.model, lenet.spec, lenet.train, lenet.test, quick_config(variants=["ladder_random"]),
                    store, lambda s, f, m: seen.append((s, f)), environment=environment(torch.device("cpu")))
    return result, store, seen


def test_report_has_every_model_attack_and_setting(run):
    result, _, _ = run
    report = result.report
    assert report["schema"] == "ladder.report/2"
    assert set(report["models"]) == {"vanilla", "control", "ladder", "ladder_random"}
    caps = {"fgsm": 200, "pgd": 200, "cw": 20, "jsma": 10, "autoattack": 20, "ladder": 200 * len(report["calibration"]["table"])}
    for m in report["models"].values():
        assert 0 <= m["clean_accuracy"] <= 1
        for setting in ("whitebox", "blackbox"):
            attacks = ["fgsm", "pgd", "cw", "jsma", "autoattack"] + (["ladder"] if setting == "whitebox" else [])
            assert list(m["attacks"][setting]) == attacks
            for attack in attacks:
                entry = m["attacks"][setting][attack]
                assert 0 <= entry["accuracy"] <= 1 and entry["n"] == caps[attack], (setting, attack, entry)
            worst = m["worst_case"][setting]
            assert worst["n"] == 10 and worst["accuracy"] <= m["attacks"][setting]["jsma"]["accuracy"]  # jsma: those 10
    vanilla = report["models"]["vanilla"]
    assert vanilla["attacks"]["whitebox"]["pgd"]["accuracy"] < vanilla["clean_accuracy"]
    assert vanilla["attacks"]["whitebox"]["pgd"]["params"]["eps"] == 0.3
    assert vanilla["attacks"]["blackbox"]["pgd"]["params"]["crafted_on"] == "surrogate"
    assert report["models"]["ladder"]["trained_on"] == "ladder" and vanilla["trained_on"] is None
    assert set(report["average_rank"]) == {"whitebox", "blackbox"}
    assert report["average_rank"] == report_ranks(report["models"], ["whitebox", "blackbox"])
    assert all(1 <= r <= 4 for ranks in report["average_rank"].values() for r in ranks.values())
    assert report["evaluation"]["runs"] == {"whitebox": ["fgsm", "pgd", "cw", "jsma", "autoattack", "ladder"],
                                            "blackbox": ["fgsm", "pgd", "cw", "jsma", "autoattack"]}
    aa = report["evaluation"]["autoattack"]
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["version"] == report["versions"]["autoattack"]
    assert set(report["stage_seconds"]) == set(STAGES)
    assert report["determinism"] == {"deterministic_algorithms": True, "not_bit_exact": {}}  # on the CPU: every op
    assert report["config"]["finetune"]["alpha"] == 0.5 and report["seeds"]["run"] == 0
    assert report["versions"]["torch"] == torch.__version__
    assert report["generator"]["reconstruction_mse"] < report["generator"]["mean_image_mse"]
    assert len(report["calibration"]["table"]) == 5
    assert 0.5 <= report["surrogate"]["clean_accuracy"] <= 1 and report["surrogate"]["architecture"] == "smallcnn"
    html = page(result.report, result.gallery)
    assert html is not None and html.startswith("<!DOCTYPE html>") and "ladder_random" in html


def test_a_page_that_fails_to_render_costs_the_page_only(run, lenet, monkeypatch, caplog):
    import services.report

    def broken(report, gallery):
        raise RuntimeError("a plotting bug")

    result, store, _ = run
    monkeypatch.setattr(services.report, "render_html", broken)
    again = Run(lenet.model, lenet.spec, lenet.train, lenet.test, quick_config(variants=["ladder_random"]), store)
    assert services.report.page(result.report, lambda: gallery(again)) is None  # the stages are stored: nothing is lost

    def no_gallery():
        raise RuntimeError("a generator bug")

    assert services.report.page(result.report, no_gallery) is None  # generating the examples is part of the page
    assert "a generator bug" in caplog.text
    assert "could not be rendered" in caplog.text and "a plotting bug" in caplog.text


def test_progress_reaches_every_stage_and_stays_in_range(run):
    _, _, seen = run
    assert {s for s, _ in seen} == set(STAGES)
    assert all(0 <= f <= 1 for _, f in seen)


def test_vanilla_model_is_untouched_and_hardened_model_differs(run, lenet):
    result, _, _ = run
    assert result.models["vanilla"] is lenet.model
    assert not torch.equal(result.models["ladder"].net.fc2.weight, lenet.model.net.fc2.weight)
    assert not torch.equal(result.models["ladder"].net.fc2.weight, result.models["control"].net.fc2.weight)


def test_same_seed_same_numbers_and_resume_from_stored_stages(run, lenet, tmp_path):
    first, store, _ = run
    for stage in STAGES:  # every stage output survives a trip through files
        checkpoints.save(store.load(stage), tmp_path / f"{stage}.safetensors")
    disk = DirectoryStore(tmp_path)
    (tmp_path / "finetune.safetensors").unlink()
    (tmp_path / "evaluate.safetensors").unlink()
    resumed = harden(lenet.model, lenet.spec, lenet.train, lenet.test, quick_config(variants=["ladder_random"]), disk)
    assert resumed.report["models"] == first.report["models"]
    assert resumed.report["stage_seconds"]["boundary"] < 1.0  # loaded, not refitted


def test_fresh_run_with_the_same_seed_repeats_and_another_seed_differs(lenet):
    small = lenet.train.subset(torch.arange(0, 4000, 4))
    test = lenet.test.subset(torch.arange(0, 1000, 4))
    a = harden(lenet.model, lenet.spec, small, test, quick_config()).report
    b = harden(lenet.model, lenet.spec, small, test, quick_config()).report
    c = harden(lenet.model, lenet.spec, small, test, quick_config(seed=1)).report
    assert a["models"] == b["models"] and a["calibration"] == b["calibration"]
    assert a["calibration"]["table"] != c["calibration"]["table"]


def test_checkpoint_round_trip(tmp_path):
    value = {"b": Boundary(*(torch.randn(3, 2) for _ in range(6)), torch.rand(3), torch.rand(3), 1.5, 3, {"k": [1, None]}),
             "list": [torch.arange(4), {"x": math.pi}]}
    checkpoints.save(value, tmp_path / "v.safetensors")
    back = checkpoints.load(tmp_path / "v.safetensors")
    assert isinstance(back["b"], Boundary) and back["b"].fit == {"k": [1, None]} and back["b"].scale == 1.5
    assert torch.equal(back["b"].w, value["b"].w) and torch.equal(back["list"][0], torch.arange(4))
    assert back["list"][1]["x"] == math.pi
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_refuses_foreign_classes(tmp_path):
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "evil.safetensors"),
              metadata={"ladder": '{"__dataclass__": "os:system", "fields": {"command": "touch pwned"}}'})
    with pytest.raises(ValueError, match="refusing"):
        checkpoints.load(tmp_path / "evil.safetensors")
    assert not (tmp_path / "pwned").exists()


def test_finetune_settings_reach_fit_the_runs_own_or_an_override(lenet, monkeypatch):
    """Run.finetune_one trains with cfg.finetune (its schedule included), or with the settings it is handed."""
    import services.method.pipeline as pipeline
    from services.method.config import FinetuneConfig

    seen = []
    monkeypatch.setattr(pipeline, "fit", lambda model, x, y, **kw: seen.append(kw) or [0.0])
    cfg = quick_config(finetune={"epochs": 2, "lr_schedule": "cosine"})
    run = Run(lenet.model, lenet.spec, lenet.train, lenet.test, cfg, MemoryStore())
    run.finetune_one({"alpha": 1.0})
    run.finetune_one({"alpha": 1.0}, finetune=FinetuneConfig(epochs=1, lr=0.05))
    assert [(k["schedule"], k["epochs"], k["lr"], k["alpha"]) for k in seen] == [("cosine", 2, 0.01, 1.0),
                                                                                  ("constant", 1, 0.05, 1.0)]
