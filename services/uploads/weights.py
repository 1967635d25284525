"""Safetensors weights: the header parsed here, shapes checked on the meta device, values checked chunk by chunk."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors import SafetensorError, safe_open

from services.errors import InputError, TooLarge
from services.method.models import (
    Classifier,
    ModelSpec,
    build_net,
    check_outputs,
    check_weight_layout,
)
from services.uploads.rules import CHUNK, Limits, MiB, size_text

_MAX_SAFETENSORS_HEADER = 8 * MiB  # a zoo network's header is well under 1 MiB

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# the exponent bits of each accepted float format: all set means Inf or NaN
_NONFINITE = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def check_safetensors(path: Path, spec: ModelSpec, limits: Limits) -> None:
    header, data_start = _safetensors_header(path)
    model = _without_weights(spec)
    if model is not None:  # else the worker, which builds the network anyway, checks the rest (load_model)
        parameters = sum(p.numel() for p in model.parameters())
        if parameters > limits.model_parameters:
            raise TooLarge(f"model_spec: {spec.architecture} with {spec.num_classes:,} classes has {parameters:,} "
                             f"parameters, beyond the limit of {limits.model_parameters:,}; choose a smaller network "
                             "(an operator can raise LADDER_MAX_MODEL_PARAMETERS)")
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
            step = CHUNK - CHUNK % np.dtype(bits).itemsize
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
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, NotImplementedError) or "meta" in str(cause).lower():
            return True
        cause = cause.__cause__
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

    from_init_params.widths_on_cpu = True  # type: ignore[attr-defined]
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
            raise TooLarge(f"model: the safetensors header is {size_text(n)}, beyond the limit of "
                             f"{size_text(_MAX_SAFETENSORS_HEADER)}")
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


def once_each(message: Callable[[str], str]) -> Callable[[list[tuple[str, object]]], dict]:
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


_unique_keys = once_each(
    lambda key: f"model: the safetensors header names {key!r} twice; save it with safetensors.torch.save_file")
