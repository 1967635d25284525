"""What a report records of where it ran: the library versions that decide the numbers, and the device."""

import importlib.metadata
import platform
from typing import Any

import numpy as np
import torch
import torchvision

import services
from services import devices


def versions() -> dict[str, str]:
    """Library versions that decide the numbers."""
    return {
        "ladder": services.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__,
        "art": importlib.metadata.version("adversarial-robustness-toolbox"),
        "autoattack": importlib.metadata.version("pyautoattack"),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """The report's `versions` and `device` sections for a run on `device`."""
    return {"versions": versions(), "device": devices.describe(device)}
