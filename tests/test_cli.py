"""The `ladder` command: bad input stops with one line and leaves nothing; a real run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.cli import main
from services.method.finetune import accuracy
from services.method.models import build_classifier, net_weights

from .conftest import LENET_SPEC, quick_config


@pytest.fixture(scope="module")
def good(tmp_path_factory, lenet):
    d = tmp_path_factory.mktemp("inputs")
    save_file(net_weights(lenet.model), str(d / "model.safetensors"))
    (d / "spec.json").write_text(LENET_SPEC.model_dump_json())
    x8 = (lenet.train.x[::10].numpy() * 255).round().astype(np.uint8)
    np.savez(d / "train.npz", x=x8, y=lenet.train.y[::10].numpy())
    return d


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _cases(good: Path, tmp: Path) -> dict[str, tuple[dict, str]]:
    w = load_file(str(good / "model.safetensors"))
    x = np.load(good / "train.npz")["x"]
    y = np.load(good / "train.npz")["y"]
    raw = (good / "model.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    save_file({**w, "fc1.bias": torch.full((500,), float("nan"))}, str(tmp / "nan.safetensors"))
    save_file({k: v for k, v in w.items() if k != "fc2.weight"}, str(tmp / "partial.safetensors"))
    (tmp / "resnet.json").write_text(LENET_SPEC.model_copy(update={"architecture": "resnet18"}).model_dump_json())
    (tmp / "notjson.json").write_text("{architecture: lenet")
    spec = json.loads(LENET_SPEC.model_dump_json())
    (tmp / "badarch.json").write_text(json.dumps({**spec, "architecture": "lenet9"}))
    (tmp / "badconfig.json").write_text(json.dumps({"finetune": {"epochs": 0}}))
    (tmp / "unknownkey.json").write_text(json.dumps({"finetune": {"epoch": 3}}))
    (tmp / "garbage.npz").write_bytes(b"not a zip at all")
    (tmp / "badlayer.json").write_text(json.dumps({"latent_layer": "conv9"}))
    (tmp / "badsurrogate.json").write_text(json.dumps({"evaluate": {"surrogate_architecture": "nonet"}}))
    return {
        "truncated weights": ({"model": str(tmp / "truncated.safetensors")}, "not a valid safetensors file"),
        "NaN weights": ({"model": str(tmp / "nan.safetensors")}, "NaN or Inf"),
        "missing tensor": ({"model": str(tmp / "partial.safetensors")}, "missing 1 tensors"),
        "spec/weights mismatch": ({"spec": str(tmp / "resnet.json")}, "do not match the spec's architecture"),
        "spec not JSON": ({"spec": str(tmp / "notjson.json")}, "is not valid JSON"),
        "unknown architecture": ({"spec": str(tmp / "badarch.json")}, "unknown architecture"),
        "config out of range": ({"config": str(tmp / "badconfig.json")}, "finetune.epochs"),
        "config unknown key": ({"config": str(tmp / "unknownkey.json")}, "finetune.epoch"),
        "labels out of range": ({"train": _npz(tmp / "l.npz", x=x, y=y + 5)}, "labels span"),
        "one class": ({"train": _npz(tmp / "one.npz", x=x, y=np.zeros_like(y))}, "only one class"),
        "empty data": ({"train": _npz(tmp / "e.npz", x=x[:0], y=y[:0])}, "is empty"),
        "wrong image shape": ({"train": _npz(tmp / "s.npz", x=x[:, :, :20, :20], y=y)}, "the model takes [1, 28, 28]"),
        "float pixels out of range": ({"train": _npz(tmp / "f.npz", x=x.astype(np.float32), y=y)}, "scale them to [0,1]"),
        "NaN pixels": ({"train": _npz(tmp / "n.npz", x=np.full(x.shape, np.nan, np.float32), y=y)}, "NaN or Inf"),
        "wrong dtype": ({"train": _npz(tmp / "d.npz", x=x.astype(np.int32), y=y)}, "dtype int32"),
        "float labels": ({"train": _npz(tmp / "fl.npz", x=x, y=y.astype(np.float32))}, "integer class indices"),
        "pickled arrays": ({"train": _npz(tmp / "p.npz", x=np.array([object()] * 3, dtype=object), y=y[:3])}, "pickled"),
        "missing y": ({"train": _npz(tmp / "m.npz", x=x)}, "lacks array(s) y"),
        "label count": ({"train": _npz(tmp / "c.npz", x=x, y=y[:-1])}, "one label per image"),
        "not an npz": ({"train": str(tmp / "garbage.npz")}, "not a readable .npz"),
        "missing file": ({"train": str(tmp / "nowhere.npz")}, "not found"),
        "bad latent layer": ({"config": str(tmp / "badlayer.json")}, "latent_layer 'conv9'"),
        "bad surrogate": ({"config": str(tmp / "badsurrogate.json")}, "surrogate_architecture"),
        "HWC data with C mismatch": ({"train": _npz(tmp / "h.npz", x=np.repeat(x[:, 0, :, :, None], 3, axis=3), y=y)},
                                     "the model takes [1, 28, 28]"),
        "class too rare": ({"train": _npz(tmp / "r.npz", x=np.concatenate([x[y != 3], x[y == 3][:1]]),
                                          y=np.concatenate([y[y != 3], y[y == 3][:1]]))}, "1 samples of class 3"),
    }


def test_bad_inputs_stop_with_one_line_and_leave_nothing(good, tmp_path, capsys):
    cases = _cases(good, tmp_path)
    assert len(cases) >= 20
    for name, (override, message) in cases.items():
        args = {"model": str(good / "model.safetensors"), "spec": str(good / "spec.json"),
                "train": str(good / "train.npz"), **override}
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        argv = ["harden", "--out", str(out)] + [f"--{k}={v}" for k, v in args.items()]
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("ladder: error: ") and "\n" not in err, (name, err)
        assert message in err, (name, err)
        assert not out.exists(), name


def test_train_then_harden_through_the_console_script(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ladder = [sys.executable, "-m", "services.cli"]
    trained = tmp_path / "vanilla"
    r = subprocess.run([*ladder, "train", "--data", "mnist5k", "--epochs", "1", "--validation-fraction", "0.1",
                        "--out", str(trained)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    with np.load(trained / "train.npz") as t, np.load(trained / "validation.npz") as v:
        assert (len(t["y"]), len(v["y"])) == (3600, 400)  # mnist5k's 4,000 training digits, 10 % kept apart
        rows = {row.tobytes() for row in t["x"]}
        assert not any(row.tobytes() in rows for row in v["x"])  # apart (mnist5k holds no duplicate digits)
    config = tmp_path / "config.json"
    config.write_text(quick_config(evaluate={"max_samples": None}, select={"max_clean_drop": 1.0}).model_dump_json())
    small_test = tmp_path / "test.npz"
    with np.load(trained / "test.npz") as f:
        np.savez(small_test, x=f["x"][::5], y=f["y"][::5])
    out = tmp_path / "hardened"
    r = subprocess.run([*ladder, "harden", "--model", str(trained / "model.safetensors"), "--spec", str(trained / "spec.json"),
                        "--train", str(trained / "train.npz"), "--test", str(small_test), "--config", str(config),
                        "--validation", str(trained / "validation.npz"), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["validation"]["source"] == "uploaded" and report["selection"]["validation"]["n"] == 400
    assert report["data"]["train"] == 3600 and "checkpoints (best transfer_pgd within 1 points" in r.stdout
    assert "blackbox  clean" in r.stdout and "\nladder " in r.stdout  # the before/after tables
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    spec = LENET_SPEC.model_copy(update=json.loads((trained / "spec.json").read_text()))
    hardened = build_classifier(spec, load_file(str(out / "hardened.safetensors")))
    with np.load(small_test) as f:
        x, y = torch.from_numpy(f["x"]).float().div(255), torch.from_numpy(f["y"]).long()
    assert accuracy(hardened, x, y) == pytest.approx(report["models"]["ladder"]["clean_accuracy"], abs=1e-9)
    assert (out / "models" / "control.safetensors").exists()
