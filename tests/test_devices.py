"""LADDER_DEVICE: which device stages compute on, refused in words where CUDA cannot be used; `auto` is the CPU on a
machine without CUDA. The tests marked `cuda` need a GPU and are skipped without one."""

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from services import devices
from services.errors import InputError
from services.jobs.models import STAGES
from services.method.models import build_classifier, net_weights
from services.settings import Settings

from . import harness
from .conftest import LENET_SPEC
from .test_service import _config, _submit, inputs  # noqa: F401

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine)")
no_cuda = pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")


def test_cpu_and_bad_names():
    assert devices.resolve("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(InputError, match="use auto, cpu, cuda or cuda:N"):
            devices.resolve(bad)
        with pytest.raises(ValidationError):
            Settings(device=bad)
    assert Settings().device == "auto" and Settings(device="cuda:1").device == "cuda:1"
    assert devices.describe(torch.device("cpu")) == {"device": "cpu", "threads": torch.get_num_threads()}


@no_cuda
def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused_saying_what_it_needs():
    assert devices.resolve("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(InputError, match=r"LADDER_DEVICE=cuda.*driver R580 or newer.*Turing.*or set LADDER_DEVICE=cpu"):
            devices.resolve(name)
    assert devices.check("auto") == {"device": "cpu", "threads": torch.get_num_threads()}
    with pytest.raises(InputError, match="driver R580"):  # the answer of the child process, as the worker gets it
        devices.check("cuda")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**os.environ, **(env or {})},
                          cwd=harness.ROOT, capture_output=True, text=True, timeout=300)


@no_cuda
def test_harden_refuses_cuda_without_it(tmp_path):
    save_file(net_weights(build_classifier(LENET_SPEC)), str(tmp_path / "model.safetensors"))
    (tmp_path / "spec.json").write_text(LENET_SPEC.model_dump_json())
    out = _cli("harden", "--model", str(tmp_path / "model.safetensors"), "--spec", str(tmp_path / "spec.json"),
               "--train", "mnist5k", "--out", str(tmp_path / "out"), "--device", "cuda")
    assert out.returncode == 2 and "driver R580" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@no_cuda
def test_a_worker_refuses_cuda_without_it_one_per_gpu_too(database, tmp_path):  # noqa: F811
    env = {"LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": harness.REDIS_URL, "LADDER_DATA_DIR": str(tmp_path),
           "LADDER_QUEUE": f"ladder-devices-{uuid.uuid4().hex[:8]}", "LADDER_ARTIFACTS_URL": tmp_path.as_uri()}
    one = _cli("worker", env={**env, "LADDER_DEVICE": "cuda"})
    assert one.returncode == 2 and "LADDER_DEVICE=cuda" in one.stderr and "driver R580" in one.stderr, one.stderr
    each = _cli("worker", "--gpus", "0,1", env=env)  # every GPU's worker is started, each refuses, so does the lot
    assert each.returncode == 2 and each.stderr.count("driver R580") >= 1, each.stderr
    assert "the worker of GPU" in each.stderr
    bad = _cli("worker", "--gpus", "0,0", env=env)
    assert bad.returncode == 2 and "distinct GPU indices" in bad.stderr


@cuda
def test_cuda_resolves_and_is_described():
    assert devices.resolve("auto") == torch.device("cuda:0") == devices.resolve("cuda")
    info = devices.check("cuda")
    assert info["device"] == "cuda:0" and info["gpu"] and info["cuda"] == torch.version.cuda and info["cudnn"]


@pytest.mark.slow
@cuda
def test_a_whole_job_over_http_with_a_celery_worker_on_the_gpu(database, inputs, tmp_path):  # noqa: F811
    """Every stage's process had the model on the GPU (each logs where its model is), the report says which GPU,
    and the downloaded weights load on a CPU."""
    env = {"LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": harness.REDIS_URL, "LADDER_DATA_DIR": str(tmp_path / "data"),
           "LADDER_QUEUE": f"ladder-gpu-{uuid.uuid4().hex[:8]}", "LADDER_ARTIFACTS_URL": (tmp_path / "store").as_uri(),
           "LADDER_DEVICE": "cuda", "LADDER_API_KEY_CACHE_S": "0"}
    server = harness.Server(env, tmp_path / "api.log")
    worker = harness.worker(env, tmp_path / "worker.log")
    try:
        key = harness.create_key(env, "gpu")
        r = _submit(server, key, inputs, _config())
        assert r.status_code == 202, r.text
        job = harness.wait_for(f"{server.url}/v1/jobs/{r.json()['id']}", key,
                               lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=900)
        assert job["status"] == "succeeded", (job, worker.tail())
        import httpx
        from safetensors.torch import load

        report = httpx.get(f"{server.url}/v1/jobs/{job['id']}/report", headers={"Authorization": f"Bearer {key}"}).json()
        assert report["device"]["device"] == "cuda:0" and report["device"]["gpu"], report["device"]
        weights = httpx.get(f"{server.url}/v1/jobs/{job['id']}/model", headers={"Authorization": f"Bearer {key}"}).content
        assert all(t.device.type == "cpu" for t in load(weights).values())
        log = worker.tail(200_000)
        assert "stages compute on device cuda:0" in log
        for stage in STAGES:
            assert f"job {job['id']}: {stage} computes on cuda:0" in log, stage
        assert report["determinism"]["deterministic_algorithms"], report["determinism"]
        # the same job on the CPU: float rounding differs, so the trained models may differ by a few test points
        (tmp_path / "config.json").write_text(_config())
        cpu = _cli("harden", "--model", str(inputs / "model.safetensors"), "--spec", str(inputs / "spec.json"),
                   "--train", str(inputs / "train.npz"), "--test", str(inputs / "test.npz"),
                   "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "cpu"), "--device", "cpu")
        assert cpu.returncode == 0, cpu.stderr
        on_cpu = json.loads((tmp_path / "cpu" / "report.json").read_text())
        assert on_cpu["device"]["device"] == "cpu"
        for name, m in report["models"].items():
            assert abs(m["clean_accuracy"] - on_cpu["models"][name]["clean_accuracy"]) <= 0.05, name  # stated: 5 points
    finally:
        worker.stop()
        server.stop()


# -- out of GPU memory: halve the stage's batch sizes and run again, down to a floor ---------------------------------

def test_halving_touches_the_stage_s_batch_sizes_only_and_stops_at_the_floor():
    from services.method import backoff, batches
    from services.method.config import LadderConfig

    cfg = batches.resolve(LadderConfig(), torch.device("cuda"))  # the sizes a GPU stage starts from
    smaller, changed = backoff.halved(cfg, "evaluate")
    assert changed == {"evaluate.batch_size": cfg.evaluate.batch_size // 2,
                       "evaluate.autoattack.batch_size": cfg.evaluate.autoattack.batch_size // 2,
                       "finetune.batch_size": cfg.finetune.batch_size // 2, "perturb.batch_size": cfg.perturb.batch_size // 2}
    assert smaller.generator.batch_size == cfg.generator.batch_size and smaller.seed == cfg.seed
    tiny = LadderConfig.model_validate({"finetune": {"batch_size": 15}})
    with pytest.raises(backoff.OutOfMemory, match=r"stage finetune ran out of GPU memory .*finetune.batch_size; floor 8"):
        backoff.halved(tiny, "finetune")
    with pytest.raises(backoff.OutOfMemory, match="none it can shrink"):
        backoff.halved(cfg, "latents")


def test_with_backoff_runs_again_smaller_after_an_out_of_memory(caplog):
    from services.method import backoff
    from services.method.config import LadderConfig

    seen, heard = [], []

    def stage(cfg):
        seen.append(cfg.generator.batch_size)
        if cfg.generator.batch_size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    cfg = LadderConfig()  # generator.batch_size 128
    assert backoff.with_backoff(stage, cfg, "generator", torch.device("cuda"), heard.append) == "done"
    assert seen == [128, 64, 32] and heard == [{"generator.batch_size": 64}, {"generator.batch_size": 32}]
    assert sum("ran out of GPU memory" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(torch.OutOfMemoryError):  # on the CPU an out-of-memory is not the GPU's: no halving
        backoff.with_backoff(stage, cfg, "generator", torch.device("cpu"))
    with pytest.raises(backoff.OutOfMemory):
        backoff.with_backoff(lambda c: stage(c.model_copy(update={"generator": c.generator.model_copy(update={"batch_size": 999})})),
                             cfg, "generator", torch.device("cuda"))


# -- inference batch sizes per device ---------------------------------------------------------------------------------

def test_unset_inference_batches_take_the_device_s_defaults_and_set_ones_are_kept():
    from services.method import batches
    from services.method.config import LadderConfig

    cpu = batches.resolve(LadderConfig(), torch.device("cpu"))
    # the CPU's are the sizes every published CPU figure ran with
    assert (cpu.evaluate.batch_size, cpu.evaluate.autoattack.batch_size, cpu.perturb.batch_size) == (500, 250, 1024)
    assert batches.latents(torch.device("cpu")) == 512
    gpu = batches.resolve(LadderConfig(), torch.device("cuda", 1))
    assert (gpu.evaluate.batch_size, gpu.evaluate.autoattack.batch_size, gpu.perturb.batch_size) == (4096, 1000, 8192)
    assert gpu.finetune.batch_size == cpu.finetune.batch_size == 64  # training batches are the method's, not the device's
    assert gpu.generator.batch_size == cpu.generator.batch_size == 128
    mine = LadderConfig.model_validate({"evaluate": {"batch_size": 64}, "perturb": {"batch_size": 32}})
    kept = batches.resolve(mine, torch.device("cuda"))
    assert (kept.evaluate.batch_size, kept.evaluate.autoattack.batch_size, kept.perturb.batch_size) == (64, 1000, 32)
    assert batches.resolve(kept, torch.device("cpu")) is kept  # nothing left unset
    assert batches.resolve(LadderConfig(), torch.device("mps")) == cpu  # another device type: the CPU's


def test_inference_batch_sizes_do_not_change_the_numbers(lenet):
    """Why the device may choose them: generation, its flip rates and PGD's examples are the same at any batch size."""
    from services.method.attacks import craft
    from services.method.config import EvaluateConfig
    from services.method.perturb import generate

    model = lenet.model
    x, y = lenet.test.x[:60], lenet.test.y[:60]
    small = EvaluateConfig(batch_size=7, attack={"pgd_steps": 5})
    large = EvaluateConfig(attack={"pgd_steps": 5})  # unset: the CPU's 500, one batch
    a, b = craft("pgd", model, x, y, small, 3, 10), craft("pgd", model, x, y, large, 3, 10)
    assert torch.allclose(a.x, b.x, atol=1e-6) and torch.equal(a.point, b.point)
    assert a.params == b.params

    g = torch.nn.Sequential(torch.nn.Linear(16, 784), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (1, 28, 28)))
    z, step = torch.randn(1500, 16, generator=torch.Generator().manual_seed(0)), torch.randn(1500, 16)
    ys, t = torch.zeros(1500, dtype=torch.long), torch.randint(0, 10, (1500,))
    one, many = generate(g, model, z, ys, t, step, [0.5, 1.0], 4096), generate(g, model, z, ys, t, step, [0.5, 1.0], 333)
    assert torch.allclose(one.x, many.x, atol=1e-6)
    assert one.image_flip_rate == many.image_flip_rate  # the first 1,000 rows of each ε, whatever the batch


def test_a_stage_output_keeps_its_notes(tmp_path):
    from services import checkpoints

    checkpoints.save({"x": 1}, tmp_path / "a.safetensors", notes={"batch_halvings": [{"finetune.batch_size": 32}]})
    checkpoints.save({"x": 1}, tmp_path / "b.safetensors")
    assert checkpoints.notes(tmp_path / "a.safetensors") == {"batch_halvings": [{"finetune.batch_size": 32}]}
    assert checkpoints.notes(tmp_path / "b.safetensors") == {}


@cuda
def test_a_real_cuda_out_of_memory_under_a_memory_cap_backs_off():
    """A capped share of the GPU (set_per_process_memory_fraction): 1 MiB per sample does not fit at the GPU's
    default generation batch (8192) in a 600 MiB cap, and fits after halvings."""
    from services.method import backoff
    from services.method.config import LadderConfig

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(600 * (1 << 20) / total, 0)
    try:
        def stage(cfg):
            x = torch.empty(cfg.perturb.batch_size, 1 << 18, device="cuda")  # 1 MiB per sample (fp32)
            return x.shape[0]

        heard = []
        fitted = backoff.with_backoff(stage, LadderConfig(), "adversarial", torch.device("cuda"), heard.append)
        assert fitted <= 512 and heard and heard[-1]["perturb.batch_size"] == fitted
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
