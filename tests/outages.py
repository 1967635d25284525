"""Outages on demand for the service tests: a TCP proxy that can drop every connection and refuse new ones (a
database that went away, as its clients see it), and a private Redis that can be stopped and started again on
the same port (a broker that went away)."""

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from .harness import free_port

_RESET = (socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # linger on, 0 s: close sends RST


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset, waking any thread blocked on it."""
    try:
        sock.setsockopt(*_RESET)
        sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() in another thread (close() alone would not)
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, two threads per connection. `cut()` resets every
    live connection and resets each new one as soon as it is accepted; `restore()` forwards again."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # accept() wakes up to see close()
        self.host, self.port = "127.0.0.1", self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._cut = self._closed = False
        self.refused = 0  # connections reset on arrival while cut
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"tcp-proxy-{self.port}")
        self._thread.start()

    def cut(self) -> None:
        """Reset every live connection; reset new ones until restore()."""
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and reset everything."""
        self._closed = True
        self.cut()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._cut:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = (client, upstream)
            with self._lock:
                if self._cut:  # cut() ran meanwhile
                    _reset(client)
                    _reset(upstream)
                    continue
                self._pairs.add(pair)
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        with self._lock:  # the first direction to end closes both ends; cut() may have taken the pair already
            mine = pair in self._pairs
            self._pairs.discard(pair)
        if mine:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RedisServer:
    """A `redis-server` of its own on a free port (no persistence, its own folder); `stop()` and `start()` again
    on the same port, as a broker restart looks to its clients."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary, self.port = binary, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="ladder-redis-"))
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 10) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server is running already"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.proc.returncode}):\n{self.log()}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout:g} s:\n{self.log()}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGTERM: a shutdown; SIGKILL: a crash) and wait until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self, n: int = 2000) -> str:
        """The end of its log, for failure messages."""
        path = self.dir / "redis.log"
        return path.read_bytes()[-n:].decode(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop it and remove its folder."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
