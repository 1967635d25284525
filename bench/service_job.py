"""One job through the service over real HTTP, for the benches that compare it with `ladder harden`
(bench/gpu.py, bench/engine.py): start the embedded `ladder serve`, then submit, poll and download."""

import json
import time
from pathlib import Path

from services.client import Client, ClientError
from tests import harness

DONE = ("succeeded", "failed", "canceled")


def start_embedded(env: dict[str, str], data_dir: Path, log: Path) -> tuple[harness.Server, str]:
    """`ladder serve` with nothing configured (SQLite, local artifacts, the in-process worker), its state in data_dir;
    (the server, once /readyz answers; the local API key it wrote)."""
    server = harness.Server({**env, **harness.EMBEDDED, "LADDER_DATA_DIR": str(data_dir)}, log)
    return server, (data_dir / "local-api-key").read_text().strip()


def run_job(url: str, key: str, files: dict, out: Path, deadline: float | None = None, every: float = 0.5) -> dict:
    """Submit `files` (model, spec, train, test, config: a path or None each), poll every `every` s, download the
    results into `out`. Timed from just before the upload to the downloaded results: what an API user waits for.
    Past `deadline` (a time.perf_counter() value) the job is cancelled and recorded as unfinished.
    {finished, status, job_id, t0, t1, wall_seconds; report when finished, why when not}."""
    client = Client(url, key)
    result: dict = {"finished": False}
    started = result["t0"] = time.perf_counter()
    job = client.submit(files["model"], files["spec"], files["train"], files.get("test"), files.get("config"))
    result["job_id"] = job["id"]
    while job["status"] not in DONE:
        if deadline is not None and time.perf_counter() >= deadline:
            client.cancel(job["id"])
            result["why"] = f"stopped at the budget, at stage {(job.get('progress') or {}).get('stage')}"
            break
        time.sleep(every)
        try:
            job = client.job(job["id"])
        except ClientError:
            continue  # a blip: poll again
    if job["status"] == "succeeded":
        _, report, _ = client.download(job["id"], out)
        result["report"] = json.loads(report.read_text())
        result["finished"] = True
    elif "why" not in result:
        result["why"] = f"job {job['status']}: {job.get('error')}"
    result["t1"] = time.perf_counter()
    result["wall_seconds"] = result["t1"] - started
    result["status"] = job["status"]
    return result
