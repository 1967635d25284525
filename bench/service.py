"""Service benchmark: status polls from 100 concurrent clients, and a 1 GB upload streamed to the
artifact store.

Runs `ladder serve` against a fresh PostgreSQL database and Redis (as deployed, without a
worker), then:
- polls: 100 clients on GET /v1/jobs/{id}, each on its own keep-alive connection. Paced: each
  client starts at a random moment and then polls once per interval on average (pauses drawn
  uniformly from ±50 %, so the clients are independent, as real pollers are); latency is taken
  per request, from sending it to reading the whole answer, by a small asyncio client (so it
  includes the client's own scheduling delay). The first interval (1 s, as `ladder submit`
  polls; the API's Retry-After says 5 s) gives the headline numbers. Also `wrk` with 100
  connections and no pause: the most the API serves, and its latency when overloaded;
- upload: POST /v1/harden with a ~1 GB train_data .npz (uint8 digits), sampling the API's resident
  memory (RSS) every 20 ms; the growth over its idle RSS is what the upload cost.

    .venv/bin/python bench/service.py [--seconds 20] [--intervals-ms 1000 250] [--upload-gb 1.0]

Needs PostgreSQL and Redis running (scripts/services) and wrk (apt-get install wrk).
"""

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.method.models import ModelSpec, build_classifier, net_weights  # noqa: E402
from tests import harness  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


async def _client(host: str, port: int, request: bytes, interval: float, until: float, rng: random.Random,
                  latencies: list[float], statuses: list[int]) -> None:
    """One poller on one keep-alive connection: random start, then jittered pauses."""
    reader, writer = await asyncio.open_connection(host, port)
    await asyncio.sleep(rng.uniform(0, interval))
    while time.perf_counter() < until:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        await reader.readexactly(length)
        latencies.append((time.perf_counter() - started) * 1e3)
        statuses.append(int(head.split(b" ", 2)[1]))
        await asyncio.sleep(rng.uniform(0.5 * interval, 1.5 * interval))
    writer.close()


def paced(url: str, key: str, seconds: int, clients: int, interval_ms: int, seed: int = 0) -> dict:
    """`clients` independent pollers, each once per interval on average; rate and latency percentiles (ms)."""
    u = httpx.URL(url)
    request = (f"GET {u.raw_path.decode()} HTTP/1.1\r\nHost: {u.host}\r\nAuthorization: Bearer {key}\r\n\r\n").encode()
    latencies: list[float] = []
    statuses: list[int] = []
    rng = random.Random(seed)

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_client(u.host, u.port, request, interval_ms / 1e3, until, rng, latencies, statuses)
                               for _ in range(clients)))

    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    q = [float(v) for v in np.percentile(latencies, [50, 75, 90, 99])]
    return {"requests_per_second": len(latencies) / elapsed, "p50_ms": q[0], "p75_ms": q[1], "p90_ms": q[2], "p99_ms": q[3],
            "max_ms": max(latencies), "requests": len(latencies), "non_2xx": sum(s >= 300 for s in statuses),
            "clients": clients, "seconds": seconds, "interval_ms": interval_ms}


def wrk(url: str, key: str, seconds: int, connections: int) -> dict:
    """Run wrk with no pause (saturation); its request rate and latency percentiles (ms)."""
    script = f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", f.name, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    pct = {int(p): float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": pct[50], "p75_ms": pct[75], "p90_ms": pct[90], "p99_ms": pct[99],
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else None,
        "connections": connections, "seconds": seconds,
    }


def inputs(d: Path, train_bytes: int) -> dict[str, Path]:
    """A LeNet spec and weights, and a train_data .npz of about `train_bytes` (uint8 digits)."""
    from services.datasets import mnist5k

    spec = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])
    (d / "spec.json").write_text(spec.model_dump_json())
    save_file(net_weights(build_classifier(spec)), str(d / "model.safetensors"))
    digits = mnist5k()
    x = (digits.x.numpy() * 255).round().astype(np.uint8)
    y = digits.y.numpy().astype(np.uint8)
    np.savez(d / "small.npz", x=x[::10], y=y[::10])  # 500 digits, 50 per class: the job whose status is polled
    reps = max(1, train_bytes // x.nbytes)
    path = d / "train.npz"
    with open(path, "wb") as f:  # tiled digits, written once; np.savez stores them uncompressed
        np.savez(f, x=np.tile(x, (reps, 1, 1, 1)), y=np.tile(y, reps))
    return {"model": d / "model.safetensors", "spec": d / "spec.json", "train": path, "small": d / "small.npz"}


def submit(url: str, key: str, files: dict[str, Path]) -> tuple[httpx.Response, float]:
    """POST /v1/harden, streaming the files; the response and the seconds it took."""
    started = time.perf_counter()
    with open(files["model"], "rb") as m, open(files["spec"], "rb") as s, open(files["train"], "rb") as t:
        r = httpx.post(f"{url}/v1/harden", headers={"Authorization": f"Bearer {key}"}, timeout=None, files={
            "model": ("model.safetensors", m, "application/octet-stream"),
            "model_spec": ("spec.json", s, "application/json"),
            "train_data": ("train.npz", t, "application/octet-stream"),
        })
    return r, time.perf_counter() - started


class PeakRSS(threading.Thread):
    """Samples a process's RSS (with its children) until stopped; the peak."""

    def __init__(self, pid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self.done = psutil.Process(pid), every, 0, threading.Event()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, self.rss())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--connections", type=int, default=100, help="concurrent clients")
    p.add_argument("--intervals-ms", type=int, nargs="+", default=[1000, 250], help="pauses of each client between its polls")
    p.add_argument("--upload-gb", type=float, default=1.0)
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn processes of the API (ladder serve --workers)")
    p.add_argument("--out", default=str(ROOT / "bench/results/service.json"))
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    harness.require_services()
    url, name = harness.create_database()
    from services.migrate import upgrade

    upgrade(url)
    work = Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    env = {"LADDER_DATABASE_URL": url, "LADDER_BROKER_URL": harness.REDIS_URL, "LADDER_QUEUE": f"bench-{name}",
           "LADDER_ARTIFACTS_URL": (work / "artifacts").as_uri(), "LADDER_DATA_DIR": str(work / "data")}
    server = None
    try:
        files = inputs(work, int(args.upload_gb * 1e9))
        small = dict(files, train=files["small"])
        server = harness.Server(env, work / "api.log", args.api_workers)
        key = harness.create_key(env, "bench")
        r, _ = submit(server.url, key, small)
        r.raise_for_status()
        job_url = f"{server.url}/v1/jobs/{r.json()['id']}"
        paced(job_url, key, 3, args.connections, args.intervals_ms[0])  # warm up: connections, caches
        polls = [paced(job_url, key, args.seconds, args.connections, ms) for ms in args.intervals_ms]
        saturated = wrk(job_url, key, args.seconds, args.connections)  # last: its backlog outlives it
        print(f"polls, paced: {polls}\npolls, saturated: {saturated}", flush=True)
        time.sleep(5)

        sampler = PeakRSS(server.p.pid)
        idle = sampler.rss()
        sampler.start()
        r, seconds = submit(server.url, key, files)
        sampler.done.set()
        sampler.join()
        if r.status_code != 202:
            sys.exit(f"upload refused: {r.status_code} {r.text}")
        size = files["train"].stat().st_size
        upload = {"bytes": size, "seconds": seconds, "mb_per_second": size / 1e6 / seconds,
                  "idle_rss_mb": idle / 2**20, "peak_rss_mb": sampler.peak / 2**20,
                  "peak_rss_growth_mb": (sampler.peak - idle) / 2**20}
        print(f"upload: {upload}", flush=True)
    finally:
        if server is not None:
            server.stop()
        harness.drop_database(name)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": " ".join([".venv/bin/python", "bench/service.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "api_workers": args.api_workers,
        "poll_p50_ms": polls[0]["p50_ms"], "poll_p99_ms": polls[0]["p99_ms"],
        "poll_requests_per_second": polls[0]["requests_per_second"], "poll_interval_ms": args.intervals_ms[0],
        "polls_paced": polls, "polls_saturated": saturated,
        "upload_peak_rss_growth_mb": upload["peak_rss_growth_mb"], "upload": upload,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
