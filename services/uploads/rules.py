"""The caps an upload is checked against, the parts a job takes, and what a data check finds."""

import unicodedata
from dataclasses import dataclass

from services.settings import Settings

MiB = 1 << 20
CHUNK = 8 * MiB  # bytes read at a time from a member or a file


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


def size_text(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def odd_character(text: str) -> str | None:
    """The first control, format (invisible), surrogate or line/paragraph-separator character of `text`, as U+XXXX."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None
