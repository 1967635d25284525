"""Temporary folders of the API and the workers, named after the process that owns them
(`ladder-<kind>-<pid>-XXXXXXXX` in the temp dir), so that the folders of a process killed before it
could clean up (up to an upload's size each) are recognised and removed by `sweep_scratch`.

A folder is its process's for as long as that process lives: it is removed only once no process has
that pid on this host, or the pid's process started after the folder was last written (a reused pid,
e.g. a restarted container whose main process is pid 1 again). The temp dir must therefore belong to
one host's (one container's) processes: never share it between containers."""

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from services.artifacts import newest_mtime

log = logging.getLogger(__name__)
OLD_STYLE_AGE_S = 86400.0  # folders of older versions name no pid: removed only once a day old
_KIND = re.compile(r"[a-z0-9]+")
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part
_OURS = re.compile(rf"ladder-([a-z0-9]+)-(\d+)-{_RANDOM}")
_OLD_STYLE = re.compile(rf"ladder-(?:upload-)?{_RANDOM}")  # tempfile.TemporaryDirectory(prefix="ladder-" / "ladder-upload-")


def directory(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for this process's `kind` of work ("upload", "stage"), removed when the block ends."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"scratch kind {kind!r}: use lowercase letters and digits")
    return tempfile.TemporaryDirectory(prefix=f"ladder-{kind}-{os.getpid()}-")


def sweep_scratch(grace_s: float, *, root: Path | None = None, now: float | None = None) -> list[tuple[str, float]]:
    """Remove the scratch folders in `root` (default: the temp dir) whose process is gone and that nothing wrote
    for `grace_s`, and folders of older versions (no pid in the name) a day old; (folder, age in s) of each,
    each also one warning line."""
    root = Path(root or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed: list[tuple[str, float]] = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith("ladder-") and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        ours = _OURS.fullmatch(entry.name)
        if ours:
            min_age = grace_s
        elif _OLD_STYLE.fullmatch(entry.name):
            min_age = OLD_STYLE_AGE_S
        else:  # not a name this service makes (ladder-bench-…, an operator's folder)
            continue
        path = Path(entry.path)
        newest = newest_mtime(path)
        if newest is None or now - newest < min_age:
            continue
        if ours and owner_alive(int(ours.group(2)), path.lstat().st_mtime):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.warning("sweeper: could not remove %s (%s old): check its permissions", path, age_text(now - newest))
            continue
        why = f"process {ours.group(2)} is gone" if ours else "a folder of an older version"
        log.warning("sweeper: removed temp folder %s (%s; last written %s ago)", path, why, age_text(now - newest))
        removed.append((str(path), now - newest))
    return removed


def owner_alive(pid: int, folder_mtime: float) -> bool:
    """Whether process `pid` lives on this host and may own a folder last modified at `folder_mtime`: a process
    made its folder after it started, so a pid whose process started later than that is another process's."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = _started_at(pid)
    return started is None or folder_mtime >= started - 2.0  # /proc/stat's btime has whole seconds


def _started_at(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from /proc on Linux; None elsewhere or if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards; comm may hold spaces
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot


def age_text(seconds: float) -> str:
    """An age for a log line: 40 s, 12 min, 3.5 h, 2.0 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
