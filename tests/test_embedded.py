"""The embedded default: `ladder serve` with nothing configured (SQLite, local artifacts, an
in-process worker) and `ladder submit` against it, as the README's demo runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from services.method.models import net_weights

from . import harness
from .conftest import LENET_SPEC, quick_config

pytestmark = pytest.mark.slow


def test_serve_embedded_and_submit(tmp_path, lenet):
    save_file(net_weights(lenet.model), str(tmp_path / "model.safetensors"))
    (tmp_path / "spec.json").write_text(LENET_SPEC.model_dump_json())
    np.savez(tmp_path / "train.npz", x=(lenet.train.x[::10].numpy() * 255).round().astype(np.uint8), y=lenet.train.y[::10].numpy())
    (tmp_path / "config.json").write_text(quick_config().model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LADDER_")}
    env |= {"LADDER_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "2"}
    nothing_set = {"LADDER_DATABASE_URL": "", "LADDER_BROKER_URL": "", "LADDER_ARTIFACTS_URL": ""}  # over any outer setting
    server = harness.Server({"LADDER_DATA_DIR": env["LADDER_DATA_DIR"], **nothing_set}, tmp_path / "server.log")
    try:
        key = (tmp_path / "data" / "local-api-key").read_text().strip()
        assert key.startswith("ldr_") and "local API key" in server.tail()
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "submit", "--server", server.url, "--key", key,
             "--model", str(tmp_path / "model.safetensors"), "--spec", str(tmp_path / "spec.json"),
             "--train", str(tmp_path / "train.npz"), "--config", str(tmp_path / "config.json"), "--poll", "0.3",
             "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=400, cwd=harness.ROOT)
        assert out.returncode == 0, out.stderr[-3000:] + server.tail()
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert set(load_file(str(tmp_path / "out" / "hardened.safetensors"))) == set(net_weights(lenet.model))
        assert report["data"]["train"] == 320 and report["data"]["test"] == 80  # the stratified 20 % hold-out
        assert "ladder" in out.stdout and "vanilla" in out.stdout  # the before/after table
        assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")  # checked against its ETag
        assert (tmp_path / "data" / "ladder.db").exists()
    finally:
        server.stop()
