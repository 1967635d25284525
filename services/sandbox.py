"""Run an uploaded custom network's loader (services.pt2check) in a bubblewrap sandbox.

The child sees a read-only view of just the Python install, the virtualenv and this package, a private
/tmp (its scratch, size-capped), a new /proc and a minimal /dev; it has no network (an empty network
namespace), its own PID, IPC and UTS namespaces, no capabilities, and runs as an unprivileged user
(nobody, when the service itself runs as root: bwrap sets up the mounts, setpriv drops to uid 65534;
otherwise the service's own unprivileged user inside a user namespace). The archive comes in on an
inherited read-only descriptor and the converted network goes out on another, so no path of the host is
writable or even named. The
child sets its own rlimits (services.pt2check.limit). Why bubblewrap: docs/security.md.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from services.errors import InputError, Unavailable

_ROOT = Path(__file__).resolve().parents[1]  # the directory that holds the `services` package
_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(n: int) -> threading.BoundedSemaphore:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(n, threading.BoundedSemaphore(n))


def available() -> str | None:
    """None when sandboxes can start here, else why not (in words an operator can act on)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


def command(argv: list[str], scratch_bytes: int) -> list[str]:
    """The bwrap command line that runs `python argv…` sandboxed."""
    binds = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.prefix),
                    _ROOT / "services"}, key=lambda p: len(p.parts))
    binds = [b for i, b in enumerate(binds) if not any(b.is_relative_to(a) for a in binds[:i])]
    parents = sorted({p for b in binds for p in b.parents if p not in (Path("/"), Path("/tmp"))}, key=lambda p: len(p.parts))
    cmd = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--clearenv",
           "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
           "--symlink", "usr/bin", "/bin", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
           # the scratch first: a checkout or virtualenv under /tmp is bound into it, read-only, not hidden by it
           "--perms", "1777", "--size", str(scratch_bytes), "--tmpfs", "/tmp"]
    for p in parents:  # bwrap would make them 0700, closed to the unprivileged user
        cmd += ["--perms", "0755", "--dir", str(p)]
    for b in binds:
        cmd += ["--ro-bind", str(b), str(b)]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp"]
    env = {"PATH": "/usr/bin", "HOME": "/tmp", "PYTHONPATH": str(_ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    if os.geteuid() == 0:
        # bwrap (privileged) builds the mounts; setpriv then drops to nobody for good, before Python starts
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs", "--inh-caps=-all"]
    else:
        cmd += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--"]
    return [*cmd, sys.executable, *argv]


def run_pt2check(mode: str, archive: Path, spec_json: str, *, memory_bytes: int, timeout_s: float, concurrent: int,
                 out: Path | None = None) -> dict:
    """Run `services.pt2check MODE` on `archive` in a sandbox; its JSON answer. `out` receives what it writes."""
    why = available()
    if why is not None:
        raise Unavailable(f"custom (.pt2) models are disabled on this server: {why}; upload a zoo architecture with "
                         "safetensors weights, or ask the operator to install it")
    slots = _slots(concurrent)
    if not slots.acquire(timeout=min(30.0, timeout_s)):
        raise Unavailable(f"the server is checking {concurrent} custom (.pt2) models already; retry in a minute")
    try:
        with archive.open("rb") as src, (out.open("wb") if out else open(os.devnull, "wb")) as sink:
            argv = ["-m", "services.pt2check", mode, str(src.fileno()), str(sink.fileno()), spec_json, str(memory_bytes),
                    str(int(timeout_s) + 1)]
            scratch = 2 * archive.stat().st_size + (64 << 20)  # the converted copy the child reads back, and slack
            done = subprocess.run(command(argv, scratch_bytes=scratch), capture_output=True, text=True, check=False,
                                  timeout=timeout_s, pass_fds=(src.fileno(), sink.fileno()), env={}, cwd="/")
    except subprocess.TimeoutExpired as e:
        raise InputError(f"model: loading and trying the .pt2 network took longer than {timeout_s:.0f} s; "
                         "upload a smaller network") from e
    finally:
        slots.release()
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
        raise InputError(f"model: the .pt2 network could not be loaded within {memory_bytes >> 20} MiB of memory and "
                         f"{timeout_s:.0f} s (the sandboxed loader exited with status {done.returncode}: {tail}); "
                         "upload a smaller network")
    if "error" in result:
        raise InputError(str(result["error"]))
    return result

