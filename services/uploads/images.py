"""Image-folder zips: one folder per class (sorted names = class order), decoded one image at a time."""

import io
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.errors import InputError, TooLarge
from services.method.models import (
    ModelSpec,
)
from services.uploads.rules import Limits, MiB
from services.uploads.zips import Budget, open_zip, read_member

_MAX_IMAGE_FILE = 16 * MiB  # one image of at most 1024×1024 pixels (ModelSpec's cap)
Image.MAX_IMAGE_PIXELS = 4096 * 4096  # PIL refuses larger declared sizes before decoding anything
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # no other PIL plugin ever parses a client's bytes
_IGNORED = ("Thumbs.db", "desktop.ini")  # with __MACOSX/ and dotfiles: what archivers add unasked

def image_zip_counts(path: Path, spec: ModelSpec, limits: Limits, what: str) -> torch.Tensor:
    """Images per class of a checked image-folder zip (each image decoded, none kept)."""
    counts = torch.zeros(spec.num_classes, dtype=torch.int64)
    with open_zip(path, what, limits, "is not a readable zip archive; zip one folder of images per class") as zf:
        budget = Budget(what, limits)
        for info, k in image_members(zf, spec, what):
            decode_image(read_member(zf, info, budget, _MAX_IMAGE_FILE, what), info.filename, spec, what)
            counts[k] += 1
    return counts


def image_members(zf: zipfile.ZipFile, spec: ModelSpec, what: str) -> list[tuple[zipfile.ZipInfo, int]]:
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


def decode_image(data: bytes, name: str, spec: ModelSpec, what: str) -> np.ndarray:
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
        raise TooLarge(f"{what}: image {name!r} declares more than {Image.MAX_IMAGE_PIXELS} pixels") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL's ways of meeting a broken file
        raise InputError(f"{what}: {name!r} is not a readable image ({e}); save it again as PNG or JPEG") from e
    if img.size != (w, h):
        raise InputError(f"{what}: image {name!r} is {img.width}×{img.height} pixels but the model takes {w}×{h} "
                         f"(input_shape [{c}, {h}, {w}]); resize the images")
    if animated:
        frames = getattr(img, "n_frames", "several")
        raise InputError(f"{what}: image {name!r} is animated ({frames} frames); save one still image per file")
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
        if img.getchannel("A").getextrema()[0] < 255:  # type: ignore[operator]  # one channel: (min, max)
            raise InputError(f"{what}: image {name!r} has transparent pixels, whose colour is undefined; flatten it "
                             "onto a background and save it without transparency")
    return np.asarray(img.convert(target))
