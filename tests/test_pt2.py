"""A custom network (.pt2) is code: its names are checked before anything loads it, the archive is
deserialised only inside the bubblewrap sandbox, and the worker gets the network as an allow-listed
graph (docs/security.md). Over HTTP: the fx code-generation exploit is refused and never runs, a
genuine .pt2 job still succeeds end to end. The scan's refusals are cases of the bad-upload corpus."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save

from api.problems import status_of
from services import sandbox
from services.errors import InputError
from services.method import graphnet
from services.method.models import ModelSpec, build_net
from services.uploads import check_model, load_model

from . import harness
from .bad_uploads import CUSTOM_SPEC, LIMITS, exported, good_parts, planted, weights
from .conftest import quick_config

pytestmark = pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox here: {sandbox.available()}")


def test_the_planted_name_is_a_live_exploit_for_a_plain_torch_export_load(tmp_path):
    # what the service did before: torch.export.load, program.module(), a forward pass (the name is in its code)
    marker, archive = tmp_path / "pwned", tmp_path / "net.pt2"
    archive.write_bytes(planted(marker))
    code = "import sys, torch; torch.export.load(sys.argv[1]).module()(torch.rand(2, 1, 28, 28))"
    subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, timeout=300, check=False)
    assert marker.exists(), "torch now escapes attribute names itself; the scan below still refuses such names"


@pytest.mark.parametrize("where", ["program", "payloads"])
def test_a_name_that_is_not_a_plain_identifier_is_refused_before_anything_loads(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "model"
    path.write_bytes(planted(marker, where))
    with pytest.raises(InputError, match=r"names 'conv1\.weight\"\) if getattr.*not a plain dotted identifier"):
        check_model(path, "net.pt2", ModelSpec.model_validate(CUSTOM_SPEC), LIMITS)
    with pytest.raises(InputError, match="not a plain dotted identifier"):
        load_model(path, "pt2", ModelSpec.model_validate(CUSTOM_SPEC), LIMITS)  # a stored job of the old format: scanned again
    assert not marker.exists()


def test_a_genuine_pt2_is_stored_as_its_allow_listed_graph_and_loads_without_the_sandbox(tmp_path, monkeypatch):
    path = tmp_path / "model"
    path.write_bytes(exported())
    spec = ModelSpec.model_validate(CUSTOM_SPEC)
    assert check_model(path, "net.pt2", spec, LIMITS) == "graph"
    assert set(load_file(str(path))) == set(weights())  # the exported module's own names

    def no_sandbox(*args, **kwargs):
        raise AssertionError("the worker deserialised an archive")

    monkeypatch.setattr(sandbox, "run_pt2check", no_sandbox)
    model = load_model(path, "graph", spec)
    reference = build_net(ModelSpec.model_validate({**CUSTOM_SPEC, "architecture": "lenet"}))
    reference.load_state_dict(weights())
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


def _graph_file(tmp_path: Path, edit) -> Path:
    program = torch.export.export(nn_net().eval(), (torch.rand(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    graph, tensors = graphnet.encode(program)
    edit(graph, tensors)
    path = tmp_path / "net.graph"
    path.write_bytes(save(tensors, metadata={"ladder.graph": json.dumps(graph)}))
    return path


def nn_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _call(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == "call")


def _tensor(graph: dict, name: str = "0.weight") -> dict:
    return next(n for n in graph["nodes"] if n.get("name") == name)


def _rename(graph: dict, tensors: dict, new: str) -> None:
    tensors[new] = tensors.pop("0.weight")
    _tensor(graph)["name"] = new
    graph["parameters"] = [new if p == "0.weight" else p for p in graph["parameters"]]


@pytest.mark.parametrize("edit, fragment", [
    (lambda g, t: _call(g).update(target="builtins.eval"), "'builtins.eval', which is not an allowed"),
    (lambda g, t: _call(g).update(target="aten.from_file.default"), "'aten.from_file.default', which is not an allowed"),
    (lambda g, t: _call(g).update(target="aten.linear.__call__"), "which is not an allowed"),
    (lambda g, t: _call(g).update(args=[{"node": 99}]), "not a number, word, list or earlier node"),
    (lambda g, t: _call(g).update(args=["os.system('x')"]), "is not a plain word"),
    (lambda g, t: _call(g).update(kwargs={"__class__": 1}), "is not a plain name"),
    (lambda g, t: _call(g).update(args=[2 ** 70]), "beyond 64 bits"),
    (lambda g, t: _rename(g, t, '0.weight")'), "not a plain dotted identifier"),
    (lambda g, t: _rename(g, t, "training"), "clashes with a module attribute"),
    (lambda g, t: _rename(g, t, "0.weight.__class__"), "not a plain dotted identifier"),
    (lambda g, t: g["nodes"].insert(0, {"op": "input"}), "takes 2 inputs"),
    (lambda g, t: g.update(format="ladder.graph/0"), "not in the ladder.graph/1 format"),
])
def test_the_worker_trusts_nothing_in_a_converted_graph(tmp_path, edit, fragment):
    with pytest.raises(InputError, match="model: ") as e:
        graphnet.read(_graph_file(tmp_path, edit))
    assert fragment in str(e.value)


def test_a_converted_graph_trains_and_splits_like_the_network(tmp_path):
    net = graphnet.read(_graph_file(tmp_path, lambda g, t: None))
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(p.requires_grad for p in net.parameters())
    x = torch.rand(6, 4)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


_ESCAPE = """
import json, os, socket, sys
from services.pt2check import limit
limit(1 << 30, 60)
out = {}
for name, path in (("host_dir", sys.argv[1]), ("repo", sys.argv[2]), ("scratch", "/tmp/scratch-file")):
    try:
        with open(path, "w") as f:
            f.write("x")
        out[name] = "wrote"
    except OSError as e:
        out[name] = type(e).__name__
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=2).close()
    out["socket"] = "connected"
except OSError as e:
    out["socket"] = type(e).__name__
out["uid"] = os.getuid()
out["secrets"] = sorted(k for k in os.environ if k.startswith(("LADDER_", "AWS_")))
out["sees_etc"] = os.path.exists("/etc/passwd")
children = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            os._exit(0)
        children += 1
except OSError:
    pass
out["forks"] = children
print(json.dumps(out))
"""


def test_a_sandboxed_load_cannot_write_outside_its_scratch_or_open_a_socket(tmp_path):
    host_dir = tmp_path / "open"
    host_dir.mkdir()
    host_dir.chmod(0o777)  # writable by anyone: only the sandbox stands in the way
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    cmd = sandbox.command(["-c", _ESCAPE, str(host_dir / "out"), str(harness.ROOT / "escaped"),
                           str(listener.getsockname()[1])], scratch_bytes=16 << 20)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "LADDER_SECRET_PROBE": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    listener.close()
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["host_dir"] != "wrote" and out["repo"] != "wrote" and out["scratch"] == "wrote", out
    assert out["socket"] != "connected", out
    assert not (host_dir / "out").exists() and not (harness.ROOT / "escaped").exists()
    assert out["secrets"] == [] and not out["sees_etc"]
    assert out["forks"] < 64  # RLIMIT_NPROC, counted per sandbox
    if os.geteuid() == 0:
        assert out["uid"] == 65534


def test_concurrent_sandboxed_checks_are_capped(tmp_path):
    path = tmp_path / "model"
    path.write_bytes(exported())
    slots = sandbox._slots(1)
    slots.acquire()
    try:
        with pytest.raises(InputError, match="checking 1 custom") as e:
            sandbox.run_pt2check("check", path, "{}", memory_bytes=1 << 30, timeout_s=1, concurrent=1)
        assert status_of(e.value) == 503
    finally:
        slots.release()


@pytest.mark.slow
def test_over_http_the_exploit_is_refused_and_never_runs_and_a_genuine_pt2_job_succeeds(tmp_path):
    marker = tmp_path / "pwned"
    env = {"LADDER_DATA_DIR": str(tmp_path / "data"), "LADDER_DATABASE_URL": "", "LADDER_BROKER_URL": "",
           "LADDER_ARTIFACTS_URL": "", "OMP_NUM_THREADS": "2"}
    server = harness.Server(env, tmp_path / "server.log")
    try:
        key = (tmp_path / "data" / "local-api-key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        parts = good_parts(tmp_path)
        parts["model_spec"] = ("spec.json", json.dumps(CUSTOM_SPEC).encode(), "application/json")
        parts["config"] = ("config.json", quick_config(variants=[]).model_dump_json().encode(), "application/json")
        bad = {**parts, "model": ("net.pt2", planted(marker), "application/octet-stream")}
        r = httpx.post(f"{server.url}/v1/harden", headers=auth, files=bad, timeout=300)
        assert r.status_code == 422 and "not a plain dotted identifier" in r.json()["detail"], r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        good = {**parts, "model": ("net.pt2", exported(), "application/octet-stream")}
        r = httpx.post(f"{server.url}/v1/harden", headers=auth, files=good, timeout=300)
        assert r.status_code == 202, r.text
        job = harness.wait_for(f"{server.url}{r.headers['Location']}", key,
                               lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=900)
        assert job["status"] == "succeeded", job
        model = httpx.get(f"{server.url}/v1/jobs/{job['id']}/model", headers=auth, timeout=60)
        assert set(load_file_bytes(model.content)) == set(weights())
        assert not marker.exists()
    finally:
        server.stop()


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)
