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
import pickletools
import re
import stat
import struct
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import numpy as np
import torch
import torchvision
from PIL import Image
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from services import sandbox
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
from services.method import graphnet
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
    pt2_concurrent: int = 2  # sandboxed .pt2 loads at once in this process
    num_classes: int = 100_000  # a spec's num_classes
    model_parameters: int = 500_000_000  # a zoo network's parameters, counted on the meta device

    @classmethod
    def from_settings(cls, s: Settings) -> "Limits":
        """The limits configured in the service's settings."""
        return cls(
            model_bytes=s.max_model_bytes, data_bytes=s.max_data_bytes, json_bytes=s.max_json_bytes,
            unzipped_bytes=s.max_unzipped_bytes, zip_ratio=s.max_zip_ratio, zip_members=s.max_zip_members,
            pt2_timeout_s=s.pt2_load_timeout_s, pt2_memory_bytes=s.pt2_load_memory_bytes,
            pt2_concurrent=s.pt2_max_concurrent, num_classes=s.max_num_classes, model_parameters=s.max_model_parameters,
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
    "validation_data": PartRule(False, "data_bytes", _ZIP_TYPES, (".npz", ".zip"), True),
    "config": PartRule(False, "json_bytes", _JSON_TYPES, (".json",), False),
}
_PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar", ".jit")


def check_part(name: str, filename: str | None, content_type: str | None) -> None:
    """Refuse a part by its headers alone: unknown name (422), wrong media type or file kind (415)."""
    rule = PARTS.get(name)
    if rule is None:
        raise InputError(f"unknown part {name!r}; send model, model_spec and train_data, optionally test_data, validation_data and config")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media not in rule.content_types:
        raise InputError(f"{name} has content type {media}; send it as {' or '.join(sorted(rule.content_types))}", 415)
    if filename and (odd := _odd_character(filename)):
        # NUL cannot be stored by PostgreSQL; the others corrupt logs and listings (and bidi overrides hide the suffix)
        raise InputError(f"{name} file name {filename!r} holds the control or invisible character {odd}; "
                         "rename the file to printable characters")
    if not filename:
        if rule.file:
            raise InputError(f"{name} must be a file named {' or '.join(f'*{s}' for s in rule.suffixes)}", 415)
        return
    if not filename.lower().endswith(rule.suffixes):
        hint = ""
        if name == "model" and filename.lower().endswith(_PICKLED_SUFFIXES):
            hint = " (pickled checkpoints are never loaded: save the state dict with safetensors.torch.save_file)"
        raise InputError(f"{name} file {filename!r} is not {' or '.join(rule.suffixes)}{hint}", 415)


def _odd_character(text: str) -> str | None:
    """The first control, format (invisible), surrogate or line/paragraph-separator character of `text`, as U+XXXX."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


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

    unique = _once_each(lambda key: f"{what} gives the key {key[:100]!r} twice; give each key once")

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
        raise InputError(f"model is larger than {_size(limits.model_bytes)}; upload a smaller model", 413)
    if fmt == "pt2" and spec.architecture != CUSTOM:
        raise InputError(f"model: a .pt2 archive carries its own network, so the spec's architecture must be {CUSTOM!r}; "
                         f"or upload {spec.architecture} weights as .safetensors")
    if fmt == "safetensors" and spec.architecture == CUSTOM:
        raise InputError(f"model: architecture {CUSTOM!r} needs the network itself, as a .pt2 archive written by "
                         "torch.export.save; .safetensors weights need a zoo architecture in the spec")
    if spec.num_classes > limits.num_classes:
        raise InputError(f"model_spec: num_classes {spec.num_classes:,} is beyond the limit of {limits.num_classes:,} "
                         "(an operator can raise LADDER_MAX_NUM_CLASSES)", 413)
    if fmt == "safetensors":
        _check_safetensors(path, spec, limits)
        return fmt
    _scan_pt2(path, limits)
    _convert_pt2(path, spec, limits, "check")  # the stored model is the converted network (format graph)
    return "graph"


def check_data(path: Path, filename: str, spec: ModelSpec, limits: Limits, what: str) -> DataInfo:
    """Check uploaded images and labels against the spec, streaming them; `what` is the part's name."""
    fmt = _file_format(what, filename)
    if path.stat().st_size > limits.data_bytes:
        raise InputError(f"{what} is larger than {_size(limits.data_bytes)}; upload less data", 413)
    counts = _npz_counts(path, spec, limits, what) if fmt == "npz" else _image_zip_counts(path, spec, limits, what)
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


def load_model(path: Path, fmt: str, spec: ModelSpec) -> Classifier:
    """The classifier of a stored, checked model, in eval mode (worker side)."""
    if fmt == "safetensors":
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"model is not a readable safetensors file ({e}); save it with safetensors.torch.save_file") from e
        return build_classifier(spec, weights)
    if fmt == "pt2":  # a job stored before uploads were converted at submission
        limits = Limits.from_settings(get_settings())
        _scan_pt2(path, limits)
        _convert_pt2(path, spec, limits, "convert")
    return _load_graph(path, spec)


def load_data(path: Path, fmt: str, spec: ModelSpec, what: str) -> ImageData:
    """The images (N×C×H×W float in [0,1]) and labels of stored, checked data, laid out for the spec (worker side)."""
    if fmt == "npz":
        return conform(load_npz(path, what), spec.input_shape, spec.num_classes, what)
    c, h, w = spec.input_shape
    with zipfile.ZipFile(path) as zf:
        members = _image_members(zf, spec, what)
        x = np.empty((len(members), c, h, w), np.uint8)
        for i, (info, _) in enumerate(members):
            x[i] = _decode(zf.read(info), info.filename, spec, what).transpose(2, 0, 1)
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
        self.size, self.pos = info.file_size, 0  # its declared inflated size, and the bytes read so far

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for -1)."""
        if n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        data = self._f.read(n)
        self._budget.spend(len(data))
        self.pos += len(data)
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
    """A zip archive whose directory passed the gate: end records and member count (read here, before zipfile
    reads anything), member kinds, names, paths, declared sizes, ratios and overlaps."""
    with ExitStack() as stack:
        f = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
        # the end records and the directory's headers are read and counted here, under the caps, before zipfile
        # parses the central directory (all of it, whatever the end record's count, each member kept in memory)
        directory = _directory(f, what, limits, not_zip)
        try:
            f.seek(0)
            zf = stack.enter_context(zipfile.ZipFile(f))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e
        if zf.start_dir != directory.offset:  # zipfile found another directory than ours
            raise InputError(f"{what} is a damaged zip archive (its directory is not where its end record says); "
                             "create it again")
        _check_members(zf.infolist(), what, limits, directory.offset)
        try:
            yield zf
        except (zipfile.BadZipFile, EOFError, OSError) as e:  # a CRC or inflate error while reading a member
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disk, directory's disk, entries here, entries,
#                                    directory size, directory offset, comment length
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 record, its offset, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disk, directory's disk, entries here,
#                                        entries, directory size, directory offset
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # one central directory header (zipfile's structCentralDir)


@dataclass(frozen=True)
class _Directory:
    """Where a zip's central directory starts, its size in bytes and its number of members (counted, not declared)."""

    offset: int
    size: int
    members: int


def _directory(f: IO[bytes], what: str, limits: Limits, not_zip: str) -> _Directory:
    """Read the end record (and the zip64 one) as zipfile will, check them, then walk the directory's headers."""
    f.seek(0, 2)
    size = f.tell()
    tail_size = min(size, _EOCD.size + 0xFFFF)  # the end record and a comment of at most 64 KiB
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    # zipfile takes a record that ends the file without a comment, else the last signature in the tail
    at = tail.rfind(b"PK\x05\x06")
    if tail[-_EOCD.size:][:4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        at = len(tail) - _EOCD.size
    if at < 0 or len(tail) - at < _EOCD.size:
        raise InputError(f"{what} {not_zip}")
    _, disk, cd_disk, here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at  # where the end record starts
    if end + _EOCD.size + comment != size:
        # trailing bytes, or a comment holding another end record: readers would disagree on the archive
        raise InputError(f"{what} has bytes after its zip archive's end record (or a comment of the wrong length); "
                         "create it again")
    directory_end = end
    if end >= _EOCD64_LOCATOR.size:
        f.seek(end - _EOCD64_LOCATOR.size)
        sig, _, record_at, disks = _EOCD64_LOCATOR.unpack(f.read(_EOCD64_LOCATOR.size))
        if sig == b"PK\x06\x07":  # zip64: zipfile takes the record just before the locator
            directory_end = end - _EOCD64_LOCATOR.size - _EOCD64.size
            f.seek(max(directory_end, 0))
            record = f.read(_EOCD64.size)
            if directory_end < 0 or len(record) < _EOCD64.size or record[:4] != b"PK\x06\x06":
                raise InputError(f"{what} is a damaged zip archive (its zip64 end record is missing); create it again")
            _, _, _, _, disk64, cd_disk64, here64, entries64, cd_size64, cd_offset64 = _EOCD64.unpack(record)
            # the plain record's fields must agree with the zip64 ones, or say "see zip64" (all bits set)
            for plain, wide, full in ((here, here64, 0xFFFF), (entries, entries64, 0xFFFF),
                                      (cd_size, cd_size64, 0xFFFFFFFF), (cd_offset, cd_offset64, 0xFFFFFFFF)):
                if plain not in (wide, full):
                    raise InputError(f"{what} is a damaged zip archive (its end record and its zip64 end record "
                                     "disagree); create it again")
            disk, cd_disk = disk or disk64 or disks > 1, cd_disk or cd_disk64
            here, entries, cd_size, cd_offset = here64, entries64, cd_size64, cd_offset64
            if record_at != directory_end and cd_offset + cd_size == directory_end:
                raise InputError(f"{what} is a damaged zip archive (its zip64 locator points elsewhere); create it again")
    if disk or cd_disk or here != entries:
        raise InputError(f"{what} spans several disks (a split archive); create it as one file")
    if entries > limits.zip_members:
        raise InputError(f"{what} holds {entries} files; the limit is {limits.zip_members}", 413)
    if cd_size > _MAX_DIRECTORY:
        raise InputError(f"{what}: the zip directory is larger than {_size(_MAX_DIRECTORY)}; use fewer or shorter names", 413)
    if cd_offset + cd_size < directory_end:
        # bytes before the archive shift every offset: zipfile allows for them, torch's reader may not
        raise InputError(f"{what} has data before its zip archive (self-extracting or concatenated); create it again")
    if cd_offset + cd_size > directory_end:
        raise InputError(f"{what} is a damaged zip archive (its directory would run past its end record); create it again")
    members = _count_members(f, cd_offset, cd_size, what, limits)
    if members != entries:
        raise InputError(f"{what}: the zip's end record counts {entries} files but its directory lists {members}; "
                         "create the archive again")
    return _Directory(cd_offset, cd_size, members)


def _count_members(f: IO[bytes], offset: int, size: int, what: str, limits: Limits) -> int:
    """The headers in the `size` bytes of directory at `offset`, read a chunk at a time; stops past the member cap."""
    f.seek(offset)
    buf, at, left, count = b"", 0, size, 0

    def have(n: int) -> bool:
        nonlocal buf, at, left
        if len(buf) - at < n and left:
            chunk = f.read(min(left, max(n, MiB)))
            left -= len(chunk)
            buf, at = buf[at:] + chunk, 0
            if not chunk:
                left = 0
        return len(buf) - at >= n

    while at < len(buf) or left:
        if not have(_CENTRAL.size) or buf[at:at + 4] != b"PK\x01\x02":
            raise InputError(f"{what} is a damaged zip archive (a broken directory entry after {count} files); "
                             "create it again")
        fields = _CENTRAL.unpack_from(buf, at)
        n = _CENTRAL.size + fields[12] + fields[13] + fields[14]  # name, extra field and comment lengths
        if not have(n):
            raise InputError(f"{what} is a damaged zip archive (its directory ends inside an entry); create it again")
        at += n
        count += 1
        if count > limits.zip_members:
            raise InputError(f"{what} holds more than {limits.zip_members} files; the limit is {limits.zip_members}", 413)
    return count


def _check_members(infos: list[zipfile.ZipInfo], what: str, limits: Limits, directory: int) -> None:
    if len(infos) > limits.zip_members:
        raise InputError(f"{what} holds {len(infos)} files; the limit is {limits.zip_members}", 413)
    seen, total = set(), 0
    for info in infos:
        name = info.filename
        if odd := _odd_character(info.orig_filename):  # zipfile cuts a name at NUL; other readers do not
            raise InputError(f"{what}: member {info.orig_filename!r} has the control or invisible character {odd} in "
                             "its name; rename it and create the archive again")
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
    # each member's local header and data must end before the next member (and the directory) begins: members that
    # share bytes inflate the same data many times over (an overlapping zip bomb), or hide one member in another
    ends = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < ends:
            raise InputError(f"{what}: member {info.filename!r} overlaps the member before it (a zip bomb?); "
                             "create the archive again")
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")
        ends = info.header_offset + 30 + len(name) + info.compress_size  # 30: the local header's fixed part
    if ends > directory:
        raise InputError(f"{what}: the data of the last member runs into the zip directory; create the archive again")


# ---- .npz: x and y read as streams of .npy data, never whole


def _npz_counts(path: Path, spec: ModelSpec, limits: Limits, what: str) -> torch.Tensor:
    """Images per class of a checked .npz (pixels and labels streamed in chunks)."""
    with _zip(path, what, limits, "is not a readable .npz file (no zip archive); save it with np.savez") as zf:
        budget = _Budget(what, limits)
        names = set(zf.namelist())
        for k in ("x", "y"):
            if k in names and f"{k}.npy" in names:  # np.load reads the bare one; other readers may take either
                raise InputError(f"{what} holds both {k} and {k}.npy; keep only {k}.npy (as np.savez writes it)")
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
    if dtype.subdtype is not None:  # np.load would fail to shape it
        raise InputError(f"{what}: the .npy header of {name} gives the sub-array dtype {dtype}; save a plain numeric array")
    # numpy's parser takes any tuple of ints: a negative size would read the stream backwards, or all of it
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{what}: the .npy header of {name} gives the shape {list(shape)}; dimensions must be "
                         "non-negative integers, so save the array again with np.savez")
    promised, held = math.prod(shape) * dtype.itemsize, f.size - f.pos
    if promised > held:  # a huge declared shape over a few bytes of data: refused before any is read
        raise InputError(f"{what}: {name} is truncated (its header promises {promised:,} bytes of data, the file holds "
                         f"{held:,}); save it again")
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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNGs open as I;16 (values 0…65535)
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("1", "L", "P", "RGB", *_WITH_ALPHA, *_SIXTEEN_BIT)  # CMYK, F, YCbCr, LAB, HSV: refused


def _decode(data: bytes, name: str, spec: ModelSpec, what: str) -> np.ndarray:
    """One image as H×W×C uint8, L (C = 1) or RGB (C = 3), its size checked before its pixels are decoded.
    16-bit grey is scaled to 8 bits and an opaque alpha channel dropped; an image with more than one reading
    (animated, EXIF-rotated, transparent, CMYK or float pixels) is refused."""
    c, h, w = spec.input_shape
    orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
            animated = img.size == (w, h) and getattr(img, "is_animated", False)
            if img.size == (w, h) and not animated:
                img.load()
                orientation = img.getexif().get(0x0112, 1)  # a PNG's eXIf chunk may follow its pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what}: image {name!r} declares more than {Image.MAX_IMAGE_PIXELS} pixels", 413) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL's ways of meeting a broken file
        raise InputError(f"{what}: {name!r} is not a readable image ({e}); save it again as PNG or JPEG") from e
    if img.size != (w, h):
        raise InputError(f"{what}: image {name!r} is {img.width}×{img.height} pixels but the model takes {w}×{h} "
                         f"(input_shape [{c}, {h}, {w}]); resize the images")
    if animated:
        raise InputError(f"{what}: image {name!r} is animated ({img.n_frames} frames); save one still image per file")
    if orientation not in (0, 1):  # viewers rotate it, most training loaders do not: which one is the image?
        raise InputError(f"{what}: image {name!r} carries an EXIF orientation ({orientation}: rotated or mirrored); "
                         "save it upright without the orientation tag (e.g. PIL.ImageOps.exif_transpose)")
    return _pixels(img, "L" if c == 1 else "RGB", name, what).reshape(h, w, c)


def _pixels(img: Image.Image, target: str, name: str, what: str) -> np.ndarray:
    """A decoded image's pixels in `target` mode (L or RGB) as uint8."""
    if img.mode not in _PLAIN_MODES:
        raise InputError(f"{what}: image {name!r} is stored as {img.mode} pixels, which have no single reading as "
                         f"{target}; save it as RGB or grayscale")
    if img.mode in _SIXTEEN_BIT:  # convert("L") would clip every value above 255 to white
        a = np.asarray(img)
        if a.min() < 0 or a.max() > 65535:
            raise InputError(f"{what}: image {name!r} has pixel values outside 0…65535; save it as an 8- or 16-bit image")
        img = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))  # round(v / 257)
    elif img.mode in _WITH_ALPHA or "transparency" in img.info:
        img = img.convert("RGBA")  # palette and colour-key transparency become alpha
        if img.getchannel("A").getextrema()[0] < 255:
            raise InputError(f"{what}: image {name!r} has transparent pixels, whose colour is undefined; flatten it "
                             "onto a background and save it without transparency")
    return np.asarray(img.convert(target))


# ---- safetensors: header parsed here, shapes checked on the meta device, values checked chunk by chunk

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# the exponent bits of each accepted float format: all set means Inf or NaN
_NONFINITE = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def _check_safetensors(path: Path, spec: ModelSpec, limits: Limits) -> None:
    header, data_start = _safetensors_header(path)
    model = _without_weights(spec)
    if model is not None:  # else the worker, which builds the network anyway, checks the rest (load_model)
        parameters = sum(p.numel() for p in model.parameters())
        if parameters > limits.model_parameters:
            raise InputError(f"model_spec: {spec.architecture} with {spec.num_classes:,} classes has {parameters:,} "
                             f"parameters, beyond the limit of {limits.model_parameters:,}; choose a smaller network "
                             "(an operator can raise LADDER_MAX_MODEL_PARAMETERS)", 413)
        _check_latent_layer(model.net, spec)
        _check_outputs_on_meta(model, spec)
        given = {k: (tuple(v["shape"]), _SAFETENSORS_DTYPES[v["dtype"]]) for k, v in header.items()}
        check_weight_layout(model.net.state_dict(), given)
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


def _without_weights(spec: ModelSpec) -> Classifier | None:
    """The spec's classifier on the meta device: shapes and dtypes, no memory for the weights. None for a builder
    that cannot run on the meta device: the API never builds a network for real (a few bytes of spec could make
    it allocate gigabytes), so such a network is checked by the worker that builds it."""
    try:
        with torch.device("meta"):
            return Classifier(build_net(spec), spec.mean, spec.std)
    except InputError as e:
        if _meta_only(e):
            return None
        raise  # the builder's own complaint (e.g. inputs too small for LeNet): the same on any device


def _meta_only(e: BaseException) -> bool:
    """Whether an error comes from the meta device (an operator without a meta kernel, a tensor's value asked for)."""
    while e is not None:
        if isinstance(e, NotImplementedError) or "meta" in str(e).lower():
            return True
        e = e.__cause__
    return False


def _regnet_widths_on_cpu() -> None:
    """torchvision's RegNet builders compute their stage widths with small tensors (torch.arange … .tolist()),
    which the meta device cannot give values for: that computation runs on the CPU, wherever the parameters go.
    Its result is lists of ints, so the change is invisible everywhere else."""
    params = torchvision.models.regnet.BlockParams
    original = params.from_init_params.__func__
    if getattr(original, "widths_on_cpu", False):
        return

    def from_init_params(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    from_init_params.widths_on_cpu = True
    params.from_init_params = classmethod(from_init_params)


_regnet_widths_on_cpu()


def _check_latent_layer(net: torch.nn.Module, spec: ModelSpec) -> None:
    """Refuse a latent_layer that names no module of the network (whether it is called is the worker's check)."""
    if spec.latent_layer is None:
        return
    try:
        net.get_submodule(spec.latent_layer)
    except AttributeError as e:
        leaves = [n for n, m in net.named_modules() if n and not any(True for _ in m.children())]
        raise InputError(f"model_spec: latent_layer {spec.latent_layer!r} is not a layer of {spec.architecture}; "
                         f"name a module path, e.g. one of its last layers: {', '.join(leaves[-4:])}") from e


def _check_outputs_on_meta(model: Classifier, spec: ModelSpec) -> None:
    """check_outputs on the meta model; builders' own shape assertions (a ViT's fixed image size) are refusals too."""
    try:
        check_outputs(model.eval(), spec)
    except InputError:
        raise
    except (AssertionError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{spec.architecture} cannot take inputs of shape {list(spec.input_shape)}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    except NotImplementedError:  # an operator without a meta kernel: the worker's real forward pass checks it
        return


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
    # the worker reads the file with the safetensors library, so the library judges the header too (it refuses
    # what Python's json takes: a BOM, UTF-16, lone surrogates, non-string metadata, floats as sizes, …)
    try:
        with safe_open(str(path), framework="pt") as lib:  # maps the file and parses the header; reads no tensor
            names = set(lib.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"model: the safetensors library cannot read its header ({' '.join(str(e).split())[:200]}); "
                         "save it with safetensors.torch.save_file") from e
    if names != set(header):
        raise InputError("model: the safetensors library reads other tensor names from its header than JSON does; "
                         "save it with safetensors.torch.save_file")
    return header, 8 + n


def _once_each(message: Callable[[str], str]) -> Callable[[list[tuple[str, object]]], dict]:
    """A json.loads object_pairs_hook refusing a key given twice: read one way here, it could be read another way
    by the next parser (the safetensors library, pydantic)."""
    def pairs_to_dict(pairs: list[tuple[str, object]]) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise InputError(message(key))
            seen.add(key)
        return dict(pairs)

    return pairs_to_dict


_unique_keys = _once_each(
    lambda key: f"model: the safetensors header names {key!r} twice; save it with safetensors.torch.save_file")


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
# the strings of an exported program that are free text, never code: node metadata torch keeps as it is
_PT2_FREE_TEXT = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack"})
_PT2_NAME_KEYS = frozenset({"name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name",
                            "custom_obj_name", "forward_arg_names", "path_name"})
_PT2_WORD = re.compile(r"[A-Za-z0-9_.+\-]{0,64}")  # every other string: versions, verifiers, devices, words
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})
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
    """Refuse an exported program whose names are not plain dotted identifiers, whose graph calls anything but
    allow-listed operators, or whose size expressions are not plain sympy (docs/security.md)."""
    if not isinstance(program, dict):
        raise InputError(f"model: {name!r} is not an exported program; save it with torch.export.save")
    if program.get("guards_code"):
        raise InputError(f"model: {name!r} carries guard code, which torch would run as Python; export it again with "
                         "torch.export.export (its programs carry none)")
    _scan_strings(program, name)


def _scan_strings(document: object, name: str) -> None:
    """Every string and key of a .pt2 JSON document, each by the rule of where it sits (nothing is parsed as code)."""
    stack: list[tuple[object, str]] = [(document, "")]
    while stack:
        item, key = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not graphnet.NAME.fullmatch(k):
                    raise _odd_name(k, name)
                stack.append((v, k))
        elif isinstance(item, list):
            stack.extend((v, key) for v in item)
        elif isinstance(item, str):
            _scan_string(item, key, name)


def _scan_string(value: str, key: str, name: str) -> None:
    if key == "target" or key == "as_operator":
        if not graphnet.allowed(value):
            raise graphnet.not_allowed(value)
    elif key == "expr_str":
        if not _plain_size_expression(value):
            raise InputError(f"model: the exported graph holds the size expression {value[:100]!r}, which is not plain "
                             "symbolic arithmetic; export it again with torch.export.export")
    elif key in _PT2_FREE_TEXT:
        if len(value) > 16_384 or any(c < " " and c not in "\n\t" for c in value):
            raise InputError(f"model: the node metadata {key} in {name!r} holds control characters or is too long; "
                             "export it again with torch.export.export")
    elif key in ("in_spec", "out_spec"):
        _scan_treespec(value, key, name)
    elif key in _PT2_NAME_KEYS or key == "fqn":
        if not (graphnet.NAME.fullmatch(value) or (key == "fqn" and value == "")):
            raise _odd_name(value, name)
    elif not _PT2_WORD.fullmatch(value):
        raise InputError(f"model: {name!r} holds {value[:60]!r} under {key!r}, which torch.export.save never writes; "
                         "export the network again with torch.export.export and torch.export.save")


def _scan_treespec(value: str, key: str, name: str) -> None:
    """A pytree spec (the program's argument structure): containers of known types keyed by plain names."""
    try:
        spec = json.loads(value)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"model: the {key} of {name!r} is not valid JSON; export the network again") from e
    stack = [spec[1]] if isinstance(spec, list) and len(spec) == 2 else [None]
    while stack:
        node = stack.pop()
        if not (isinstance(node, dict) and node.get("type") in _TREESPEC_TYPES and isinstance(node.get("children_spec"), list)):
            raise InputError(f"model: the {key} of {name!r} describes arguments of a kind torch.export.save never writes; "
                             "export a network that takes one tensor")
        context = node.get("context")
        keys = json.loads(context) if isinstance(context, str) else context
        if not (keys is None or (isinstance(keys, list) and all(isinstance(k, str) and graphnet.NAME.fullmatch(k) for k in keys))):
            raise _odd_name(str(context), name)
        stack.extend(node["children_spec"])


def _odd_name(value: str, name: str) -> InputError:
    return InputError(f"model: {name!r} names {value[:100]!r}, which is not a plain dotted identifier (letters, digits, "
                      "underscores, no leading double underscore); give the network's modules, parameters, buffers and "
                      "inputs ordinary Python names and export it again")


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
    _scan_strings(config, name)
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


def _convert_pt2(path: Path, spec: ModelSpec, limits: Limits, mode: str) -> None:
    """Replace a scanned .pt2 by its network in graphnet's allow-listed form, converted (and, for mode check,
    tried) in the sandbox; the archive itself is never deserialised outside it."""
    converted = path.with_name(path.name + ".graph")
    try:
        sandbox.run_pt2check(mode, path, spec.model_dump_json(), memory_bytes=limits.pt2_memory_bytes,
                             timeout_s=limits.pt2_timeout_s, concurrent=limits.pt2_concurrent, out=converted)
        graphnet.read(converted, meta=True)  # what came out of the sandbox is checked like any upload (no weights)
        converted.replace(path)
    finally:
        converted.unlink(missing_ok=True)


def _load_graph(path: Path, spec: ModelSpec) -> Classifier:
    model = Classifier(graphnet.read(path), spec.mean, spec.std).eval()
    check_outputs(model, spec)
    return model
