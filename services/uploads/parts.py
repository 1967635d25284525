"""Every uploaded part of `POST /v1/harden`, parsed and checked before a job exists (service.md, Security of uploads).

The API streams each file part to disk under its size cap and calls `check_part`, `parse_spec`,
`parse_config`, `check_model` and `check_data`; the worker later calls `load_model` and
`load_data` on the stored copies. Nothing a client sends is ever unpickled or imported: weights
are safetensors (header parsed here, values checked chunk by chunk), data are .npz arrays read as
a stream or image-folder zips decoded image by image, and a custom network (.pt2) is scanned
member by member, pickles included, without executing anything, then loaded in a child process
under limits (services.pt2check). Checks run in bounded memory whatever the file size, and every
refusal is an InputError whose one-line message says what to fix, with the HTTP status to answer:
415 for a wrong content type or file kind, 413 past a size cap, 422 for any other unusable content.
"""

import json
import math
import zipfile
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from services.datasets import conform, from_arrays, load_npz
from services.errors import InputError, TooLarge, WrongMediaType, one_line
from services.method.config import LadderConfig
from services.method.data import ImageData, require_class_counts
from services.method.models import (
    CUSTOM,
    Classifier,
    ModelSpec,
    build_classifier,
)
from services.uploads.images import decode_image, image_members, image_zip_counts
from services.uploads.npz import npz_counts
from services.uploads.pt2 import convert_pt2, load_graph, scan_pt2
from services.uploads.rules import PARTS, DataInfo, Limits, odd_character, size_text
from services.uploads.weights import check_safetensors, once_each

_PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar", ".jit")

_MIN_TRAIN_PER_CLASS = 3  # the boundary stage fits every class pair (method/data.py require_every_class)

def check_part(name: str, filename: str | None, content_type: str | None) -> None:
    """Refuse a part by its headers alone: unknown name (422), wrong media type or file kind (415)."""
    rule = PARTS.get(name)
    if rule is None:
        raise InputError(f"unknown part {name!r}; send model, model_spec and train_data, optionally test_data, validation_data and config")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media not in rule.content_types:
        raise WrongMediaType(f"{name} has content type {media}; send it as {' or '.join(sorted(rule.content_types))}")
    if filename and (odd := odd_character(filename)):
        # NUL cannot be stored by PostgreSQL; the others corrupt logs and listings (and bidi overrides hide the suffix)
        raise InputError(f"{name} file name {filename!r} holds the control or invisible character {odd}; "
                         "rename the file to printable characters")
    if not filename:
        if rule.file:
            raise WrongMediaType(f"{name} must be a file named {' or '.join(f'*{s}' for s in rule.suffixes)}")
        return
    if not filename.lower().endswith(rule.suffixes):
        hint = ""
        if name == "model" and filename.lower().endswith(_PICKLED_SUFFIXES):
            hint = " (pickled checkpoints are never loaded: save the state dict with safetensors.torch.save_file)"
        raise WrongMediaType(f"{name} file {filename!r} is not {' or '.join(rule.suffixes)}{hint}")


def parse_spec(raw: bytes) -> ModelSpec:
    """The model spec from the `model_spec` part (a UTF-8 JSON object)."""
    try:
        return ModelSpec.model_validate(_json_object(raw, "model_spec"))
    except ValidationError as e:
        raise InputError(one_line(e, "model_spec")) from e


def parse_config(raw: bytes | None) -> LadderConfig:
    """The method configuration from the `config` part (a UTF-8 JSON object); absent or empty: the defaults."""
    if raw is None or not raw.strip():
        return LadderConfig()
    try:
        return LadderConfig.model_validate(_json_object(raw, "config"))
    except ValidationError as e:
        raise InputError(one_line(e, "config")) from e


def _json_object(raw: bytes, what: str) -> dict:
    """A JSON object as strict JSON reads it: no NaN or Infinity (Python's json takes them, PostgreSQL refuses them),
    no number that overflows a double or a 64-bit integer, and no key given twice (parsers differ on which one wins)."""

    def constant(name: str) -> float:
        raise InputError(f"{what} holds {name}, which is not JSON; give a finite number (or null where allowed)")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise InputError(f"{what} holds the number {text[:40]}, beyond the range of a double; give a smaller number")
        return value

    def integer(text: str) -> int:
        value = int(text) if len(text) <= 20 else None  # int() of thousands of digits is slow, then refused anyway
        if value is None or not -(2**63) <= value < 2**63:
            raise InputError(f"{what} holds the integer {text[:40]}{'…' if len(text) > 40 else ''}, beyond 64 bits; "
                             "give a smaller number")
        return value

    unique = once_each(lambda key: f"{what} gives the key {key[:100]!r} twice; give each key once")

    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=constant, parse_float=number, parse_int=integer,
                           object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}); send JSON encoded as UTF-8") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except RecursionError as e:
        raise InputError(f"{what} is nested too deeply; send a plain JSON object") from e
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object ({{...}}), not {type(value).__name__}")
    return value


def check_model(path: Path, filename: str, spec: ModelSpec, limits: Limits) -> str:
    """Check an uploaded model against the spec without building it; returns its stored format: safetensors, or
    graph for a .pt2, which this replaces at `path` by its network converted in the sandbox."""
    fmt = _file_format("model", filename)
    if path.stat().st_size > limits.model_bytes:
        raise TooLarge(f"model is larger than {size_text(limits.model_bytes)}; upload a smaller model")
    if fmt == "pt2" and spec.architecture != CUSTOM:
        raise InputError(f"model: a .pt2 archive carries its own network, so the spec's architecture must be {CUSTOM!r}; "
                         f"or upload {spec.architecture} weights as .safetensors")
    if fmt == "safetensors" and spec.architecture == CUSTOM:
        raise InputError(f"model: architecture {CUSTOM!r} needs the network itself, as a .pt2 archive written by "
                         "torch.export.save; .safetensors weights need a zoo architecture in the spec")
    if spec.num_classes > limits.num_classes:
        raise TooLarge(f"model_spec: num_classes {spec.num_classes:,} is beyond the limit of {limits.num_classes:,} "
                         "(an operator can raise LADDER_MAX_NUM_CLASSES)")
    if fmt == "safetensors":
        check_safetensors(path, spec, limits)
        return fmt
    scan_pt2(path, limits)
    convert_pt2(path, spec, limits, "check")  # the stored model is the converted network (format graph)
    return "graph"


def check_data(path: Path, filename: str, spec: ModelSpec, limits: Limits, what: str) -> DataInfo:
    """Check uploaded images and labels against the spec, streaming them; `what` is the part's name."""
    fmt = _file_format(what, filename)
    if path.stat().st_size > limits.data_bytes:
        raise TooLarge(f"{what} is larger than {size_text(limits.data_bytes)}; upload less data")
    counts = npz_counts(path, spec, limits, what) if fmt == "npz" else image_zip_counts(path, spec, limits, what)
    if what == "train_data":
        require_class_counts(counts, _MIN_TRAIN_PER_CLASS, what)
    elif what == "validation_data":  # the budget is judged on every class
        require_class_counts(counts, 1, what)
    return DataInfo(fmt, int(counts.sum()), counts.tolist())


def check_splits(counts: list[int], config: LadderConfig, has_test: bool, has_validation: bool) -> None:
    """Refuse a job whose splits the method could not carve from train_data (stratified, round(count · fraction) per
    class, the test hold-out first): an empty test hold-out, a validation split short of a class, fewer than 3
    training samples of a class left; and validation data sent with the selection off."""
    if has_validation and config.select.max_clean_drop is None:
        raise InputError("validation_data is used only by checkpoint selection; set select.max_clean_drop in the "
                         "config, or leave validation_data out")
    if not has_test:
        held = [round(c * config.test_fraction) for c in counts]
        if sum(held) == 0:
            raise InputError(f"a {config.test_fraction:.0%} hold-out of train_data is empty; send test_data or raise "
                             "config test_fraction")
        counts = [n - h for n, h in zip(counts, held, strict=True)]
        _require_left(counts, f"the {config.test_fraction:.0%} test hold-out", "send more per class, or send test_data")
    if config.select.max_clean_drop is not None and not has_validation:
        fraction = config.select.validation_fraction
        held = [round(c * fraction) for c in counts]
        if 0 in held:
            raise InputError(f"the {fraction:.0%} validation split of train_data (select.validation_fraction) holds "
                             f"no sample of class {held.index(0)}; send validation_data or more training data, or "
                             "set select.max_clean_drop null to turn checkpoint selection off")
        _require_left([n - h for n, h in zip(counts, held, strict=True)], f"the {fraction:.0%} validation split",
                      "send validation_data or more training data, or set select.max_clean_drop null")


def _require_left(counts: list[int], what: str, fix: str) -> None:
    short = [c for c, n in enumerate(counts) if n < _MIN_TRAIN_PER_CLASS]
    if short:
        raise InputError(f"class {short[0]} keeps {counts[short[0]]} training samples after {what}; the method needs "
                         f"{_MIN_TRAIN_PER_CLASS} of every class: {fix}")


def load_model(path: Path, fmt: str, spec: ModelSpec, limits: Limits | None = None) -> Classifier:
    """The classifier of a stored, checked model, in eval mode (worker side). `limits`: what a .pt2 stored before
    uploads were converted at submission is checked against again (needed for that format only)."""
    if fmt == "safetensors":
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"model is not a readable safetensors file ({e}); save it with safetensors.torch.save_file") from e
        return build_classifier(spec, weights)
    if fmt == "pt2":
        if limits is None:
            raise ValueError("a stored .pt2 model is checked again before it is loaded: pass the limits")
        scan_pt2(path, limits)
        convert_pt2(path, spec, limits, "convert")
    return load_graph(path, spec)


def load_data(path: Path, fmt: str, spec: ModelSpec, what: str) -> ImageData:
    """The images (N×C×H×W float in [0,1]) and labels of stored, checked data, laid out for the spec (worker side)."""
    if fmt == "npz":
        return conform(load_npz(path, what), spec.input_shape, spec.num_classes, what)
    c, h, w = spec.input_shape
    with zipfile.ZipFile(path) as zf:
        members = image_members(zf, spec, what)
        x = np.empty((len(members), c, h, w), np.uint8)
        for i, (info, _) in enumerate(members):
            x[i] = decode_image(zf.read(info), info.filename, spec, what).transpose(2, 0, 1)
    return conform(from_arrays(x, np.array([k for _, k in members]), what), spec.input_shape, spec.num_classes, what)


def _file_format(name: str, filename: str) -> str:
    check_part(name, filename, None)
    return Path(filename).suffix.lower().removeprefix(".")
