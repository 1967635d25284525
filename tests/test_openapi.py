"""The OpenAPI document against a real embedded `ladder serve`: what it states (problem details for
every error, the statuses that really happen, the parts, UUID ids, the cursor), and a bounded
schemathesis run over every operation that must find no 5xx and no answer the document does not allow."""

import base64
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from services.uploads import PARTS

from . import harness
from .bad_uploads import good_parts

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = int(os.environ.get("LADDER_SCHEMATHESIS_EXAMPLES", "25"))  # per operation and phase: ≈ 60 s on 2 cores
SEED = int(os.environ.get("LADDER_SCHEMATHESIS_SEED", "1"))  # fixed: a failure reproduces


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An embedded server, an API key from `ladder keys create`, and two canceled jobs of that key."""
    env = harness.embedded_env(tmp_path_factory.mktemp("data"))
    server = harness.Server(env, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        key = harness.create_key(env, "acme")
        auth = {"Authorization": f"Bearer {key}"}
        jobs = []
        for _ in range(2):
            r = harness.submit_parts(server.url, key, good_parts(tmp_path_factory.mktemp("parts")))
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
            assert httpx.post(f"{server.url}/v1/jobs/{jobs[-1]}/cancel", headers=auth).status_code == 202
        yield server, key, jobs
    finally:
        server.stop()


def test_the_document_states_problem_details_parts_ids_and_cursor(served):
    server, key, jobs = served
    doc = httpx.get(f"{server.url}/openapi.json").json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}
    codes = {}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            codes[f"{method.upper()} {path}"] = {int(c) for c in op["responses"]}
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert response["content"] == problem, (path, method, code)
            for p in op.get("parameters", []):
                if p["name"] == "job_id":
                    assert p["in"] == "path" and p["schema"]["format"] == "uuid"
    assert set(doc["components"]["schemas"]["ProblemOut"]["required"]) == {"type", "title", "status", "detail"}
    assert codes["POST /v1/harden"] == {202, 400, 401, 408, 413, 415, 422, 429, 500, 503, 507}
    assert codes["GET /v1/jobs"] == {200, 401, 422, 500, 503}  # 503: the database is unavailable
    assert codes["GET /v1/jobs/{job_id}"] == {200, 401, 404, 422, 500, 503}
    assert codes["POST /v1/jobs/{job_id}/cancel"] == {202, 401, 404, 409, 422, 500, 503}
    assert codes["GET /v1/jobs/{job_id}/model"] == {200, 304, 401, 404, 409, 422, 500, 503}
    assert codes["GET /readyz"] == {200, 503, 500}
    assert codes["GET /metrics"] == {200, 500, 503} and codes["GET /healthz"] == {200, 500}
    for op in ("POST /v1/harden", "GET /v1/jobs/{job_id}", "GET /readyz"):  # every outage answer says when to retry
        method, path = op.split()
        for code in ("503", "507") if op == "POST /v1/harden" else ("503",):
            assert "Retry-After" in doc["paths"][path][method.lower()]["responses"][code]["headers"], (op, code)
    assert doc["paths"]["/v1/jobs/{job_id}/model"]["get"]["responses"]["200"]["content"] == {"application/octet-stream": {}}

    body = doc["paths"]["/v1/harden"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(body["schema"]["properties"]) == set(PARTS) and body["schema"]["additionalProperties"] is False
    assert body["schema"]["required"] == ["model", "model_spec", "train_data"]
    for name, rule in PARTS.items():
        assert all(s in body["schema"]["properties"][name]["description"] for s in rule.suffixes), name
        assert set(body["encoding"][name]["contentType"].split(", ")) == set(rule.content_types), name

    cursor = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "cursor")
    pattern = next(s["pattern"] for s in cursor["schema"]["anyOf"] if s.get("type") == "string")
    page = httpx.get(f"{server.url}/v1/jobs?limit=1", headers={"Authorization": f"Bearer {key}"}).json()
    given = page["next"].partition("cursor=")[2]
    assert re.fullmatch(pattern, given) and base64.urlsafe_b64decode(given).decode().endswith(f"|{jobs[1]}")  # the newest


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(served, tmp_path):
    server, key, jobs = served
    cursor = httpx.get(f"{server.url}/v1/jobs?limit=1", headers={"Authorization": f"Bearer {key}"}).json()["next"].partition("cursor=")[2]
    config = tmp_path / "schemathesis.toml"
    config.write_text(  # half the cases use a real (canceled) job and cursor of this key: 200s, 409s, not only 404s
        f'[dictionaries.jobs]\nvalues = ["{jobs[0]}", "{jobs[1]}", "{uuid.uuid4()}"]\n'
        f'[dictionaries.cursors]\nvalues = ["{cursor}"]\n'
        '[parameters]\n"path.job_id" = { dictionary = "jobs", probability = 0.5 }\n'
        '"query.cursor" = { dictionary = "cursors", probability = 0.5 }\n')
    started = time.monotonic()
    out = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run", f"{server.url}/openapi.json",
         "--checks", CHECKS, "--header", f"Authorization: Bearer {key}", "--max-examples", str(MAX_EXAMPLES),
         "--seed", str(SEED), "--workers", "1", "--request-timeout", "30", "--report", "junit",
         "--report-junit-path", str(tmp_path / "junit.xml")],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    seconds = time.monotonic() - started
    generated = re.search(r"(\d+) generated", out.stdout)
    tested = re.search(r"Tested: (\d+)", out.stdout)
    print(f"\nschemathesis {CHECKS}: {generated and generated.group(1)} cases over {tested and tested.group(1)} "
          f"operations in {seconds:.1f} s (max examples {MAX_EXAMPLES}, seed {SEED})")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:] + server.tail()
    operations = sum(len(ops) for ops in httpx.get(f"{server.url}/openapi.json").json()["paths"].values())
    assert tested and int(tested.group(1)) == operations  # every operation
    assert "Traceback" not in server.tail(50_000)
