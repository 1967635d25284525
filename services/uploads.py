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

import ast
import io
import json
import math
import os
import pickletools
import re
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from services import pt2check
from services.datasets import (
    ImageData,
    channels_last,
    check_arrays,
    check_labels,
    check_pixel_values,
    conform,
    from_arrays,
    load_npz,
    require_class_counts,
)
from services.errors import InputError, one_line
from services.method.config import LadderConfig
from services.method.models import (
    CUSTOM,
    Classifier,
    ModelSpec,
    build_classifier,
    build_net,
    check_outputs,
    check_weight_layout,
)
from services.settings import Settings, get_settings

MiB = 1 << 20
_CHUNK = 8 * MiB  # bytes read at a time from a member or a file
_MIN_TRAIN_PER_CLASS = 3  # the boundary stage fits every class pair (datasets.require_every_class)
_MAX_DIRECTORY = 64 * MiB  # a zip's central directory, which zipfile reads whole
_RATIO_FLOOR = MiB  # members smaller than this inflate to nothing worth refusing, whatever their ratio
_MAX_SAFETENSORS_HEADER = 8 * MiB  # a zoo network's header is well under 1 MiB
_MAX_IMAGE_FILE = 16 * MiB  # one image of at most 1024×1024 pixels (ModelSpec's cap)
_MAX_PT2_JSON = 16 * MiB  # the exported graph and its payload configs
_MAX_PICKLE = 16 * MiB  # the pickled example inputs of a .pt2

Image.MAX_IMAGE_PIXELS = 4096 * 4096  # PIL refuses larger declared sizes before decoding anything
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # no other PIL plugin ever parses a client's bytes
_IGNORED = ("Thumbs.db", "desktop.ini")  # with __MACOSX/ and dotfiles: what archivers add unasked


@dataclass(frozen=True)
class Limits:
    """The caps every upload is checked against (bytes unless named otherwise)."""

    model_bytes: int
    data_bytes: int
    json_bytes: int
    unzipped_bytes: int
    zip_ratio: int
    zip_members: int
    pt2_timeout_s: int
    pt2_memory_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> "Limits":
        """The limits configured in the service's settings."""
        return cls(
            model_bytes=s.max_model_bytes, data_bytes=s.max_data_bytes, json_bytes=s.max_json_bytes,
            unzipped_bytes=s.max_unzipped_bytes, zip_ratio=s.max_zip_ratio, zip_members=s.max_zip_members,
            pt2_timeout_s=s.pt2_load_timeout_s, pt2_memory_bytes=s.pt2_load_memory_bytes,
        )


@dataclass(frozen=True)
class PartRule:
    """What one multipart part may be: required or not, its size cap (a Limits field), media types, file names."""

    required: bool
    cap: str
    content_types: frozenset[str]
    suffixes: tuple[str, ...]
    file: bool  # True: must come as a file named with one of `suffixes`; False: a JSON field, file name optional


@dataclass(frozen=True)
class DataInfo:
    """What check_data found: the format (npz or zip), the number of images and the images per class."""

    format: str
    n: int
    class_counts: list[int]


_JSON_TYPES = frozenset({"application/json", "text/plain", "application/octet-stream"})
_ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/octet-stream"})
PARTS: dict[str, PartRule] = {
    "model": PartRule(True, "model_bytes", frozenset({"application/octet-stream"}), (".safetensors", ".pt2"), True),
    "model_spec": PartRule(True, "json_bytes", _JSON_TYPES, (".json",), False),
    "train_data": PartRule(True, "data_bytes", _ZIP_TYPES, (".npz", ".zip"), True),
    "test_data": PartRule(False, "data_bytes", _ZIP_TYPES, (".npz", ".zip"), True),
    "config": PartRule(False, "json_bytes", _JSON_TYPES, (".json",), False),
}
_PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar", ".jit")


def check_part(name: str, filename: str | None, content_type: str | None) -> None:
    """Refuse a part by its headers alone: unknown name (422), wrong media type or file kind (415)."""
    rule = PARTS.get(name)
    if rule is None:
        raise InputError(f"unknown part {name!r}; send model, model_spec and train_data, optionally test_data and config")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media not in rule.content_types:
        raise InputError(f"{name} has content type {media}; send it as {' or '.join(sorted(rule.content_types))}", 415)
    if not filename:
        if rule.file:
            raise InputError(f"{name} must be a file named {' or '.join(f'*{s}' for s in rule.suffixes)}", 415)
        return
    if not filename.lower().endswith(rule.suffixes):
        hint = ""
        if name == "model" and filename.lower().endswith(_PICKLED_SUFFIXES):
            hint = " (pickled checkpoints are never loaded: save the state dict with safetensors.torch.save_file)"
        raise InputError(f"{name} file {filename!r} is not {' or '.join(rule.suffixes)}{hint}", 415)


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
    try:
        value = json.loads(raw.decode("utf-8-sig"))
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
    """Check an uploaded model against the spec without building it; returns its format, safetensors or pt2."""
    fmt = _file_format("model", filename)
    if path.stat().st_size > limits.model_bytes:
        raise InputError(f"model is larger than {_size(limits.model_bytes)}; upload a smaller model", 413)
    if fmt == "pt2" and spec.architecture != CUSTOM:
        raise InputError(f"model: a .pt2 archive carries its own network, so the spec's architecture must be {CUSTOM!r}; "
                         f"or upload {spec.architecture} weights as .safetensors")
    if fmt == "safetensors" and spec.architecture == CUSTOM:
        raise InputError(f"model: architecture {CUSTOM!r} needs the network itself, as a .pt2 archive written by "
                         "torch.export.save; .safetensors weights need a zoo architecture in the spec")
    if fmt == "safetensors":
        _check_safetensors(path, spec)
    else:
        _scan_pt2(path, limits)
        _trial_load(path, spec, limits)
    return fmt


def check_data(path: Path, filename: str, spec: ModelSpec, limits: Limits, what: str) -> DataInfo:
    """Check uploaded images and labels against the spec, streaming them; `what` is train_data or test_data."""
    fmt = _file_format(what, filename)
    if path.stat().st_size > limits.data_bytes:
        raise InputError(f"{what} is larger than {_size(limits.data_bytes)}; upload less data", 413)
    counts = _npz_counts(path, spec, limits, what) if fmt == "npz" else _image_zip_counts(path, spec, limits, what)
    if what == "train_data":
        require_class_counts(counts, _MIN_TRAIN_PER_CLASS, what)
    return DataInfo(fmt, int(counts.sum()), counts.tolist())


def load_model(path: Path, fmt: str, spec: ModelSpec) -> Classifier:
    """The classifier of a stored, checked model, in eval mode (worker side)."""
    if fmt == "safetensors":
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"model is not a readable safetensors file ({e}); save it with safetensors.torch.save_file") from e
        return build_classifier(spec, weights)
    _scan_pt2(path, Limits.from_settings(get_settings()))
    return pt2check.load_exported(path, spec)


def load_data(path: Path, fmt: str, spec: ModelSpec, what: str) -> ImageData:
    """The images (N×C×H×W float in [0,1]) and labels of stored, checked data, laid out for the spec (worker side)."""
    if fmt == "npz":
        return conform(load_npz(path, what), spec.input_shape, spec.num_classes, what)
    c, h, w = spec.input_shape
    with zipfile.ZipFile(path) as zf:
        members = _image_members(zf, spec, what)
        x = np.empty((len(members), c, h, w), np.uint8)
        for i, (info, _) in enumerate(members):
            x[i] = np.asarray(_decode(zf.read(info), info.filename, spec, what)).reshape(h, w, c).transpose(2, 0, 1)
    return conform(from_arrays(x, np.array([k for _, k in members]), what), spec.input_shape, spec.num_classes, what)


def _file_format(name: str, filename: str) -> str:
    check_part(name, filename, None)
    return Path(filename).suffix.lower().removeprefix(".")


def _size(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


# ---- zip archives: .npz, image folders and .pt2 are all zips, and all pass the same gate


class _Budget:
    """The bytes actually inflated from one upload; declared sizes can lie, so reading stops at the cap."""

    def __init__(self, what: str, limits: Limits):
        self.what, self.cap, self.spent = what, limits.unzipped_bytes, 0

    def spend(self, n: int) -> None:
        """Count `n` more inflated bytes, refusing the upload past the cap."""
        self.spent += n
        if self.spent > self.cap:
            raise _inflates_beyond(self.what, self.cap)


def _inflates_beyond(what: str, cap: int) -> InputError:
    return InputError(f"{what} decompresses to more than {_size(cap)}; upload less data or split it into several jobs", 413)


class _Member:
    """A zip member open for reading, each byte read counted against the upload's budget."""

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget):
        self._f, self._budget = zf.open(info), budget

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for -1)."""
        if n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        data = self._f.read(n)
        self._budget.spend(len(data))
        return data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget, cap: int, what: str) -> bytes:
    if info.file_size > cap:
        raise InputError(f"{what}: member {info.filename!r} is larger than {_size(cap)}", 413)
    with _Member(zf, info, budget) as m:
        return m.read()


@contextmanager
def _zip(source: Path | IO[bytes], what: str, limits: Limits, not_zip: str) -> Iterator[zipfile.ZipFile]:
    """A zip archive whose directory passed the gate: member count and kinds, paths, declared sizes and ratios."""
    with ExitStack() as stack:
        f = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
        # the end record is read before zipfile parses the central directory, which it holds whole in memory
        end = zipfile._EndRecData(f)
        if end is None:
            raise InputError(f"{what} {not_zip}")
        if end[zipfile._ECD_ENTRIES_TOTAL] > limits.zip_members:
            raise InputError(f"{what} holds {end[zipfile._ECD_ENTRIES_TOTAL]} files; the limit is {limits.zip_members}", 413)
        if end[zipfile._ECD_SIZE] > _MAX_DIRECTORY:
            raise InputError(f"{what}: the zip directory is larger than {_size(_MAX_DIRECTORY)}; use fewer or shorter names", 413)
        try:
            zf = stack.enter_context(zipfile.ZipFile(f))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e
        if zf.start_dir != end[zipfile._ECD_OFFSET]:
            # bytes before the archive shift every offset: zipfile allows for them, torch's reader may not
            raise InputError(f"{what} has data before its zip archive (self-extracting or concatenated); create it again")
        _check_members(zf.infolist(), what, limits)
        try:
            yield zf
        except (zipfile.BadZipFile, EOFError, OSError) as e:  # a CRC or inflate error while reading a member
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e


def _check_members(infos: list[zipfile.ZipInfo], what: str, limits: Limits) -> None:
    if len(infos) > limits.zip_members:
        raise InputError(f"{what} holds {len(infos)} files; the limit is {limits.zip_members}", 413)
    seen, total = set(), 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise InputError(f"{what}: member {name!r} appears twice; create the archive again")
        seen.add(name)
        if name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
            raise InputError(f"{what}: member {name!r} has an unsafe path (absolute, drive letter, backslash or '..'); "
                             "zip the folder again from inside it")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"{what}: member {name!r} is a symbolic link; zip the files themselves")
        if info.flag_bits & 0x1:
            raise InputError(f"{what}: member {name!r} is encrypted; upload an archive without a password")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(f"{what}: member {name!r} uses compression method {info.compress_type}; "
                             "use deflate (the default of zip and np.savez_compressed) or none")
        total += info.file_size
        if total > limits.unzipped_bytes:
            raise _inflates_beyond(what, limits.unzipped_bytes)
        if info.file_size > _RATIO_FLOOR and info.file_size > limits.zip_ratio * info.compress_size:
            raise InputError(f"{what}: member {name!r} decompresses {info.file_size / max(info.compress_size, 1):.0f}× "
                             f"(to {_size(info.file_size)}), beyond the compression ratio limit of {limits.zip_ratio}×", 413)


# ---- .npz: x and y read as streams of .npy data, never whole


def _npz_counts(path: Path, spec: ModelSpec, limits: Limits, what: str) -> torch.Tensor:
    """Images per class of a checked .npz (pixels and labels streamed in chunks)."""
    with _zip(path, what, limits, "is not a readable .npz file (no zip archive); save it with np.savez") as zf:
        budget = _Budget(what, limits)
        names = set(zf.namelist())
        # the member np.load will read: a bare name wins over name.npy (numpy.lib.npyio.NpzFile)
        member = {k: k if k in names else f"{k}.npy" for k in ("x", "y")}
        missing = sorted(k for k, m in member.items() if m not in names)
        if missing:
            raise InputError(f"{what} lacks array(s) {', '.join(missing)}; save it with np.savez(path, x=images, y=labels)")
        with _Member(zf, zf.getinfo(member["x"]), budget) as xf, _Member(zf, zf.getinfo(member["y"]), budget) as yf:
            x_shape, x_dtype = _npy_header(xf, what, "x")
            y_shape, y_dtype = _npy_header(yf, what, "y")
            shape = check_arrays(x_shape, x_dtype, y_shape, y_dtype, what)
            channels_last(shape[1:], spec.input_shape, what)
            _check_npy_pixels(xf, x_dtype, math.prod(shape), what)
            return _npy_label_counts(yf, y_dtype, shape[0], spec.num_classes, what)


def _check_npy_pixels(f: _Member, dtype: np.dtype, count: int, what: str) -> None:
    lo, hi = math.inf, -math.inf
    for a in _npy_chunks(f, dtype, count, what, "x"):
        if dtype != np.uint8:  # uint8 needs no value check, but is read whole: complete and CRC-checked
            a_lo, a_hi = float(a.min()), float(a.max())
            if not (math.isfinite(a_lo) and math.isfinite(a_hi)):
                check_pixel_values(a_lo, a_hi, what)  # refuses NaN/Inf at once
            lo, hi = min(lo, a_lo), max(hi, a_hi)
    if dtype != np.uint8:
        check_pixel_values(lo, hi, what)


def _npy_label_counts(f: _Member, dtype: np.dtype, count: int, num_classes: int, what: str) -> torch.Tensor:
    lo, hi, counts = math.inf, -math.inf, np.zeros(num_classes, np.int64)
    for a in _npy_chunks(f, dtype, count, what, "y"):
        lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
        counts += np.bincount(a[(a >= 0) & (a < num_classes)].astype(np.int64), minlength=num_classes)
    counts = torch.from_numpy(counts)
    check_labels(int(lo), int(hi), counts, num_classes, what)
    return counts


def _npy_header(f: _Member, what: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    except ValueError as e:
        raise InputError(f"{what}: {name} is not a plain .npy array ({e}); save it with np.savez") from e
    if dtype.hasobject:
        raise InputError(f"{what} holds pickled objects or unreadable arrays; save plain numeric arrays")
    return shape, dtype  # Fortran order only permutes values; every check here is order-free


def _npy_chunks(f: _Member, dtype: np.dtype, count: int, what: str, name: str) -> Iterator[np.ndarray]:
    per = max(1, _CHUNK // dtype.itemsize)
    while count:
        k = min(per, count)
        raw = f.read(k * dtype.itemsize)
        if len(raw) < k * dtype.itemsize:
            raise InputError(f"{what}: {name} is truncated (its header promises more data than it holds); save it again")
        count -= k
        yield np.frombuffer(raw, dtype)


# ---- image-folder zips: one folder per class, decoded one image at a time


def _image_zip_counts(path: Path, spec: ModelSpec, limits: Limits, what: str) -> torch.Tensor:
    """Images per class of a checked image-folder zip (each image decoded, none kept)."""
    counts = torch.zeros(spec.num_classes, dtype=torch.int64)
    with _zip(path, what, limits, "is not a readable zip archive; zip one folder of images per class") as zf:
        budget = _Budget(what, limits)
        for info, k in _image_members(zf, spec, what):
            _decode(_read_member(zf, info, budget, _MAX_IMAGE_FILE, what), info.filename, spec, what)
            counts[k] += 1
    return counts


def _image_members(zf: zipfile.ZipFile, spec: ModelSpec, what: str) -> list[tuple[zipfile.ZipInfo, int]]:
    """Every image of the archive with its class index (sorted folder names, as torchvision's ImageFolder)."""
    if spec.input_shape[0] not in (1, 3):
        raise InputError(f"{what}: an image-folder zip gives grayscale (C = 1) or RGB (C = 3) images, but input_shape "
                         f"has C = {spec.input_shape[0]}; upload .npz instead")
    files = []
    for info in zf.infolist():
        parts = info.filename.split("/")
        if info.is_dir() or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) or parts[-1] in _IGNORED:
            continue
        if not parts[-1].lower().endswith(_IMAGE_SUFFIXES):
            raise InputError(f"{what}: {info.filename!r} is not an image ({', '.join(s[1:] for s in _IMAGE_SUFFIXES)}); "
                             "keep only one folder of images per class")
        files.append((parts, info))
    if not files:
        raise InputError(f"{what} is empty; zip one folder of images per class")
    if len({p[0] for p, _ in files}) == 1 and all(len(p) > 2 for p, _ in files):
        files = [(p[1:], info) for p, info in files]  # one common root folder around the class folders
    for parts, info in files:
        if len(parts) < 2:
            raise InputError(f"{what}: {info.filename!r} is not inside a class folder; zip one folder of images per class")
    classes = sorted({p[0] for p, _ in files})
    if len(classes) != spec.num_classes:
        shown = ", ".join(classes[:5]) + (", …" if len(classes) > 5 else "")
        raise InputError(f"{what} has {len(classes)} class folders ({shown}) but the spec has {spec.num_classes} classes; "
                         "give one folder per class")
    index = {c: k for k, c in enumerate(classes)}
    return [(info, index[p[0]]) for p, info in sorted(files, key=lambda f: f[1].filename)]


def _decode(data: bytes, name: str, spec: ModelSpec, what: str) -> Image.Image:
    """One image, checked to have the spec's size before its pixels are decoded, as L (C = 1) or RGB (C = 3)."""
    c, h, w = spec.input_shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
            if img.size == (w, h):
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what}: image {name!r} declares more than {Image.MAX_IMAGE_PIXELS} pixels", 413) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL's ways of meeting a broken file
        raise InputError(f"{what}: {name!r} is not a readable image ({e}); save it again as PNG or JPEG") from e
    if img.size != (w, h):
        raise InputError(f"{what}: image {name!r} is {img.width}×{img.height} pixels but the model takes {w}×{h} "
                         f"(input_shape [{c}, {h}, {w}]); resize the images")
    return img.convert("L" if c == 1 else "RGB")


# ---- safetensors: header parsed here, shapes checked on the meta device, values checked chunk by chunk

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# the exponent bits of each accepted float format: all set means Inf or NaN
_NONFINITE = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def _check_safetensors(path: Path, spec: ModelSpec) -> None:
    header, data_start = _safetensors_header(path)
    model = _without_weights(spec)
    given = {k: (tuple(v["shape"]), _SAFETENSORS_DTYPES[v["dtype"]]) for k, v in header.items()}
    check_weight_layout(model.net.state_dict(), given)
    check_outputs(model.eval(), spec)
    with path.open("rb") as f:
        for key, entry in header.items():
            if entry["dtype"] not in _NONFINITE:
                continue
            bits, mask = _NONFINITE[entry["dtype"]]
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            step = _CHUNK - _CHUNK % np.dtype(bits).itemsize
            for at in range(begin, end, step):
                a = np.frombuffer(f.read(min(step, end - at)), bits)
                if ((a & mask) == mask).any():
                    raise InputError(f"weight {key} contains NaN or Inf values; upload finite weights")


def _without_weights(spec: ModelSpec) -> Classifier:
    """The spec's classifier on the meta device: shapes and dtypes, no memory for the weights."""
    try:
        with torch.device("meta"):
            return Classifier(build_net(spec), spec.mean, spec.std)
    except InputError:  # a builder that computes with tensor values (regnet) cannot run on meta tensors
        return Classifier(build_net(spec), spec.mean, spec.std)


def _safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensors' entries (name → dtype, shape, data_offsets) and where the data start, all checked."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise InputError("model is truncated or not a safetensors file (its first 8 bytes do not give a header "
                             "length that fits the file); save it with safetensors.torch.save_file")
        if n > _MAX_SAFETENSORS_HEADER:
            raise InputError(f"model: the safetensors header is {_size(n)}, beyond the limit of "
                             f"{_size(_MAX_SAFETENSORS_HEADER)}", 413)
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"model: the safetensors header is not valid JSON ({e}); "
                         "save it with safetensors.torch.save_file") from e
    if not isinstance(header, dict):
        raise InputError("model: the safetensors header is not a JSON object; save it with safetensors.torch.save_file")
    header.pop("__metadata__", None)
    spans = []
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"])):
            raise InputError(f"model: the safetensors entry of {key!r} is malformed; save it with safetensors.torch.save_file")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise InputError(f"weight {key} has the unknown safetensors dtype {entry['dtype']!r}; save it as float32")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * dtype.itemsize or begin < 0:
            raise InputError(f"model: the data offsets of {key!r} do not match its shape and dtype; the file is corrupt")
        spans.append((begin, end, key))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise InputError(f"model: the tensors' data overlap or leave gaps (at {key!r}); the file is corrupt")
        at = end
    if at != size - 8 - n:
        how = "is truncated" if at > size - 8 - n else "has bytes after the last tensor"
        raise InputError(f"model {how}: its header describes {at} bytes of data, the file holds {size - 8 - n}; "
                         "upload the complete file written by safetensors.torch.save_file")
    return header, 8 + n


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # a name given twice would be read one way here and maybe another way by the safetensors library
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise InputError(f"model: the safetensors header names {key!r} twice; save it with safetensors.torch.save_file")
        seen.add(key)
    return dict(pairs)


# ---- .pt2 (torch.export): every member accounted for, pickles and graph scanned, nothing executed

_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".cubin", ".fatbin", ".ptx", ".pyd", ".o", ".a")
_PT2_PLAIN = re.compile(  # members torch.export.load reads as raw tensor bytes or short text
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|data/weights/weight_\d+|data/constants/tensor_\d+")
_PT2_PROGRAM = "models/model.json"
_PT2_PAYLOADS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
_PT2_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_TORCH_SAVE_PLAIN = re.compile(r"data/\d+|byteorder|version|\.format_version|\.storage_alignment|\.data/version"
                               r"|\.data/serialization_id")
_OP_TARGET = re.compile(
    rf"torch\.ops\.({'|'.join(pt2check.OPERATOR_NAMESPACES)})\.(?!__)\w+\.(?!__)\w+"
    rf"|torch\.ops\.higher_order\.({'|'.join(pt2check.HIGHER_ORDER_OPS)})"
    rf"|{'|'.join(re.escape(f'{op.__module__}.{op.__name__}') for op in pt2check.SYMBOLIC_OPS)}")
# the names a pickle of tensors needs (all of them also allowed by torch.load(weights_only=True))
_PICKLE_GLOBALS = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch.Size", "torch.device",
    "torch.storage.UntypedStorage", "torch.serialization._get_layout",
    *(f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")),
    *(f"torch.{t}" for t in ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")),
})
_SIZE_CALLS = frozenset({  # sympy's names in the size expressions torch.export writes (parsed by sympify: eval)
    "Symbol", "Integer", "Rational", "Add", "Mul", "Mod", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "And", "Or", "Not", "FloorDiv", "CeilToInt", "FloorToInt", "TruncToInt", "PythonMod", "CleanDiv",
    "IntTrueDiv", "FloatTrueDiv", "ToFloat",
})


def _scan_pt2(path: Path, limits: Limits) -> None:
    """Refuse a .pt2 archive holding anything torch.export.load could run: native code, non-tensor pickles, Python."""
    with _zip(path, "model", limits, "is not a .pt2 archive (no zip); save the exported program with torch.export.save") as zf:
        budget = _Budget("model", limits)
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len({i.filename.partition("/")[0] for i in infos}) != 1 or any("/" not in i.filename for i in infos):
            raise InputError("model is not laid out as torch.export.save writes a .pt2 archive (one top folder); "
                             "save the exported program with torch.export.save")
        for info in infos:
            name, rel = info.filename, info.filename.partition("/")[2]
            _refuse_code(name, rel)
            if rel == _PT2_PROGRAM:
                _scan_program(_read_json(zf, info, budget), name)
            elif rel in _PT2_PAYLOADS:
                _scan_payloads(_read_json(zf, info, budget), name)
            elif rel == _PT2_SAMPLE_INPUTS:
                _scan_torch_save(zf, info, limits, budget)
            elif not _PT2_PLAIN.fullmatch(rel):
                raise InputError(f"model: unexpected member {name!r} in the .pt2 archive; save the exported program "
                                 f"with torch.export.save (torch {torch.__version__.split('+')[0]}) and nothing else")
        if not any(i.filename.partition("/")[2] == _PT2_PROGRAM for i in infos):
            raise InputError(f"model: the .pt2 archive holds no exported program ({_PT2_PROGRAM}); "
                             "save it with torch.export.save")


def _refuse_code(name: str, rel: str) -> None:
    low = rel.lower()
    if "aotinductor" in low:
        raise InputError(f"model: {name!r} is AOTInductor-compiled code, which would run natively; upload the exported "
                         "program saved with torch.export.save, not an AOTInductor package")
    if low.endswith(_NATIVE_SUFFIXES):
        raise InputError(f"model: {name!r} is a native library, and native code is never loaded; upload the exported "
                         "program saved with torch.export.save")
    if rel.startswith("data/constants/") and rel.rpartition("/")[2].startswith(("custom_obj_", "opaque_obj_")):
        raise InputError(f"model: {name!r} is a custom or opaque object (a TorchScript class or pickled Python), which "
                         "would run code when loaded; export a network whose constants are tensors")


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> object:
    try:
        return json.loads(_read_member(zf, info, budget, _MAX_PT2_JSON, "model"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"model: {info.filename!r} is not valid JSON ({e}); save the program with torch.export.save") from e


def _scan_program(program: object, name: str) -> None:
    """Refuse an exported graph that names anything but operators, or size expressions that are not plain sympy."""
    if not isinstance(program, dict):
        raise InputError(f"model: {name!r} is not an exported program; save it with torch.export.save")
    if program.get("guards_code"):
        raise InputError(f"model: {name!r} carries guard code, which torch would run as Python; export it again with "
                         "torch.export.export (its programs carry none)")
    stack: list[object] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in ("target", "as_operator"):
                target = item.get(key)
                if isinstance(target, str) and (key == "as_operator" or "inputs" in item) and not _OP_TARGET.fullmatch(target):
                    raise InputError(f"model: the exported graph calls {target[:100]!r}, which is not a PyTorch operator; "
                                     "export a network built from torch operations only")
            expr = item.get("expr_str")
            if isinstance(expr, str) and not _plain_size_expression(expr):
                raise InputError(f"model: the exported graph holds the size expression {expr[:100]!r}, which is not plain "
                                 "symbolic arithmetic; export it again with torch.export.export")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _plain_size_expression(expr: str) -> bool:
    """Whether sympify(expr) can only build a sympy expression: names, numbers, arithmetic and known sympy calls."""
    if len(expr) > 4096:
        return False
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SIZE_CALLS):
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif isinstance(node, ast.Constant):
            if not (isinstance(node.value, (bool, str)) or (isinstance(node.value, (int, float)) and abs(node.value) < 2**63)):
                return False
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):  # 10**10**10 would take forever
                return False
        elif not isinstance(node, (ast.Expression, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.keyword, ast.expr_context,
                                   ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
            return False
    return True


def _scan_payloads(config: object, name: str) -> None:
    """Refuse weights or constants stored pickled (torch.export.load reads them with weights_only=False)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"model: {name!r} is not a torch.export payload config; save the program with torch.export.save")
    for key, meta in entries.items():
        plain = isinstance(meta, dict) and meta.get("use_pickle") is False and isinstance(meta.get("path_name"), str)
        if not (plain and re.fullmatch(r"(weight|tensor)_\d+", meta["path_name"])):
            raise InputError(f"model: tensor {key!r} is stored pickled or as an object, which would run code when loaded; "
                             "export a network whose weights and constants are plain tensors")


def _scan_torch_save(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, budget: _Budget) -> None:
    """Refuse example inputs (a torch.save archive) whose pickle names anything but tensors and containers."""
    with zf.open(info) as f, _zip(f, "model", limits, f"member {info.filename!r} is not a torch.save archive") as inner:
        for member in inner.infolist():
            rel = member.filename.partition("/")[2]
            where = f"{info.filename}:{member.filename}"
            if rel == "data.pkl":
                _scan_pickle(_read_member(inner, member, budget, _MAX_PICKLE, "model"), where)
            elif not _TORCH_SAVE_PLAIN.fullmatch(rel):
                raise InputError(f"model: unexpected member {where!r} (TorchScript or another pickle?); "
                                 "save the exported program with torch.export.save")


# the opcodes torch.load(weights_only=True) reads: given any other, torch.export.load retries with weights_only=False
_PICKLE_OPCODES = frozenset({
    "PROTO", "STOP", "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
    "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "LONG1", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID",
    "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})


def _scan_pickle(data: bytes, where: str) -> None:
    """Refuse a pickle that imports anything beyond tensors and containers, or that torch would unpickle in full."""
    imports, opcodes = set(), set()
    try:
        for op, arg, _ in pickletools.genops(data):  # parsed, never executed
            opcodes.add(op.name)
            if op.name == "GLOBAL":
                imports.add(arg.replace(" ", "."))
    except ValueError as e:
        raise InputError(f"model: {where!r} is not a valid pickle ({e}); save the exported program with torch.export.save") from e
    if refused := sorted(imports - _PICKLE_GLOBALS):
        raise InputError(f"model: {where!r} is a pickle that calls {', '.join(refused[:3])}, which a pickle of tensors "
                         "never needs; it was not loaded — save the exported program with torch.export.save")
    if odd := sorted(opcodes - _PICKLE_OPCODES):
        raise InputError(f"model: {where!r} is a pickle with opcode(s) {', '.join(odd[:3])}, which torch's weights-only "
                         "loader refuses (torch would then unpickle it in full); save it with torch.export.save's defaults")


def _trial_load(path: Path, spec: ModelSpec, limits: Limits) -> None:
    """Load and try a scanned .pt2 in a child process with CUDA hidden, a memory cap and a timeout."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "HOME")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no secrets, no GPU
    try:
        done = subprocess.run(
            [sys.executable, "-m", "services.pt2check", str(path), spec.model_dump_json(), str(limits.pt2_memory_bytes)],
            check=False, capture_output=True, text=True, timeout=limits.pt2_timeout_s, env=env, cwd=Path(__file__).parents[1],
        )
    except subprocess.TimeoutExpired as e:
        raise InputError(f"model: loading and trying the .pt2 network took longer than {limits.pt2_timeout_s} s; "
                         "upload a smaller network") from e
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise InputError(f"model: the .pt2 network could not be loaded within {_size(limits.pt2_memory_bytes)} of memory "
                         f"(the loader exited with status {done.returncode}); upload a smaller network")
    if "error" in result:
        raise InputError(str(result["error"]))

