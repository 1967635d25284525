"""What only the HTTP layer of a real `ladder serve` (embedded) shows: request bodies that stall or
trickle (408, connection closed), clients that hang up (one log line, 499 in /metrics), parts sent
as files the way curl sends them, and the server's memory over the whole bad-upload corpus."""

import json
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from . import harness
from .bad_uploads import LIMITS, SPEC, corpus, good_parts

pytestmark = pytest.mark.slow

GAP_S, TOTAL_S = 2.0, 5.0  # the test server's body timeouts
CAPS = {f"LADDER_MAX_{k.upper()}": str(getattr(LIMITS, k)) for k in  # the corpus's small caps
        ("model_bytes", "data_bytes", "json_bytes", "unzipped_bytes", "zip_ratio", "zip_members")}
MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An embedded `ladder serve` with short header and body timeouts, and an API key made by `ladder keys create`."""
    env = harness.embedded_env(tmp_path_factory.mktemp("data"), LADDER_BODY_READ_TIMEOUT_S=str(GAP_S),
                               LADDER_BODY_TOTAL_TIMEOUT_S=str(TOTAL_S), LADDER_HEADER_TIMEOUT_S=str(GAP_S), **CAPS)
    server = harness.Server(env, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        yield server, harness.create_key(env, "acme")
    finally:
        server.stop()


def _head(server, key: str, length: int, boundary: str = "b0undary") -> bytes:
    return (f"POST /v1/harden HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()


def _answer(sock: socket.socket, last: bool = True) -> tuple[int, dict[str, str], bytes, bool]:
    """Read one response off a raw socket: (status, headers, body, whether the server then closed the connection,
    which is only looked at for the `last` answer expected on it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    try:
        closed = last and sock.recv(1) == b""
    except ConnectionResetError:  # closed while the client still sent (a trickle): the kernel answers with a reset
        closed = last
    except TimeoutError:
        closed = False
    return int(lines[0].split()[1]), headers, body, closed


def _metric(server, route: str, status: int) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'ladder_http_requests_total\{{method="POST",route="{re.escape(route)}",status="{status}"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _start_of_a_body() -> bytes:
    return b'--b0undary\r\nContent-Disposition: form-data; name="model"; filename="m.safetensors"\r\n' \
           b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 100


def test_a_stalled_body_is_answered_408_and_its_connection_closed(served):
    server, key = served
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(GAP_S + 15)
        sock.sendall(_head(server, key, 100_000) + _start_of_a_body())  # and then nothing
        started = time.monotonic()
        status, headers, body, closed = _answer(sock)
        waited = time.monotonic() - started
    assert status == 408 and headers["content-type"] == "application/problem+json", (status, body)
    problem = json.loads(body)
    assert problem["status"] == 408 and "stalled" in problem["detail"] and "LADDER_BODY_READ_TIMEOUT_S" in problem["detail"]
    assert GAP_S - 0.2 <= waited < GAP_S + 5 and closed
    assert "Traceback" not in server.tail(20_000)


def test_a_trickled_body_is_answered_408_at_the_total_deadline(served):
    server, key = served
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(TOTAL_S + 15)
        sock.sendall(_head(server, key, 100_000) + _start_of_a_body())
        started = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:  # one byte every GAP_S / 4: never a stall, never done
            while not stop.wait(GAP_S / 4):
                try:
                    sock.sendall(b"\0")
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            status, _, body, closed = _answer(sock)
        finally:
            stop.set()
            t.join()
        waited = time.monotonic() - started
    assert status == 408 and "not complete after" in json.loads(body)["detail"], body
    assert TOTAL_S - 1 <= waited < TOTAL_S + 5 and closed


def test_a_stalled_request_head_is_answered_408_and_an_idle_connection_closed(served):
    server, key = served
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(GAP_S + 15)
        sock.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n".encode())  # no blank line
        started = time.monotonic()
        status, headers, body, closed = _answer(sock)
        assert status == 408 and headers["content-type"] == "application/problem+json" and closed, (status, body)
        assert "LADDER_HEADER_TIMEOUT_S" in json.loads(body)["detail"] and GAP_S - 0.2 <= time.monotonic() - started < GAP_S + 5
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # connects, sends nothing
        sock.settimeout(GAP_S + 15)
        started = time.monotonic()
        assert sock.recv(100) == b"" and time.monotonic() - started < GAP_S + 5
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # a kept-alive connection's second request stalls
        sock.settimeout(GAP_S + 15)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert _answer(sock, last=False)[0] == 200
        status, _, _, closed = _answer(sock)
        assert status == 408 and closed


def test_a_request_head_over_64_kib_is_answered_431(served):
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(15)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(66)))
        status, headers, body, closed = _answer(sock)
    assert status == 431 and headers["content-type"] == "application/problem+json" and closed, (status, body)
    assert "larger than 65,536 bytes" in json.loads(body)["detail"]
    r = httpx.get(f"{server.url}/healthz", headers={f"X-Pad-{i}": "a" * 1000 for i in range(60)})
    assert r.status_code == 200  # 60 KiB of headers pass


def test_a_client_that_hangs_up_is_one_log_line_and_499_not_an_error(served):
    server, key = served
    before = _metric(server, "/v1/harden", 499), _metric(server, "/v1/harden", 500)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head(server, key, 100_000) + _start_of_a_body())
        time.sleep(0.5)  # the server is reading the body
    deadline = time.monotonic() + 10
    while _metric(server, "/v1/harden", 499) == before[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "/v1/harden", 499) == before[0] + 1
    assert _metric(server, "/v1/harden", 500) == before[1]
    log = server.tail(20_000)
    assert "Traceback" not in log and "unhandled error" not in log and "Exception in ASGI application" not in log, log
    assert "POST /v1/harden: the client closed the connection before the answer was sent (499)" in log, log


def _files(tmp_path, **extra) -> dict:
    """The valid job's parts, every one a file part (model_spec and config too), plus `extra` ones."""
    return {**good_parts(tmp_path), **extra}


def test_every_part_sent_as_a_file_like_curl_does(served, tmp_path):
    server, key = served
    r = harness.submit_parts(server.url, key, _files(tmp_path))
    assert r.status_code == 202, r.text  # model_spec and config as files (curl -F model_spec=@spec.json) work
    job = r.json()
    assert job["spec"]["architecture"] == SPEC["architecture"] and job["config"]["seed"] == 1
    cancel = httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {key}"})
    assert cancel.status_code == 202 and cancel.json()["cancel_requested"]

    # all five parts as files, plus one more: refused naming the part (Starlette said 400 "Too many files")
    good = good_parts(tmp_path)
    twice = list(good.items()) + [("model", good["model"])]
    for files, status, fragment in (
        (_files(tmp_path, notes=("notes.txt", b"hi", "text/plain")), 422, "unknown part 'notes'"),
        (twice, 422, "part 'model' was sent more than once"),
        ({**good, "config": (None, b"{}" + b" " * (LIMITS.json_bytes + 10))}, 413, "part 'config' is larger than the 65,536-byte limit"),
        ({**good, "model_spec": (None, json.dumps(SPEC).encode())}, 202, ""),  # a field (curl -F 'model_spec={...}'), not a file
        ({**good, "model": (None, b"weights")}, 422, "part 'model' must be a file upload"),
    ):
        r = httpx.post(f"{server.url}/v1/harden", files=files, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == status, (fragment, r.status_code, r.text)
        if status == 202:
            httpx.post(f"{server.url}/v1/jobs/{r.json()['id']}/cancel", headers={"Authorization": f"Bearer {key}"})
            continue
        assert r.headers["content-type"] == "application/problem+json" and fragment in r.json()["detail"], r.text


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_with_every_part_a_file(served, tmp_path):
    server, key = served
    args = ["curl", "-sS", "-H", f"Authorization: Bearer {key}", f"{server.url}/v1/harden"]
    for name, (filename, content, _) in good_parts(tmp_path).items():
        (tmp_path / filename).write_bytes(content)
        args += ["-F", f"{name}=@{tmp_path / filename}"]  # curl picks each part's media type (octet-stream here)
    accepted = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert accepted["status"] in ("queued", "running"), accepted
    httpx.post(f"{server.url}/v1/jobs/{accepted['id']}/cancel", headers={"Authorization": f"Bearer {key}"})
    (tmp_path / "notes.txt").write_text("hi")
    for extra, fragment in ((["-F", f"notes=@{tmp_path / 'notes.txt'}"], "unknown part 'notes'"),
                            (["-F", f"config=@{tmp_path / 'config.json'}"], "part 'config' was sent more than once")):
        out = subprocess.run([*args, *extra, "-w", "\n%{http_code} %{content_type}"], capture_output=True, text=True, check=True,
                             timeout=60)
        body, _, status = out.stdout.rpartition("\n")
        assert status == "422 application/problem+json" and fragment in json.loads(body)["detail"], out.stdout


def test_a_malformed_multipart_body_is_a_400_problem(served):
    server, key = served
    auth = {"Authorization": f"Bearer {key}"}
    for content_type, body in (("multipart/form-data", b"--x\r\n"),  # no boundary
                               ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--x--\r\n")):
        r = httpx.post(f"{server.url}/v1/harden", content=body, headers={**auth, "Content-Type": content_type})
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
        assert "the multipart body cannot be parsed" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/harden", content=b"{}", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_the_bad_upload_corpus_leaves_the_servers_memory_where_it_was(tmp_path):
    env = harness.embedded_env(tmp_path / "data", **CAPS)
    server = harness.Server(env, tmp_path / "api.log")
    try:
        key = harness.create_key(env, "acme")
        cases = corpus(tmp_path)
        proc = psutil.Process(server.p.pid)
        assert httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200  # warm-up
        time.sleep(1)
        idle = proc.memory_info().rss
        after: list[tuple[str, int]] = []
        peak, stop = [idle], threading.Event()

        def sample() -> None:  # between the cases' ends too: the largest RSS at any time during the corpus
            while not stop.wait(0.05):
                peak[0] = max(peak[0], proc.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            harness.send_corpus(server.url, key, cases, after=lambda case: after.append((case.name, proc.memory_info().rss)))
        finally:
            stop.set()
            sampler.join()
        worst = max(after, key=lambda a: a[1])
        print(f"\nserver RSS over {len(cases)} bad uploads ({time.monotonic() - started:.1f} s): idle {idle / MiB:.1f} MiB, "
              f"highest after a case {worst[1] / MiB:.1f} MiB ({worst[0]}), peak sampled every 50 ms {peak[0] / MiB:.1f} MiB, "
              f"last {after[-1][1] / MiB:.1f} MiB")
        assert peak[0] - idle < 100 * MiB, [(n, round((r - idle) / MiB, 1)) for n, r in after]
    finally:
        server.stop()
