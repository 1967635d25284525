"""Which device the method computes on: LADDER_DEVICE (or `ladder harden --device`) = auto | cpu | cuda | cuda:N.

`auto` is the first visible CUDA device, else the CPU. `cuda` asked for where CUDA cannot be used is refused in
words that name what it needs. A process that forks workers (the Celery parent) must not initialise CUDA: it
asks `check()`, which resolves the device in a short-lived child process.
"""

import json
import os
import re
import subprocess
import sys
from typing import Any

import torch

from services.errors import InputError

PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
# what torch==2.14.1's CUDA 13.0 wheels run on (requirements.txt pins them)
REQUIREMENT = ("this torch's CUDA 13.0 build needs an NVIDIA driver R580 or newer and a Turing-or-newer GPU "
               "(compute capability 7.5+), visible to the process (CUDA_VISIBLE_DEVICES, docker --gpus)")
MIN_CAPABILITY = (7, 5)


def resolve(name: str) -> torch.device:
    """The device for a LADDER_DEVICE value; InputError when CUDA is asked for and cannot be used."""
    if not re.match(PATTERN, name):
        raise InputError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda:0") if _usable(0) is None else torch.device("cpu")
    index = int(name.partition(":")[2] or 0)
    why = _usable(index)
    if why is not None:
        raise InputError(f"LADDER_DEVICE={name}: {why}; {REQUIREMENT}; or set LADDER_DEVICE=cpu (or auto)")
    return torch.device(f"cuda:{index}")


def _usable(index: int) -> str | None:
    """None if CUDA device `index` can run this torch, else why not."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if not torch.cuda.is_available():
        return "CUDA is not available (no NVIDIA driver or GPU visible, or a driver older than this torch's CUDA)"
    count = torch.cuda.device_count()
    if index >= count:
        return f"there is no CUDA device {index} ({count} visible)"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return f"CUDA device {index} ({name}) has compute capability {capability[0]}.{capability[1]}"
    return None


def describe(device: torch.device) -> dict[str, Any]:
    """What a report and a start-up line say about the device: its name, and for CUDA the GPU, the CUDA, cuDNN and
    driver versions."""
    if device.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_mb": props.total_memory // (1 << 20), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "driver": _driver(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), if it can be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`describe(resolve(name))`, worked out in a child process (with `env`), so that the caller never initialises
    CUDA; InputError as `resolve` raises it. Without an NVIDIA driver's device node, `auto` is the CPU at once."""
    if name == "cpu" or (name == "auto" and not os.path.exists("/dev/nvidiactl")):
        return describe(torch.device("cpu"))
    out = subprocess.run([sys.executable, "-m", "services.devices", name], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    try:
        answer = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as e:
        raise InputError(f"the device check for {name!r} failed: {out.stderr.strip()[-500:] or 'no answer'}") from e
    if "error" in answer:
        raise InputError(answer["error"])
    return answer


if __name__ == "__main__":  # the child process of check()
    try:
        print(json.dumps(describe(resolve(sys.argv[1]))))
    except InputError as e:
        print(json.dumps({"error": str(e)}))
