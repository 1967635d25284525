"""The .npz data check: x and y read as streams of .npy data, never whole."""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from services.datasets import channels_last, check_arrays, check_labels, check_pixel_values
from services.errors import InputError
from services.method.models import (
    ModelSpec,
)
from services.uploads.rules import CHUNK, Limits
from services.uploads.zips import Budget, Member, open_zip


def npz_counts(path: Path, spec: ModelSpec, limits: Limits, what: str) -> torch.Tensor:
    """Images per class of a checked .npz (pixels and labels streamed in chunks)."""
    with open_zip(path, what, limits, "is not a readable .npz file (no zip archive); save it with np.savez") as zf:
        budget = Budget(what, limits)
        names = set(zf.namelist())
        for k in ("x", "y"):
            if k in names and f"{k}.npy" in names:  # np.load reads the bare one; other readers may take either
                raise InputError(f"{what} holds both {k} and {k}.npy; keep only {k}.npy (as np.savez writes it)")
        # the member np.load will read: a bare name wins over name.npy (numpy.lib.npyio.NpzFile)
        member = {k: k if k in names else f"{k}.npy" for k in ("x", "y")}
        missing = sorted(k for k, m in member.items() if m not in names)
        if missing:
            raise InputError(f"{what} lacks array(s) {', '.join(missing)}; save it with np.savez(path, x=images, y=labels)")
        with Member(zf, zf.getinfo(member["x"]), budget) as xf, Member(zf, zf.getinfo(member["y"]), budget) as yf:
            x_shape, x_dtype = _npy_header(xf, what, "x")
            y_shape, y_dtype = _npy_header(yf, what, "y")
            shape = check_arrays(x_shape, x_dtype, y_shape, y_dtype, what)
            channels_last(shape[1:], spec.input_shape, what)
            _check_npy_pixels(xf, x_dtype, math.prod(shape), what)
            return _npy_label_counts(yf, y_dtype, shape[0], spec.num_classes, what)


def _check_npy_pixels(f: Member, dtype: np.dtype, count: int, what: str) -> None:
    lo, hi = math.inf, -math.inf
    for a in _npy_chunks(f, dtype, count, what, "x"):
        if dtype != np.uint8:  # uint8 needs no value check, but is read whole: complete and CRC-checked
            a_lo, a_hi = float(a.min()), float(a.max())
            if not (math.isfinite(a_lo) and math.isfinite(a_hi)):
                check_pixel_values(a_lo, a_hi, what)  # refuses NaN/Inf at once
            lo, hi = min(lo, a_lo), max(hi, a_hi)
    if dtype != np.uint8:
        check_pixel_values(lo, hi, what)


def _npy_label_counts(f: Member, dtype: np.dtype, count: int, num_classes: int, what: str) -> torch.Tensor:
    lo, hi, counts = math.inf, -math.inf, np.zeros(num_classes, np.int64)
    for a in _npy_chunks(f, dtype, count, what, "y"):
        lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
        counts += np.bincount(a[(a >= 0) & (a < num_classes)].astype(np.int64), minlength=num_classes)
    per_class = torch.from_numpy(counts)
    check_labels(int(lo), int(hi), per_class, num_classes, what)
    return per_class


def _npy_header(f: Member, what: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
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


def _npy_chunks(f: Member, dtype: np.dtype, count: int, what: str, name: str) -> Iterator[np.ndarray]:
    per = max(1, CHUNK // dtype.itemsize)
    while count:
        k = min(per, count)
        raw = f.read(k * dtype.itemsize)
        if len(raw) < k * dtype.itemsize:
            raise InputError(f"{what}: {name} is truncated (its header promises more data than it holds); save it again")
        count -= k
        yield np.frombuffer(raw, dtype)
