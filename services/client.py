"""A client for the HTTP API: submit a job, follow it with progress bars, download the results."""

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from services.checkpoints import atomic_write
from services.errors import InputError
from services.method.stages import JOB_STAGES


class ClientError(Exception):
    """The server refused a request or the job failed; the message says why."""


class NotFound(ClientError):
    """The server answered 404."""


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        return body.get("detail") or json.dumps(body)
    except ValueError:
        return r.text[:300]


class Client:
    """Talks to one ladder server with one API key."""

    def __init__(self, server: str, key: str, timeout: float = 60.0):
        self.http = httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            error = NotFound if r.status_code == 404 else ClientError
            raise error(f"{r.request.method} {r.request.url.path}: {r.status_code} {_detail(r)}")
        return r

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._check(self.http.request(method, path, **kwargs))
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.http.base_url}: {e}; is the server running?") from e

    def submit(self, model: Path, spec: Path, train: Path, test: Path | None = None, config: Path | None = None,
               idempotency_key: str | None = None, validation: Path | None = None) -> dict:
        """Upload a job (files are streamed); the job resource."""
        parts = {"model": model, "model_spec": spec, "train_data": train, "test_data": test,
                 "validation_data": validation, "config": config}
        types = {"model_spec": "application/json", "config": "application/json"}
        with ExitStack() as stack:
            files = {}
            for name, path in parts.items():
                if path is None:
                    continue
                if not path.is_file():
                    raise InputError(f"{name} {path} not found")
                files[name] = (path.name, stack.enter_context(open(path, "rb")), types.get(name, "application/octet-stream"))
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
            return self._send("POST", "/v1/harden", files=files, headers=headers, timeout=None).json()

    def job(self, job_id: str) -> dict:
        """The job resource."""
        return self._send("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        """Ask the server to cancel the job."""
        return self._send("POST", f"/v1/jobs/{job_id}/cancel").json()

    def wait(self, job_id: str, every: float = 1.0, console: Console | None = None) -> dict:
        """Poll until the job ends, showing a bar per stage; the final job resource."""
        console = console or Console(stderr=True)
        bars = Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        tasks = {s: bars.add_task(s, total=1.0, info="", start=False, visible=False) for s in JOB_STAGES}
        failures = 0
        with bars:
            while True:
                try:
                    job = self.job(job_id)
                    failures = 0
                except ClientError:
                    failures += 1  # a restarting server or a blip: the job goes on without us
                    if failures > 10:
                        raise
                    time.sleep(every)
                    continue
                p = job["progress"]
                for row in job["stages"]:
                    if row["status"] == "pending" and row["stage"] != p["stage"]:
                        continue
                    task = tasks[row["stage"]]
                    bars.start_task(task)
                    done = row["status"] == "done"
                    info = "" if done else " ".join(f"{k}={v:.4g}" for k, v in list(p["metrics"].items())[:2])
                    if not done and p["eta_seconds"] is not None:
                        info += f" job ETA {p['eta_seconds']:.0f}s"
                    bars.update(task, visible=True, completed=1.0 if done else p["stage_fraction"], info=info)
                if job["status"] in ("succeeded", "failed", "canceled"):
                    return job
                time.sleep(every)

    def download(self, job_id: str, out: Path) -> tuple[Path, Path, Path | None]:
        """Save report.json, the hardened weights and the report's page (each file checked against its ETag)
        into `out`; the page is None when the job has none (it could not be rendered)."""
        out.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self._send("GET", f"/v1/jobs/{job_id}/report").json(), indent=2) + "\n"
        report = out / "report.json"
        atomic_write(report, lambda p: p.write_text(body))
        model = self._fetch(f"/v1/jobs/{job_id}/model", out / "hardened.safetensors", "model")
        try:
            page = self._fetch(f"/v1/jobs/{job_id}/report.html", out / "report.html", "report page")
        except NotFound:
            page = None
        return model, report, page

    def _fetch(self, path: str, dest: Path, what: str) -> Path:
        """Stream a download into dest, checked against its ETag (the SHA-256); nothing is left behind on failure."""
        tmp = dest.with_suffix(".part")
        h = hashlib.sha256()
        try:
            with self.http.stream("GET", path) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                etag = r.headers.get("etag", "").strip('"')
        except httpx.HTTPError as e:
            tmp.unlink(missing_ok=True)
            raise ClientError(f"the download of the {what} broke off ({e}); run the command again") from e
        if etag != h.hexdigest():
            tmp.unlink()
            raise ClientError(f"the downloaded {what}'s SHA-256 {h.hexdigest()} does not match its ETag {etag}; download again")
        tmp.replace(dest)
        return dest
