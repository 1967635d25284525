"""The service end to end: real PostgreSQL (migrated by Alembic), real Redis, `ladder serve` and
real `celery` worker processes, all over HTTP."""

import json
import uuid

import httpx
import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load, save_file
from sqlalchemy import create_engine, text

from services.artifacts import file_digest
from services.client import Client
from services.method.finetune import accuracy
from services.method.models import build_classifier, net_weights

from . import harness
from .bad_uploads import LIMITS, PWNED_MARKER, corpus
from .conftest import LENET_SPEC, quick_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(database, tmp_path_factory):
    store = tmp_path_factory.mktemp("artifacts")
    return {
        "LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": harness.REDIS_URL,
        "LADDER_QUEUE": f"ladder-test-{uuid.uuid4().hex[:8]}", "LADDER_ARTIFACTS_URL": store.as_uri(),
        "LADDER_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "LADDER_HEARTBEAT_S": "0.5", "LADDER_STALE_AFTER_S": "4", "LADDER_RECONCILE_EVERY_S": "1", "LADDER_REQUEUE_AFTER_S": "5",
        "LADDER_PROGRESS_EVERY_S": "0.2", "LADDER_API_KEY_CACHE_S": "0",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        **{f"LADDER_MAX_{k.upper()}": str(getattr(LIMITS, k)) for k in  # the corpus's small caps
           ("model_bytes", "data_bytes", "json_bytes", "unzipped_bytes", "zip_ratio", "zip_members")},
    }


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    s = harness.Server(env, tmp_path_factory.mktemp("logs") / "api.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keys(env, server):
    return {t: harness.create_key(env, t) for t in ("acme", "globex")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, lenet):
    d = tmp_path_factory.mktemp("inputs")
    save_file(net_weights(lenet.model), str(d / "model.safetensors"))
    (d / "spec.json").write_text(LENET_SPEC.model_dump_json())
    for name, data, start in (("train", lenet.train, 0), ("test", lenet.test, 0), ("validation", lenet.train, 5)):
        x, y = data.x[start::10], data.y[start::10]  # validation: training rows the job's train_data does not hold
        np.savez(d / f"{name}.npz", x=(x.numpy() * 255).round().astype(np.uint8), y=y.numpy())
    return d


def _config(**overrides) -> str:
    return quick_config(**overrides).model_dump_json()


def _submit(server, key, inputs, config: str, idempotency_key: str | None = None, validation: bool = False) -> httpx.Response:
    files = {
        "model": ("model.safetensors", (inputs / "model.safetensors").read_bytes(), "application/octet-stream"),
        "model_spec": ("spec.json", (inputs / "spec.json").read_bytes(), "application/json"),
        "train_data": ("train.npz", (inputs / "train.npz").read_bytes(), "application/octet-stream"),
        "test_data": ("test.npz", (inputs / "test.npz").read_bytes(), "application/octet-stream"),
        "config": ("config.json", config.encode(), "application/json"),
    }
    if validation:
        files["validation_data"] = ("val.npz", (inputs / "validation.npz").read_bytes(), "application/octet-stream")
    headers = {"Authorization": f"Bearer {key}", **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    return httpx.post(f"{server.url}/v1/harden", files=files, headers=headers, timeout=120)


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _rows(database: str, sql: str, **params) -> list:
    engine = create_engine(database)
    try:
        with engine.begin() as c:  # committed: a DELETE takes effect
            return list(c.execute(text(sql), params))
    finally:
        engine.dispose()


def _store_files(env) -> list:
    from pathlib import Path
    from urllib.parse import urlparse

    return sorted(p for p in Path(urlparse(env["LADDER_ARTIFACTS_URL"]).path).rglob("*") if p.is_file())


def test_whole_job_over_http_with_a_celery_worker(server, keys, inputs, env, database, tmp_path, lenet):
    w = harness.worker(env, tmp_path / "worker.log")
    try:
        r = _submit(server, keys["acme"], inputs, _config(), idempotency_key="job-1")
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] == "queued"
        again = _submit(server, keys["acme"], inputs, _config(), idempotency_key="job-1")
        assert again.status_code == 202 and again.json()["id"] == job["id"]  # same key, same payload: the same job
        other = _submit(server, keys["acme"], inputs, _config(seed=1), idempotency_key="job-1")
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]

        url = f"{server.url}/v1/jobs/{job['id']}"
        seen = set()
        done = harness.wait_for(url, keys["acme"], lambda j: seen.add(j["progress"]["stage"]) or j["status"] in
                                ("succeeded", "failed", "canceled"), timeout=400)
        assert done["status"] == "succeeded", (done, w.tail())
        assert len(seen) >= 3  # progress moved through stages while we polled
        assert all(s["status"] == "done" and s["attempts"] == 1 and s["seconds"] > 0 for s in done["stages"])

        m = httpx.get(f"{url}/model", headers=_auth(keys["acme"]), timeout=60)
        assert m.status_code == 200 and m.headers["etag"] == f'"{__import__("hashlib").sha256(m.content).hexdigest()}"'
        assert httpx.get(f"{url}/model", headers={**_auth(keys["acme"]), "If-None-Match": m.headers["etag"]}).status_code == 304
        report = httpx.get(f"{url}/report", headers=_auth(keys["acme"])).json()
        model = build_classifier(LENET_SPEC, load(m.content))
        test = np.load(inputs / "test.npz")
        x, y = torch.from_numpy(test["x"]).float().div(255), torch.from_numpy(test["y"]).long()
        assert report["data"]["evaluated"] == len(y)
        assert accuracy(model, x, y) == pytest.approx(report["models"]["ladder"]["clean_accuracy"], abs=1e-9)
        assert set(report["models"]) == {"vanilla", "control", "ladder"}
        assert _rows(database, "SELECT report->>'schema' FROM jobs WHERE id = :id", id=job["id"])[0][0] == "ladder.report/2"
        page = httpx.get(f"{url}/report.html", headers=_auth(keys["acme"]), timeout=60)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["etag"] == f'"{__import__("hashlib").sha256(page.content).hexdigest()}"'
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page.text
        assert httpx.get(f"{url}/report.html", headers={**_auth(keys["acme"]), "If-None-Match": page.headers["etag"]}
                         ).status_code == 304

        stored = {row[0]: row for row in _rows(database, "SELECT name, key, sha256, size FROM artifacts WHERE job_id = :id", id=job["id"])}
        assert set(stored) == {"model", "model.control", "report.html", "input.model", "input.train_data", "input.test_data"}
        for key, sha, size in (row[1:] for row in stored.values()):  # every artifact is there, once, with its SHA-256
            assert file_digest(next(p for p in _store_files(env) if p.as_posix().endswith(key))) == (sha, size)
        assert not [p for p in _store_files(env) if p.suffix == ".tmp" or "/stages/" in p.as_posix()]

        # a job without a page (its rendering failed): a 404 that says where the numbers are, and the
        # client still downloads the weights and report.json
        _rows(database, "DELETE FROM artifacts WHERE job_id = :id AND name = 'report.html' RETURNING name", id=job["id"])
        gone = httpx.get(f"{url}/report.html", headers=_auth(keys["acme"]))
        assert gone.status_code == 404 and f"/v1/jobs/{job['id']}/report has every number" in gone.json()["detail"]
        model_path, report_path, page = Client(server.url, keys["acme"]).download(job["id"], tmp_path / "download")
        assert page is None and not (tmp_path / "download" / "report.html").exists()
        assert json.loads(report_path.read_text())["schema"] == "ladder.report/2" and model_path.read_bytes() == m.content
    finally:
        w.stop()


def test_a_job_chooses_its_checkpoints_on_the_uploaded_validation_data(server, keys, inputs, env, database, tmp_path):
    off = _submit(server, keys["acme"], inputs, _config(), validation=True)  # quick_config: the selection off
    assert off.status_code == 422 and "select.max_clean_drop" in off.json()["detail"]
    w = harness.worker(env, tmp_path / "worker.log")
    try:
        r = _submit(server, keys["acme"], inputs, _config(select={"max_clean_drop": 0.5, "robust_points": 100}),
                    validation=True)
        assert r.status_code == 202, r.text
        url = f"{server.url}/v1/jobs/{r.json()['id']}"
        done = harness.wait_for(url, keys["acme"], lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=400)
        assert done["status"] == "succeeded", (done, w.tail())
        report = httpx.get(f"{url}/report", headers=_auth(keys["acme"])).json()
    finally:
        w.stop()
    sel = report["selection"]
    n = len(np.load(inputs / "validation.npz")["y"])
    assert sel["validation"] == {"n": n, "robust_points": 100, "source": "uploaded", "fraction": None}
    assert report["data"]["train"] == len(np.load(inputs / "train.npz")["y"])  # nothing carved from train_data
    assert set(sel["models"]) == {"control", "ladder"} and all(m["curve"] for m in sel["models"].values())
    names = {row[0] for row in _rows(database, "SELECT name FROM artifacts WHERE job_id = :id", id=r.json()["id"])}
    assert "input.validation_data" in names


def test_a_worker_killed_mid_stage_is_replaced_and_the_job_resumes_there(server, keys, inputs, env, database, tmp_path):
    w1 = harness.worker(env, tmp_path / "worker1.log")
    r = _submit(server, keys["acme"], inputs, _config(generator={"max_epochs": 60, "time_budget_s": 300}))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    url = f"{server.url}/v1/jobs/{job_id}"
    try:
        harness.wait_for(url, keys["acme"], lambda j: j["progress"]["stage"] == "generator" and j["progress"]["stage_fraction"] > 0.05
                         or j["status"] != "queued" and j["status"] != "running", timeout=300, every=0.1)
    finally:
        w1.kill()  # SIGKILL to the worker and its pool child, mid-stage
    before = {s: (n, c) for s, n, c in _rows(database, "SELECT stage, attempts, computed FROM job_stages WHERE job_id = :id", id=job_id)}
    assert before["generator"] == (1, 0) and before["adversarial"] == (0, 0)
    w2 = harness.worker(env, tmp_path / "worker2.log")
    try:
        done = harness.wait_for(url, keys["acme"], lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=500)
        assert done["status"] == "succeeded", (done, w2.tail())
    finally:
        w2.stop()
    after = {s: (n, c) for s, n, c in _rows(database, "SELECT stage, attempts, computed FROM job_stages WHERE job_id = :id", id=job_id)}
    assert after.pop("generator") == (2, 1)  # started twice, its work completed once
    assert all(v == (1, 1) for v in after.values()), after  # no completed stage ran again
    names = [n for (n,) in _rows(database, "SELECT name FROM artifacts WHERE job_id = :id", id=job_id)]
    assert sorted(names) == ["input.model", "input.test_data", "input.train_data", "model", "model.control", "report.html"]
    files = [p for p in _store_files(env) if job_id in p.as_posix()]
    assert len(files) == 6 and not [p for p in files if p.suffix == ".tmp"]


def test_a_job_whose_message_the_broker_lost_is_enqueued_again(server, keys, inputs, env, tmp_path):
    job_id = _submit(server, keys["acme"], inputs, _config()).json()["id"]
    assert redis.Redis.from_url(harness.REDIS_URL).delete(env["LADDER_QUEUE"]) == 1  # Redis loses the queued message
    w = harness.worker(env, tmp_path / "worker.log")
    try:
        done = harness.wait_for(f"{server.url}/v1/jobs/{job_id}", keys["acme"],
                                lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=400)
        assert done["status"] == "succeeded", (done, w.tail())
    finally:
        w.stop()
    assert f"job {job_id} sent again at latents" in server.tail(200_000)


def test_cancel_queued_and_running(server, keys, inputs, env, database, tmp_path):
    queued = _submit(server, keys["acme"], inputs, _config()).json()  # no worker runs: it stays queued
    r = httpx.post(f"{server.url}/v1/jobs/{queued['id']}/cancel", headers=_auth(keys["acme"]))
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert not [p for p in _store_files(env) if queued["id"] in p.as_posix()]  # its uploads are gone
    again = httpx.post(f"{server.url}/v1/jobs/{queued['id']}/cancel", headers=_auth(keys["acme"]))
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"

    w = harness.worker(env, tmp_path / "worker.log")
    try:
        running = _submit(server, keys["acme"], inputs, _config(generator={"max_epochs": 60, "time_budget_s": 300})).json()
        url = f"{server.url}/v1/jobs/{running['id']}"
        harness.wait_for(url, keys["acme"], lambda j: j["progress"]["stage"] == "generator" and j["status"] == "running", every=0.1)
        r = httpx.post(f"{url}/cancel", headers=_auth(keys["acme"]))
        assert r.status_code == 202 and r.json()["cancel_requested"]
        done = harness.wait_for(url, keys["acme"], lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=60)
        assert done["status"] == "canceled" and done["progress"]["stage"] == "generator"
        assert not [p for p in _store_files(env) if running["id"] in p.as_posix()]
        assert httpx.get(f"{url}/model", headers=_auth(keys["acme"])).status_code == 409
    finally:
        w.stop()


def test_a_tenant_never_sees_another_tenants_jobs(server, keys, inputs):
    job = _submit(server, keys["acme"], inputs, _config()).json()
    base = f"{server.url}/v1/jobs/{job['id']}"
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/model"), ("GET", "/report"), ("GET", "/report.html")):
        r = httpx.request(method, base + path, headers=_auth(keys["globex"]))
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["title"] == "Not Found" and job["id"] in r.json()["detail"]
    listed = httpx.get(f"{server.url}/v1/jobs", headers=_auth(keys["globex"])).json()
    assert job["id"] not in [j["id"] for j in listed["items"]]
    newer = _submit(server, keys["acme"], inputs, _config(seed=2)).json()
    mine = httpx.get(f"{server.url}/v1/jobs?limit=1", headers=_auth(keys["acme"])).json()
    assert [j["id"] for j in mine["items"]] == [newer["id"]] and mine["next"]  # newest first, one per page
    nxt = httpx.get(server.url + mine["next"], headers=_auth(keys["acme"])).json()
    assert nxt["items"][0]["id"] == job["id"]
    for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        r = httpx.get(base, headers=bad)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    for j in (job, newer):
        assert httpx.post(f"{server.url}/v1/jobs/{j['id']}/cancel", headers=_auth(keys["acme"])).json()["status"] == "canceled"


def test_health_readiness_metrics_and_openapi(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["database"] == "ok" and ready["broker"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "ladder_http_requests_total" in metrics and "ladder_jobs" in metrics
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/harden"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["model", "model_spec", "train_data"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/model",
            "/v1/jobs/{job_id}/report", "/v1/jobs/{job_id}/report.html"} <= set(spec["paths"])
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_bad_uploads_get_a_clear_4xx_and_leave_nothing(server, keys, env, database, tmp_path):
    jobs_before = _rows(database, "SELECT count(*) FROM jobs")[0][0]
    files_before = _store_files(env)
    cases = corpus(tmp_path)
    assert len(cases) >= 20
    harness.send_corpus(server.url, keys["acme"], cases)
    assert _rows(database, "SELECT count(*) FROM jobs")[0][0] == jobs_before  # no job row left behind
    assert _store_files(env) == files_before  # no artifact left behind
    assert not PWNED_MARKER.exists()  # the planted pickle and the planted .pt2 names never ran
    r = httpx.post(f"{server.url}/v1/harden", json={"model": "x"}, headers=_auth(keys["acme"]))
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
