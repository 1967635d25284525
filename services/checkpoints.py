"""Stage outputs as files: tensors in safetensors, everything else as JSON in its metadata. No pickle.

A value is any nesting of dicts, lists, JSON scalars, tensors and the method's dataclasses; it is
written atomically (temporary file, then rename), so a crash never leaves a half-written stage.
"""

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import services
from services.method.config import LadderConfig
from services.method.models import ModelSpec
from services.method.pipeline import STAGE_SCHEMA

_DATACLASS_MODULES = ("services.method.",)


def inputs_digest(spec: ModelSpec, config: LadderConfig, inputs: Sequence[str | None]) -> str:
    """What keys a run's stored stages: this code's version and stage schema, the spec, the configuration and a
    digest of each input (None for one not given). Stored stages are reused only under the same key."""
    return hashlib.sha256(json.dumps([
        services.__version__, STAGE_SCHEMA, spec.model_dump(mode="json"), config.model_dump(mode="json"), list(inputs),
    ]).encode()).hexdigest()


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if dataclasses.is_dataclass(value):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("only dicts with string keys can be stored")
        return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__dict__" in value:
        return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
    module, _, name = value["__dataclass__"].partition(":")
    if not module.startswith(_DATACLASS_MODULES):
        raise ValueError(f"refusing to build {value['__dataclass__']}: not one of the method's dataclasses")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"refusing to build {value['__dataclass__']}: not a dataclass")
    return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(value: Any, path: Path, seconds: float | None = None, notes: dict[str, Any] | None = None) -> None:
    """Write `value` to `path` (safetensors) atomically, with the seconds its work took and notes about how it was
    made (JSON), if given."""
    tensors: dict[str, Tensor] = {}
    meta = {"ladder": json.dumps(_encode(value, tensors))}
    if seconds is not None:
        meta["ladder.seconds"] = repr(float(seconds))
    if notes:
        meta["ladder.notes"] = json.dumps(notes)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def work_seconds(path: Path) -> float | None:
    """The seconds recorded by `save`, if any."""
    value = _meta(path).get("ladder.seconds")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def notes(path: Path) -> dict[str, Any]:
    """The notes recorded by `save` (empty if none)."""
    try:
        value = json.loads(_meta(path).get("ladder.notes") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def load(path: Path) -> Any:
    """Read a value written by `save`."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ladder"])
    return _decode(meta, load_file(str(path)))


class DirectoryStore:
    """A StageStore that keeps each stage's output as `<dir>/<stage>.safetensors`."""

    def __init__(self, directory: Path):
        self.directory = directory  # made on the first save, so a run refused at the start leaves nothing

    def load(self, stage: str) -> Any | None:
        """The stage's stored output, or None."""
        path = self.directory / f"{stage}.safetensors"
        return load(path) if path.exists() else None

    def save(self, stage: str, value: Any, notes: dict[str, Any] | None = None) -> None:
        """Store the stage's output, with notes on how it was made."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save(value, self.directory / f"{stage}.safetensors", notes=notes)

    def notes(self, stage: str) -> dict[str, Any]:
        """The notes stored with the stage's output (empty if none, or no output)."""
        path = self.directory / f"{stage}.safetensors"
        return notes(path) if path.exists() else {}
