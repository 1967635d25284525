"""A corpus of bad uploads for `POST /v1/harden`: a small valid job, and that job with one thing broken per case.

`good_parts` is a randomly initialised LeNet (safetensors) with its spec, 30 real digits per class
to train on, 10 per class to test on and a small config; `corpus` breaks one thing at a time and
says how the service must answer (status, and a fragment of the message). `validate_parts` does
exactly what the API does with the parts; cases marked `http_only` test what only the HTTP layer
sees (headers, part sizes, missing parts), which `validate_parts` stands in for here.
"""

import functools
import io
import json
import os
import pickle
import stat
import struct
import tempfile
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save
from torch import nn

from services.bounds import check_bounds
from services.datasets import mnist5k
from services.errors import InputError, TooLarge
from services.method.config import LadderConfig
from services.method.models import ModelSpec, build_classifier, build_net, net_weights
from services.settings import Settings
from services.uploads import (
    PARTS,
    DataInfo,
    Limits,
    check_data,
    check_model,
    check_part,
    check_splits,
    parse_config,
    parse_spec,
)

MiB = 1 << 20
SPEC = {"architecture": "lenet", "num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081]}
CUSTOM_SPEC = {**SPEC, "architecture": "custom"}
# small caps, so that the size cases stay small on disk and fast
LIMITS = Limits(model_bytes=16 * MiB, data_bytes=16 * MiB, json_bytes=64 * 1024, unzipped_bytes=64 * MiB, zip_ratio=200,
                zip_members=1000, pt2_timeout_s=120, pt2_memory_bytes=8192 * MiB,
                num_classes=100_000, model_parameters=500_000_000)  # the last two: the settings' defaults (HTTP tests)
# the file the planted pickle would create if anything ever executed it
PWNED_MARKER = Path(tempfile.gettempdir()) / f"ladder-pwned-{uuid.uuid4().hex[:12]}"

# name → (file name, bytes, media type), or with a fourth item: extra part headers for httpx (a Content-Disposition
# there replaces the one httpx writes, which percent-encodes control characters such as NUL)
Parts = dict[str, tuple[str, bytes, str] | tuple[str, bytes, str, dict[str, str]]]


@dataclass
class BadUpload:
    """One broken upload: the full parts, the status the service must answer and a fragment of its message."""

    name: str
    parts: Parts
    status: int
    fragment: str
    http_only: bool = False


@dataclass
class Validated:
    """What validate_parts found in a valid upload."""

    spec: ModelSpec
    config: LadderConfig
    model_format: str
    data: dict[str, DataInfo] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def validate_parts(parts: Parts, tmp: Path, limits: Limits) -> Validated:
    """Check parts exactly as the API does: headers, sizes, JSON parts, then the stored model and data files."""
    missing = [name for name, rule in PARTS.items() if rule.required and name not in parts]
    if missing:
        raise InputError(f"missing part(s) {', '.join(missing)}; send model, model_spec and train_data")
    for name, (filename, content, content_type, *_) in parts.items():
        check_part(name, filename, content_type)
        cap = getattr(limits, PARTS[name].cap)
        if len(content) > cap:
            raise TooLarge(f"{name} is larger than {cap} bytes")
    spec = parse_spec(parts["model_spec"][1])
    config = parse_config(parts["config"][1] if "config" in parts else None)
    check_bounds(config, Settings())  # the LADDER_MAX_* defaults, as the API's tests run them
    folder = tmp / uuid.uuid4().hex
    folder.mkdir(parents=True)
    paths = {}
    for name in ("model", "train_data", "test_data", "validation_data"):
        if name in parts:
            paths[name] = folder / name  # a name of ours: the client's file name only tells the format
            paths[name].write_bytes(parts[name][1])
    fmt = check_model(paths["model"], parts["model"][0], spec, limits)
    data = {w: check_data(paths[w], parts[w][0], spec, limits, w)
            for w in ("train_data", "test_data", "validation_data") if w in parts}
    check_splits(data["train_data"].class_counts, config, "test_data" in parts, "validation_data" in parts)
    return Validated(spec, config, fmt, data, paths)


# ---- the valid job


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """mnist5k as uint8 images (N, 1, 28, 28) and int64 labels."""
    data = mnist5k()
    return (data.x * 255).round().to(torch.uint8).numpy(), data.y.numpy()


def pick(per_class: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` digits of every class, after the first `skip` of each."""
    x, y = digits()
    idx = np.concatenate([np.flatnonzero(y == c)[skip:skip + per_class] for c in range(10)])
    return x[idx], y[idx]


@functools.cache
def weights() -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialised LeNet for SPEC."""
    torch.manual_seed(0)
    return net_weights(build_classifier(ModelSpec.model_validate(SPEC)))


def npz(**arrays: np.ndarray) -> bytes:
    """An .npz file's bytes (np.savez)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@functools.cache
def exported() -> bytes:
    """The LeNet of `weights()` as a torch.export archive (.pt2) with a dynamic batch size."""
    net = build_net(ModelSpec.model_validate(SPEC))
    net.load_state_dict(weights())
    return export(net)


def export(net: nn.Module, dynamic: bool = True) -> bytes:
    """A .pt2 archive of `net` in eval mode for 1×28×28 inputs (torch.export.save's bytes)."""
    program = torch.export.export(net.eval(), (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


class _FixedBatch(nn.Module):
    """Exported without a dynamic batch, its reshape keeps the example's batch of 2."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], -1))


def good_parts(tmp: Path) -> Parts:
    """A small valid job: LeNet weights, its spec, 30 digits per class to train on, 10 to test on, a config."""
    return {
        "model": ("lenet.safetensors", save(weights()), "application/octet-stream"),
        "model_spec": ("spec.json", json.dumps(SPEC).encode(), "application/json"),
        "train_data": ("train.npz", npz(x=pick(30)[0], y=pick(30)[1]), "application/octet-stream"),
        "test_data": ("test.npz", npz(x=pick(10, 30)[0], y=pick(10, 30)[1]), "application/zip"),
        "config": ("config.json", json.dumps({"seed": 1, "finetune": {"epochs": 2}}).encode(), "application/json"),
    }


def custom_parts(tmp: Path) -> Parts:
    """The valid job with the network as a .pt2 archive and architecture custom."""
    return {**good_parts(tmp), "model": ("lenet.pt2", exported(), "application/octet-stream"),
            "model_spec": ("spec.json", json.dumps(CUSTOM_SPEC).encode(), "application/json")}


# ---- builders of broken files


def rezip(data: bytes, replace: dict[str, bytes | None] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """A zip's bytes with members replaced (or dropped, for None) and added; members are named by their ending."""
    replace = replace or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            ending = next((k for k in replace if info.filename.endswith(k)), None)
            if ending is None:
                dst.writestr(info, src.read(info))
            elif replace[ending] is not None:
                dst.writestr(info, replace[ending])
        root = src.namelist()[0].partition("/")[0]
        for name, content in (add or {}).items():
            dst.writestr(f"{root}/{name}", content)
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    return out.getvalue()


def png(array: np.ndarray) -> bytes:
    """A PNG file of an H×W uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_zip() -> dict[str, bytes]:
    """The 30 training digits per class as an image-folder tree, digits/<class>/<n>.png, plus the junk macOS adds."""
    x, y = pick(30)
    members = {f"digits/{c}/{i:04d}.png": png(img[0]) for i, (img, c) in enumerate(zip(x, y))}
    return {**members, "__MACOSX/digits/0/._0000.png": b"\x00\x05\x16\x07", "digits/.DS_Store": b"junk"}


def _deflated_zeros(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x holds uint8 zeros of `shape` (written as a stream and deflated: tiny on disk) and y nothing."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            left = int(np.prod(shape))
            block = bytes(4 * MiB)
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        z.writestr("y.npy", _npy(np.zeros(0, np.int64)))
    return out.getvalue()


def _encrypted(data: bytes) -> bytes:
    """The zip with the 'encrypted' flag set on its first member (local and central headers)."""
    raw = bytearray(data)
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.index(signature)
        raw[i + at] |= 0x1
    return bytes(raw)


class _Planted:
    """Pickles as a call of os.system: what an attacker puts in a .pt2's example inputs."""

    def __reduce__(self):
        return os.system, (f"touch {PWNED_MARKER}",)


def _program(edit) -> bytes:
    """The good .pt2 with its models/model.json edited by `edit` (a function of the parsed JSON)."""
    with zipfile.ZipFile(io.BytesIO(exported())) as z:
        program = json.loads(z.read(next(n for n in z.namelist() if n.endswith("models/model.json"))))
    edit(program)
    return rezip(exported(), {"models/model.json": json.dumps(program).encode()})


def planted(marker: Path = PWNED_MARKER, where: str = "both") -> bytes:
    """The good .pt2 with conv1.weight renamed so that torch.fx's generated forward() runs `touch marker` (the
    outside corpus's finding: a live exploit for torch.export.load(...).module(); tests/test_pt2.py shows it)."""
    assert "." not in str(marker)  # fx splits attribute paths at dots
    name = f'conv1.weight") if getattr(__import__("os"), "system")("touch {marker}") else ("z'
    with zipfile.ZipFile(io.BytesIO(exported())) as z:
        member = {n.rpartition("/")[2]: n for n in z.namelist()}
        program = json.loads(z.read(member["model.json"]))
        payloads = json.loads(z.read(member["model_weights_config.json"]))
    if where in ("both", "program"):
        for spec in program["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "conv1.weight":
                spec["parameter"]["parameter_name"] = name
    if where in ("both", "payloads"):
        payloads["config"][name] = payloads["config"].pop("conv1.weight")
    return rezip(exported(), {"models/model.json": json.dumps(program).encode(),
                              "model_weights_config.json": json.dumps(payloads).encode()})


def _graph(edit) -> bytes:
    """The good .pt2 with the graph module of its program edited by `edit`."""
    return _program(lambda p: edit(p["graph_module"]))


def _signature(gm: dict) -> dict:
    return gm["module_call_graph"][0]["signature"]


def _dict_argument(gm: dict) -> None:
    spec = json.loads(_signature(gm)["in_spec"])
    spec[1]["children_spec"][1] = {"type": "builtins.dict", "context": json.dumps(["a)-(b"]), "children_spec": []}
    _signature(gm)["in_spec"] = json.dumps(spec)


def _first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def _planted_size(program: dict) -> None:
    """The input's symbolic batch size, replaced by code that sympify (inside torch.export.load) would run."""
    batch = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
    batch["expr_str"] = f"__import__('os').system('touch {PWNED_MARKER}')"


def _sample_inputs(pickled: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(exported())) as z:
        inner = z.read(next(n for n in z.namelist() if n.endswith("sample_inputs/model.pt")))
    return rezip(exported(), {"sample_inputs/model.pt": rezip(inner, {"data.pkl": pickled})})


def _payload_pickled() -> bytes:
    with zipfile.ZipFile(io.BytesIO(exported())) as z:
        config = json.loads(z.read(next(n for n in z.namelist() if n.endswith("model_weights_config.json"))))
    next(iter(config["config"].values()))["use_pickle"] = True
    return rezip(exported(), {"model_weights_config.json": json.dumps(config).encode()})


def corpus(tmp: Path) -> list[BadUpload]:
    """Every bad upload the service must refuse, each the valid job with one thing broken."""
    good = good_parts(tmp)
    x, y = pick(30)
    w = weights()
    cases: list[BadUpload] = []

    def case(name: str, status: int, fragment: str, http_only: bool = False, drop: str | None = None, **parts) -> None:
        broken = {**good, **parts}
        if drop:
            del broken[drop]
        cases.append(BadUpload(name, broken, status, fragment, http_only))

    def model(content: bytes, filename: str = "lenet.safetensors") -> tuple[str, bytes, str]:
        return filename, content, "application/octet-stream"

    def spec(value: dict | bytes) -> tuple[str, bytes, str]:
        return "spec.json", value if isinstance(value, bytes) else json.dumps(value).encode(), "application/json"

    def config(value: dict | bytes) -> tuple[str, bytes, str]:
        return "config.json", value if isinstance(value, bytes) else json.dumps(value).encode(), "application/json"

    def train(content: bytes, filename: str = "train.npz") -> tuple[str, bytes, str]:
        return filename, content, "application/octet-stream"

    def pt2(content: bytes) -> dict:
        return {"model": model(content, "net.pt2"), "model_spec": spec(CUSTOM_SPEC)}

    # HTTP layer: headers, sizes, presence
    case("wrong content type", 415, "content type", http_only=True,
         model=("lenet.safetensors", good["model"][1], "image/png"))
    case("oversized part", 413, "larger than", http_only=True, config=config(b"{}" + b" " * 70_000))
    case("missing part", 422, "missing part(s) model", http_only=True, drop="model")
    case("pickled checkpoint", 415, "pickled checkpoints are never loaded", model=model(good["model"][1], "lenet.pth"))
    case("unknown data kind", 415, "is not .npz or .zip", train_data=train(good["train_data"][1], "train.csv"))

    # model: safetensors
    full = save(w)
    case("truncated safetensors", 422, "truncated", model=model(full[:-1000]))
    case("safetensors garbage length", 422, "not a safetensors file", model=model(b"\xff" * 8 + full[8:]))
    case("safetensors header not json", 422, "not valid json", model=model(struct.pack("<Q", 12) + b"not json!!!!"))
    case("bool weight", 422, "fc1.bias is stored as bool", model=model(save({**w, "fc1.bias": torch.ones(500, dtype=torch.bool)})))
    case("complex weight", 422, "stored as complex64",
         model=model(save({**w, "conv1.weight": w["conv1.weight"].to(torch.complex64)})))
    case("int weight", 422, "fc2.weight is stored as int32",
         model=model(save({**w, "fc2.weight": w["fc2.weight"].to(torch.int32)})))
    case("missing key", 422, "missing 1 tensors (e.g. fc2.bias)",
         model=model(save({k: v for k, v in w.items() if k != "fc2.bias"})))
    case("extra key", 422, "1 unexpected tensors", model=model(save({**w, "fc3.weight": torch.zeros(2)})))
    case("wrong shape", 422, "fc2.weight has shape [5, 500]", model=model(save({**w, "fc2.weight": torch.zeros(5, 500)})))
    case("spec and weights disagree", 422, "fc2.bias has shape [10] but the spec's architecture needs [5]",
         model_spec=spec({**SPEC, "num_classes": 5}))
    nan, inf = w["fc1.weight"].clone(), w["conv2.bias"].clone()
    nan[3, 7], inf[2] = float("nan"), float("inf")
    case("nan weights", 422, "fc1.weight contains nan or inf", model=model(save({**w, "fc1.weight": nan})))
    case("inf weights", 422, "conv2.bias contains nan or inf", model=model(save({**w, "conv2.bias": inf.half()})))
    case("bfloat16 nan weights", 422, "fc1.weight contains nan or inf", model=model(save({**w, "fc1.weight": nan.bfloat16()})))
    case("tensor named twice", 422, "names 'fc2.bias' twice", model=model(_duplicate_key(full, "fc2.bias")))

    # spec and config
    case("spec invalid json", 422, "model_spec is not valid json", model_spec=spec(b'{"architecture": "lenet",'))
    case("spec not an object", 422, "must be a json object", model_spec=spec(b"[1, 28, 28]"))
    case("spec unknown architecture", 422, "unknown architecture 'nonet'", model_spec=spec({**SPEC, "architecture": "nonet"}))
    case("spec bad input_shape", 422, "input_shape [1, 0, 28]", model_spec=spec({**SPEC, "input_shape": [1, 0, 28]}))
    case("config unknown key", 422, "extra inputs are not permitted", config=config({"epochz": 3}))
    case("config bad value", 422, "finetune.epochs: input should be greater than or equal to 1",
         config=config({"finetune": {"epochs": 0}}))
    case("config not utf-8", 422, "not utf-8", config=config(b'\xff\xfe{"seed": 1}'))
    # what one job may cost (services/bounds.py): one tenant must not hold every worker
    case("config a billion epochs", 422, "finetune.epochs = 1,000,000,000 is above the limit of 100",
         config=config({"finetune": {"epochs": 10**9}}))
    case("config a million pgd steps", 422, "evaluate.attack.pgd_steps = 1,000,000 is above the limit",
         config=config({"evaluate": {"attack": {"pgd_steps": 10**6}}}))
    case("config too many eps values", 422, "perturb.eps",
         config=config({"perturb": {"eps": [0.1 * i for i in range(1, 200)]}}))
    case("config a seed beyond 64 bits", 422, "beyond 64 bits", config=config({"seed": 2**64 + 1}))
    case("config a seed its stages would overflow", 422, "seed", config=config({"seed": 2**60}))
    case("config a time budget of infinity", 422, "infinity", config=config(b'{"generator": {"time_budget_s": Infinity}}'))

    # data: .npz
    case("labels out of range", 422, "labels span 0..12", train_data=train(npz(x=x, y=np.where(y == 9, 12, y))))
    case("negative labels", 422, "labels span -1..9", train_data=train(npz(x=x, y=np.where(y == 0, -1, y))))
    case("float labels", 422, "give integer class indices", train_data=train(npz(x=x, y=y.astype(np.float32))))
    case("one class", 422, "holds only one class (3)", train_data=train(npz(x=x, y=np.full_like(y, 3))))
    case("empty data", 422, "test_data is empty", test_data=("t.npz", npz(x=x[:0], y=y[:0]), "application/zip"))
    case("x/y length mismatch", 422, "give one label per image, shape [300]", train_data=train(npz(x=x, y=y[:-1])))
    case("pixels outside [0,1]", 422, "float pixels span [0, 255]", train_data=train(npz(x=x.astype(np.float32), y=y)))
    nan_x = x.astype(np.float32) / 255
    nan_x[17, 0, 3, 4] = np.nan
    case("nan pixels", 422, "images contain nan or inf", train_data=train(npz(x=nan_x, y=y)))
    case("wrong image shape", 422, "the model takes [1, 28, 28]", train_data=train(npz(x=x[:, :, :20, :20], y=y)))
    case("uint16 pixels", 422, "images have dtype uint16", train_data=train(npz(x=x.astype(np.uint16), y=y)))
    objects = np.empty(len(y), dtype=object)
    case("pickled object array", 422, "pickled objects", train_data=train(npz(x=objects, y=y)))
    case("missing y", 422, "lacks array(s) y", train_data=train(npz(x=x)))
    few = np.concatenate([np.flatnonzero(y != 4), np.flatnonzero(y == 4)[:2]])
    case("class with 2 samples", 422, "has 2 samples of class 4", train_data=train(npz(x=x[few], y=y[few])))
    vx, vy = pick(5, 40)
    no_seven = vy != 7
    case("validation data without a class", 422, "validation_data has 0 samples of class 7",
         validation_data=train(npz(x=vx[no_seven], y=vy[no_seven]), "val.npz"))
    case("validation data with the selection off", 422, "set select.max_clean_drop",
         validation_data=train(npz(x=vx, y=vy), "val.npz"), config=config({"select": {"max_clean_drop": None}}))
    case("a carved validation split without a class", 422, "holds no sample of class 0",
         train_data=train(npz(x=pick(4)[0], y=pick(4)[1])))
    case("test labels out of range", 422, "test_data: labels span 1..10",
         test_data=("t.npz", npz(x=pick(10, 30)[0], y=np.minimum(pick(10, 30)[1] + 1, 10)), "application/zip"))
    case("npz not a zip", 422, "not a readable .npz file", train_data=train(b"x,y\n0,1\n"))
    case("truncated npy", 422, "x is truncated",
         train_data=train(_zip({"x.npy": _npy(x)[:-5000], "y.npy": _npy(y)})))
    case("data before the zip", 422, "data before its zip archive", train_data=train(b"MZ" * 64 + good["train_data"][1]))
    case("encrypted npz", 422, "is encrypted", train_data=train(_encrypted(good["train_data"][1])))
    case("zip bomb", 413, "decompresses to more than 64 mib",
         train_data=train(_deflated_zeros((102_000, 1, 28, 28))))
    case("compression ratio", 413, "beyond the compression ratio limit of 200×",
         train_data=train(_deflated_zeros((30_000, 1, 28, 28))))
    case("too many members", 413, "holds 1001 files; the limit is 1000",
         train_data=train(_zip({f"{i}.txt": b"" for i in range(1001)}), "train.zip"))

    # data: image-folder zips
    tree = image_zip()
    case("zip slip", 422, "unsafe path",
         train_data=train(_zip({**tree, "digits/0/../../../evil.png": tree["digits/0/0000.png"]}), "t.zip"))
    case("absolute path", 422, "unsafe path", train_data=train(_zip({**tree, "/etc/cron.d/x.png": b""}), "t.zip"))
    case("symlink member", 422, "is a symbolic link", train_data=train(_symlinked(tree), "t.zip"))
    case("wrong number of class folders", 422, "has 9 class folders",
         train_data=train(_zip({k: v for k, v in tree.items() if not k.startswith("digits/9/")}), "t.zip"))
    case("image of the wrong size", 422, "is 32×32 pixels but the model takes 28×28",
         train_data=train(_zip({**tree, "digits/0/0000.png": png(np.zeros((32, 32), np.uint8))}), "t.zip"))
    case("not an image", 422, "'digits/3/notes.txt' is not an image",
         train_data=train(_zip({**tree, "digits/3/notes.txt": b"hi"}), "t.zip"))
    case("broken image", 422, "is not a readable image",
         train_data=train(_zip({**tree, "digits/5/0000.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 50}), "t.zip"))

    # model: what the safetensors library refuses though Python's json takes it (the worker reads with the library)
    case("safetensors metadata not strings", 422, "safetensors library cannot read its header",
         model=model(save(w, metadata={"format": "pt"}).replace(b'"format":"pt"', b'"format":1234')))
    case("safetensors metadata not an object", 422, "safetensors library cannot read its header",
         model=model(_safetensors_header(full, lambda h: h.update(__metadata__=["pt"]))))
    case("safetensors header with a bom", 422, "safetensors library cannot read its header",
         model=model(_safetensors_header(full, encode=lambda t: "\ufeff".encode() + t.encode())))
    case("safetensors header in utf-16", 422, "safetensors library cannot read its header",
         model=model(_safetensors_header(full, encode=lambda t: t.encode("utf-16"))))
    case("safetensors lone surrogate in a name", 422, "safetensors library cannot read its header",
         model=model(_safetensors_header(full, lambda h: h.update({"\ud800": h.pop("fc2.bias")}),
                                         encode=lambda t: t.encode())))
    case("safetensors header beyond 8 mib", 413, "the safetensors header is 9 mib, beyond the limit of 8 mib",
         model=model((9 * MiB).to_bytes(8, "little") + b" " * (9 * MiB)))
    case("float8 weight", 422, "conv1.weight is stored as float8_e4m3fn",
         model=model(save({**w, "conv1.weight": w["conv1.weight"].to(torch.float8_e4m3fn)})))

    # spec: latent layers, limits on the network, bounds (a few bytes of spec must never build a big network)
    case("latent layer names no layer", 422, "latent_layer 'fc9' is not a layer of lenet",
         model_spec=spec({**SPEC, "latent_layer": "fc9"}))
    case("latent layer names a parameter", 422, "latent_layer 'fc1.weight' is not a layer of lenet",
         model_spec=spec({**SPEC, "latent_layer": "fc1.weight"}))
    case("latent layer dunder", 422, "latent_layer '__class__' is not a module path",
         model_spec=spec({**SPEC, "latent_layer": "__class__"}))
    case("latent layer private attribute", 422, "latent_layer 'fc1._forward_hooks' is not a module path",
         model_spec=spec({**SPEC, "latent_layer": "fc1._forward_hooks"}))
    case("num_classes beyond the limit", 413, "num_classes 1,000,000 is beyond the limit of 100,000",
         model_spec=spec({**SPEC, "architecture": "regnet_y_400mf", "num_classes": 1_000_000}))
    regnet_big = {**SPEC, "architecture": "regnet_y_128gf", "input_shape": [3, 224, 224], "mean": [0.5], "std": [0.25]}
    case("network beyond the parameter limit", 413, "parameters, beyond the limit of 500,000,000",
         model_spec=spec(regnet_big))
    case("regnet checked on the meta device", 422, "weights do not match the spec's architecture",
         model_spec=spec({**SPEC, "architecture": "regnet_x_400mf"}))
    case("vit at another input size", 422, "vit_b_16 cannot take inputs of shape [1, 28, 28]: wrong image height",
         model_spec=spec({**SPEC, "architecture": "vit_b_16"}))
    case("too many input channels", 422, "input_shape [17, 28, 28] is not [c,h,w]",
         model_spec=spec({**SPEC, "input_shape": [17, 28, 28], "mean": [0.5], "std": [0.5]}))
    case("input wider than 1024", 422, "input_shape [1, 28, 2048] is not [c,h,w]",
         model_spec=spec({**SPEC, "input_shape": [1, 28, 2048]}))
    case("look-alike architecture name", 422, "unknown architecture 'l\u0435net'",
         model_spec=spec({**SPEC, "architecture": "l\u0435net"}))  # a Cyrillic е
    case("detection model as architecture", 422, "unknown architecture 'fasterrcnn_resnet50_fpn'",
         model_spec=spec({**SPEC, "architecture": "fasterrcnn_resnet50_fpn"}))

    # spec and config: JSON that Python reads but strict JSON (and PostgreSQL) does not, or reads two ways
    case("spec holds infinity", 422, "model_spec holds infinity, which is not json",
         model_spec=spec(b'{"architecture": "lenet", "num_classes": 10, "input_shape": [1, 28, 28], '
                         b'"mean": [Infinity], "std": [0.3081]}'))
    case("config holds nan", 422, "config holds nan, which is not json", config=config(b'{"finetune": {"alpha": NaN}}'))
    case("config holds -infinity", 422, "config holds -infinity",
         config=config(b'{"evaluate": {"jsma": {"theta": -Infinity}}}'))
    case("config number overflows a double", 422, "config holds the number 1e999, beyond the range of a double",
         config=config(b'{"finetune": {"lr": 1e999}}'))
    case("config integer of 5000 digits", 422, "beyond 64 bits", config=config(b'{"seed": ' + b"9" * 5000 + b"}"))
    case("spec integer beyond 64 bits", 422, "model_spec holds the integer 100000000000000000000000000000, beyond 64 bits",
         model_spec=spec(json.dumps({**SPEC, "num_classes": 10**29}).encode()))
    case("spec key given twice", 422, "model_spec gives the key 'num_classes' twice",
         model_spec=spec(json.dumps(SPEC).encode()[:-1] + b', "num_classes": 5}'))
    case("config key given twice", 422, "config gives the key 'epochs' twice",
         config=config(b'{"finetune": {"epochs": 2, "epochs": 3}}'))
    case("deeply nested config", 422, "config is nested too deeply",
         config=config(b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"))

    # part headers: file names that the database cannot store (NUL) or that corrupt logs and listings
    nul = 'form-data; name="model"; filename="lenet\x00.safetensors"'
    case("file name with a nul", 422, "holds the control or invisible character u+0000",
         model=("lenet\x00.safetensors", full, "application/octet-stream", {"Content-Disposition": nul}))
    case("file name with an escape sequence", 422, "holds the control or invisible character u+001b",
         train_data=train(good["train_data"][1], "train\x1b[2J.npz"))
    case("file name with a bidi override", 422, "holds the control or invisible character u+202e",
         model=model(full, "lenet\u202eorsnet.safetensors"))

    # data: .npy headers numpy's parser takes but no array has
    right, labels = _npy_data(x), _npy_data(y)  # the bytes after np.save's header
    case("npy negative dimension", 422, "gives the shape [-300, 1, 28, 28]; dimensions must be non-negative",
         train_data=train(_zip({"x.npy": _npy_header("|u1", (-300, 1, 28, 28), right),
                                "y.npy": _npy_header("<i8", (-300,), labels)})))
    case("npy negative dimension, short data", 422, "gives the shape [300, 1, -28, 28]",
         train_data=train(_zip({"x.npy": _npy_header("|u1", (300, 1, -28, 28), right[:1000]), "y.npy": _npy(y)})))
    case("npy bool dimension", 422, "gives the shape [300, true, 28, 28]",
         train_data=train(_zip({"x.npy": _npy_header("|u1", (300, True, 28, 28), right), "y.npy": _npy(y)})))
    case("huge declared shape over tiny data", 422, "x is truncated (its header promises 784,000,000,000 bytes",
         train_data=train(_zip({"x.npy": _npy_header("|u1", (10**9, 1, 28, 28), right[:784]),
                                "y.npy": _npy_header("<i8", (10**9,), labels[:8])})))
    case("0-d images", 422, "x has shape []", train_data=train(npz(x=np.uint8(3), y=y)))
    case("0-d labels", 422, "y has shape []", train_data=train(npz(x=x, y=np.int64(3))))
    case("big-endian fortran-order uint16 pixels", 422, "images have dtype >u2",
         train_data=train(npz(x=np.asfortranarray(x.astype(">u2")), y=y)))
    case("structured pixels", 422, "images have dtype [('v', 'u1')]",
         train_data=train(npz(x=x.view([("v", "u1")]), y=y)))
    case("sub-array pixels", 422, "gives the sub-array dtype ('u1', (28, 28))",
         train_data=train(_zip({"x.npy": _npy_header(("|u1", (28, 28)), (300, 1), right), "y.npy": _npy(y)})))
    case("structured labels", 422, "labels have dtype [('k', '<i8')]", train_data=train(npz(x=x, y=y.view([("k", "<i8")]))))
    case("timedelta labels", 422, "labels have dtype timedelta64", train_data=train(npz(x=x, y=y.astype("m8[s]"))))
    case("npy format version 9", 422, "y is not a plain .npy array",
         train_data=train(_zip({"x.npy": _npy(x), "y.npy": b"\x93NUMPY\x09\x00" + _npy(y)[8:]})))
    case("x and x.npy both present", 422, "holds both x and x.npy",
         train_data=train(_zip({"x": _npy(x), "x.npy": _npy(x), "y.npy": _npy(y)})))
    case("member named twice", 422, "member 'x.npy' appears twice",
         train_data=train(_stored([("x.npy", _npy(x)), ("y.npy", _npy(y)), ("x.npy", _npy(x[::-1]))])))
    nul_name = _stored([("x.npyQevil", _npy(x)), ("y.npy", _npy(y))]).replace(b"x.npyQevil", b"x.npy\0evil")
    case("member name with a nul", 422, "has the control or invisible character u+0000 in its name",
         train_data=train(nul_name))

    # data: zips whose records disagree with each other or with the bytes (readers would see different archives)
    npz_bytes = good["train_data"][1]
    case("zip end record undercounts past the cap", 413, "holds more than 1000 files; the limit is 1000",
         train_data=train(_many_entries(npz_bytes, 1001)))
    case("zip end record undercounts", 422, "end record counts 2 files but its directory lists 3",
         train_data=train(_many_entries(npz_bytes, 1)))
    case("zip64 end record disagrees", 422, "its end record and its zip64 end record disagree",
         train_data=train(_zip64_end(npz_bytes, entries=5, plain_entries=2)))
    case("zip64 end record miscounts", 422, "end record counts 1 files but its directory lists 2",
         train_data=train(_zip64_end(npz_bytes, entries=1)))
    case("split zip archive", 422, "spans several disks", train_data=train(_end_record(npz_bytes, disk=1, cd_disk=1)))
    case("zip directory outside the file", 422, "its directory would run past its end record",
         train_data=train(_end_record(npz_bytes, offset=len(npz_bytes))))
    case("bytes after the zip", 422, "has bytes after its zip archive's end record",
         train_data=train(npz_bytes + b"\0" * 100))
    with zipfile.ZipFile(io.BytesIO(npz_bytes)) as z:
        commented = io.BytesIO()
        with zipfile.ZipFile(commented, "w") as out:
            for info in z.infolist():
                out.writestr(info.filename, z.read(info))
            out.comment = b"PK\x05\x06" + bytes(18) + b"hidden archive"
    case("zip comment hiding an end record", 422, "has bytes after its zip archive's end record",
         train_data=train(commented.getvalue()))
    stored = _stored([("x.npy", _npy(x)), ("y.npy", _npy(y))])
    case("overlapping members", 422, "member 'y.npy' overlaps the member before it",
         train_data=train(_grown_first_member(stored, 64)))
    case("local name differs from the directory's", 422, "damaged zip archive (file name in directory 'x.npy' and header",
         train_data=train(_renamed_local(stored, b"x.npy", b"z.npy")))

    # data: image-folder zips with images that have more than one reading
    digit = tree["digits/0/0000.png"]
    grey = np.asarray(Image.open(io.BytesIO(digit)))
    rgba = np.dstack([grey, grey, grey, np.where(grey > 0, 255, 0).astype(np.uint8)])
    for name, image, status, fragment in [
        ("animated gif", ("0000.gif", _animated_gif([grey, 255 - grey, grey])), 422, "is animated (3 frames)"),
        ("animated png", ("0000.png", _png_bytes(Image.fromarray(grey), save_all=True,
                                                   append_images=[Image.fromarray(255 - grey)])),
         422, "is animated (2 frames)"),
        ("exif-rotated jpeg", ("0000.jpg", _exif_rotated_jpeg(grey)), 422, "carries an exif orientation (6"),
        ("cmyk jpeg", ("0000.jpg", _jpeg(Image.frombytes("CMYK", (28, 28), np.dstack([grey] * 4).tobytes()))), 422,
         "stored as cmyk pixels"),
        ("transparent png", ("0000.png", _png_bytes(Image.frombytes("RGBA", (28, 28), rgba.tobytes()))), 422,
         "has transparent pixels"),
        ("palette png with a transparent colour",
         ("0000.png", _png_bytes(Image.fromarray(grey).convert("P"), transparency=0)), 422, "has transparent pixels"),
        ("1×1 image", ("0000.png", png(np.zeros((1, 1), np.uint8))), 422, "is 1×1 pixels but the model takes 28×28"),
        ("huge declared dimensions", ("0000.png", _png_declaring(30_000, 30_000)), 413,
         "declares more than 16777216 pixels"),
        ("truncated jpeg", ("0000.jpg", _jpeg(Image.fromarray(grey))[:400]), 422, "is not a readable image"),
    ]:
        members = {k: v for k, v in tree.items() if k != "digits/0/0000.png"}
        case(name, status, fragment, train_data=train(_zip({**members, f"digits/0/{image[0]}": image[1]}), "t.zip"))

    # model: .pt2 (custom architectures)
    case("pt2 with a zoo architecture", 422, "architecture must be 'custom'", model=model(exported(), "net.pt2"))
    case("custom with safetensors", 422, "needs the network itself", model_spec=spec(CUSTOM_SPEC))
    case("pt2 planted pickle", 422, "calls posix.system", **pt2(_sample_inputs(pickle.dumps(_Planted(), protocol=2))))
    case("pt2 planted pickle, protocol 5", 422, "opcode(s) frame, memoize, short_binunicode",
         **pt2(_sample_inputs(pickle.dumps(_Planted(), protocol=5))))
    case("pt2 aotinductor", 422, "aotinductor-compiled code",
         **pt2(rezip(exported(), add={"data/aotinductor/model/model.wrapper.cpp": b"//"})))
    case("pt2 native library", 422, "is a native library", **pt2(rezip(exported(), add={"data/libpayload.so": b"\x7fELF"})))
    case("pt2 opaque object", 422, "custom or opaque object",
         **pt2(rezip(exported(), add={"data/constants/opaque_obj_0": b"\x80\x04."})))
    case("pt2 pickled weight", 422, "is stored pickled", **pt2(_payload_pickled()))
    case("pt2 graph calls python", 422, "'torch.serialization.os.system', which is not an allowed pytorch operator",
         **pt2(_program(lambda p: _first_node(p).update(target="torch.serialization.os.system"))))
    case("pt2 size expression runs code", 422, "size expression", **pt2(_program(_planted_size)))
    case("pt2 guard code", 422, "carries guard code", **pt2(_program(lambda p: p.update(guards_code=["os.system('x')"]))))
    case("pt2 unexpected member", 422, "unexpected member", **pt2(rezip(exported(), add={"extra/notes.txt": b"hi"})))
    case("pt2 not a zip", 422, "not a .pt2 archive", **pt2(b"PT2 but not really"))
    case("pt2 fixed batch size", 422, "fails on a batch of 1", **pt2(export(_FixedBatch(), dynamic=False)))
    # .pt2 names: each reaches torch.fx's code generator or a lookup in torch.export.load; refused by the scan
    not_plain = "which is not a plain dotted identifier"
    case("pt2 python in a parameter name", 422, not_plain, **pt2(planted()))
    case("pt2 python in a weights-config key only", 422, not_plain, **pt2(planted(where="payloads")))
    case("pt2 python in a parameter name only", 422, not_plain, **pt2(planted(where="program")))
    case("pt2 node name with a space", 422, "names 'a b'",
         **pt2(_graph(lambda gm: gm["graph"]["nodes"][0]["outputs"][0]["as_tensor"].update(name="a b"))))
    case("pt2 dunder tensor name", 422, "names '__class__'",
         **pt2(_graph(lambda gm: gm["graph"]["tensor_values"].update(__class__=gm["graph"]["tensor_values"]["x"]))))
    case("pt2 module path with code", 422, "names 'conv1;import os'",
         **pt2(_graph(lambda gm: gm["module_call_graph"][1].update(fqn="conv1;import os"))))
    case("pt2 forward argument with code", 422, "names \"x=__import__('os')\"",
         **pt2(_graph(lambda gm: _signature(gm).update(forward_arg_names=["x=__import__('os')"]))))
    case("pt2 argument structure with code", 422, "names '[\"a)-(b\"]'", **pt2(_graph(_dict_argument)))
    case("pt2 unknown argument container", 422, "describes arguments of a kind",
         **pt2(_graph(lambda gm: _signature(gm).update(in_spec=json.dumps([1, {"type": "os.system", "context": None,
                                                                               "children_spec": []}])))))
    case("pt2 control-flow operator", 422, "calls 'torch.ops.higher_order.cond', which is not an allowed",
         **pt2(_graph(lambda gm: gm["graph"]["nodes"][0].update(target="torch.ops.higher_order.cond"))))
    case("pt2 file-reading operator", 422, "calls 'torch.ops.aten.from_file.default', which is not an allowed",
         **pt2(_graph(lambda gm: gm["graph"]["nodes"][0].update(target="torch.ops.aten.from_file.default"))))
    case("pt2 storage-swapping operator", 422, "calls 'torch.ops.aten.set_.source_storage', which is not an allowed",
         **pt2(_graph(lambda gm: gm["graph"]["nodes"][0].update(target="torch.ops.aten.set_.source_Storage"))))
    case("pt2 control characters in metadata", 422, "control characters",
         **pt2(_graph(lambda gm: gm["graph"]["nodes"][0]["metadata"].update(stack_trace="x\x00y"))))
    case("pt2 a field torch never writes", 422, "which torch.export.save never writes",
         **pt2(_graph(lambda gm: gm.update(schema_extra="print('hi')"))))
    case("pt2 a device name with code", 422, "which torch.export.save never writes",
         **pt2(_graph(lambda gm: gm["graph"]["tensor_values"]["x"]["device"].update(type="cpu'); import os; ('"))))
    return cases


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _duplicate_key(data: bytes, key: str) -> bytes:
    """The safetensors file with the entry of `key` written twice in its header (same offsets)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header)[:-1] + f', "{key}": {json.dumps(header[key])}}}'
    text += " " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text.encode() + data[8 + n:]


def _symlinked(tree: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, content in tree.items():
            z.writestr(name, content)
        link = zipfile.ZipInfo("digits/0/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
    return out.getvalue()


# ---- builders of broken .npy members, zips, images and safetensors headers


def _npy_data(a: np.ndarray) -> bytes:
    """The data of `a`'s .npy file, without its header."""
    f = io.BytesIO(_npy(a))
    assert np.lib.format.read_magic(f) == (1, 0)
    np.lib.format.read_array_header_1_0(f)
    return f.read()


def _npy_header(descr: object, shape: object, data: bytes, fortran: bool = False) -> bytes:
    """A .npy file with a header written as given (numpy's writer checks neither shape nor size) over `data`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + data


def _stored(members: list[tuple[str, bytes]]) -> bytes:
    """A zip of members stored uncompressed, in order, duplicate names allowed."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name
        with zipfile.ZipFile(out, "w") as z:
            for name, content in members:
                z.writestr(name, content)
    return out.getvalue()


_EOCD = struct.Struct("<4s4H2LH")


def _end_record(data: bytes, **fields: int) -> bytes:
    """The zip (no comment) with fields of its end record replaced: disk, entries, size, offset."""
    at = len(data) - _EOCD.size
    sig, disk, cd_disk, here, entries, size, offset, comment = _EOCD.unpack_from(data, at)
    values = {"disk": disk, "cd_disk": cd_disk, "here": here, "entries": entries, "size": size, "offset": offset, **fields}
    if "entries" in fields and "here" not in fields:
        values["here"] = fields["entries"]
    return data[:at] + _EOCD.pack(sig, values["disk"], values["cd_disk"], values["here"], values["entries"],
                                  values["size"], values["offset"], comment)


def _zip64_end(data: bytes, entries: int | None = None, plain_entries: int | None = None) -> bytes:
    """The zip (no comment) with a zip64 end record and locator added before its end record; `entries` is the zip64
    record's member count (default: the true one), `plain_entries` the plain record's (default: 0xFFFF, 'see zip64')."""
    at = len(data) - _EOCD.size
    sig, disk, cd_disk, _, count, size, offset, comment = _EOCD.unpack_from(data, at)
    n = count if entries is None else entries
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    plain = 0xFFFF if plain_entries is None else plain_entries
    return data[:at] + record + locator + _EOCD.pack(sig, disk, cd_disk, plain, plain, 0xFFFFFFFF, 0xFFFFFFFF, comment)


def _many_entries(data: bytes, copies: int) -> bytes:
    """The zip with its first central directory entry repeated `copies` times and its end record still counting
    the original entries: the directory lies about its size only to zipfile, which reads every entry it holds."""
    at = len(data) - _EOCD.size
    sig, disk, cd_disk, here, count, size, offset, comment = _EOCD.unpack_from(data, at)
    directory = data[offset:offset + size]
    first = directory[:46 + sum(struct.unpack_from("<3H", directory, 28))]
    directory = first * copies + directory
    return data[:offset] + directory + _EOCD.pack(sig, disk, cd_disk, here, count, len(directory), offset, comment)


def _grown_first_member(data: bytes, grow: int) -> bytes:
    """The zip with its first member's sizes in the central directory grown by `grow` bytes: its data now covers
    the next member's local header (members that overlap)."""
    at = data.index(b"PK\x01\x02")
    compress, plain = struct.unpack_from("<2L", data, at + 20)
    return data[:at + 20] + struct.pack("<2L", compress + grow, plain + grow) + data[at + 28:]


def _renamed_local(data: bytes, old: bytes, new: bytes) -> bytes:
    """The zip with its first local header's name `old` replaced by `new` (same length), its central name kept."""
    assert len(old) == len(new)
    at = data.index(b"PK\x03\x04")
    return data[:at] + data[at:].replace(old, new, 1)


def _png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def _animated_gif(frames: list[np.ndarray]) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


def _jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **params)
    return buf.getvalue()


def _exif_rotated_jpeg(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return _jpeg(Image.fromarray(array), exif=exif)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height 8-bit grey pixels, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _safetensors_header(data: bytes, edit=None, encode=None) -> bytes:
    """The safetensors file with its header (parsed JSON) changed by `edit` and written back by `encode` (text → bytes;
    default UTF-8), padded with spaces to a multiple of 8 bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if edit is not None:
        edit(header)
    text = json.dumps(header)
    raw = encode(text) if encode is not None else text.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
