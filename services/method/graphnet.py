"""A custom network as data: a flat list of allow-listed PyTorch operator calls and its named tensors, and
`GraphNet`, the nn.Module that runs them.

An uploaded torch.export archive is only ever deserialised inside the sandbox (services.pt2check), which
turns its graph into this form with `encode`; the worker rebuilds the network with `decode`, which trusts
nothing it reads: every call target is looked up in an allow-list of tensor operators, every tensor name
must be a plain dotted identifier, every argument is a number, a string, a list or a reference to an
earlier node. No Python from the archive is generated or run, and torch.fx's code generation later sees
only the names that pass here (docs/security.md).
"""

import json
import math
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, fx, nn

from services.method.errors import InputError

FORMAT = "ladder.graph/1"
# a plain dotted identifier: what a parameter's path in a module tree is; no quotes, brackets or dunders
# (components may be numbers: a Sequential's children are named 0, 1, …)
_PART = r"((?!__)[A-Za-z_][A-Za-z0-9_]{0,99}|[0-9]{1,9})"
NAME = re.compile(rf"{_PART}(\.{_PART}){{0,31}}")
# aten operators a classifier computes with: pure tensor functions (and the in-place forms of a few). Nothing
# that touches files, storages, streams, RNG state shared with the host, or other processes (e.g. from_file, set_).
ATEN = frozenset("""
    abs add add_ addmm adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d alias amax
    amin any all arange argmax argmin as_strided avg_pool1d avg_pool2d avg_pool3d baddbmm batch_norm bitwise_and
    bitwise_not bitwise_or bmm cat ceil chunk clamp clamp_ clamp_max clamp_min clone constant_pad_nd contiguous conv1d
    conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution cos cumsum detach div div_ dropout dropout_
    elu elu_ embedding eq erf exp expand expand_as flatten flip floor floor_divide full full_like gather ge gelu
    group_norm gt hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh hardtanh_ index index_select instance_norm
    layer_norm le leaky_relu leaky_relu_ lift_fresh_copy linear log log_softmax logsumexp lt masked_fill matmul max
    max_pool1d max_pool2d max_pool2d_with_indices max_pool3d maximum mean min minimum mish mm mul mul_ native_batch_norm
    native_dropout native_group_norm native_layer_norm ne neg new_ones new_zeros norm ones ones_like pad permute pixel_shuffle
    pow prelu reciprocal relu relu6 relu_ remainder repeat reshape roll round rsqrt rsub scalar_tensor
    scaled_dot_product_attention select sigmoid sigmoid_ sign silu silu_ sin slice softmax softplus split
    split_with_sizes sqrt square squeeze stack std sub sub_ sum sym_numel sym_size sym_storage_offset sym_stride t
    tanh tanh_ to transpose tril triu type_as unbind unflatten unsqueeze upsample_bilinear2d upsample_nearest2d var view
    where zeros zeros_like _assert_scalar _assert_tensor_metadata _native_batch_norm_legit_functional
    _native_batch_norm_legit_no_training _log_softmax _softmax _to_copy _unsafe_view sym_constrain_range_for_size
""".split())  # noqa: SIM905
# size arithmetic on symbolic batch sizes, as torch.export writes it
PYTHON_OPS: dict[str, Callable] = {f"{f.__module__}.{f.__name__}": f for f in (  # "_operator.mul", as the archive names it
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.neg, operator.pos, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, math.trunc, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min,
    torch.sym_not, torch.sym_sqrt, torch.sym_ite)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.bool)}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
_MAX_NODES = 100_000


_ATEN_NAME = re.compile(r"aten\.(\w+)\.([A-Za-z][A-Za-z0-9_]{0,40})")  # aten.<packet>.<overload>


def allowed(name: str) -> bool:
    """Whether an archive's call target (`torch.ops.aten.conv2d.default`, `_operator.mul`) is on the allow-list."""
    m = _ATEN_NAME.fullmatch(name.removeprefix("torch.ops."))
    return name in PYTHON_OPS or (m is not None and m[1] in ATEN)


def not_allowed(name: str) -> InputError:
    """The refusal of a call target that is not on the allow-list (the scan's, the sandbox's and the worker's)."""
    return InputError(f"model: the network calls {name[:100]!r}, which is not an allowed PyTorch operator; export a "
                      "network built from standard tensor operations (no control flow, files or storages)")


def target_name(target: object) -> str | None:
    """The allow-list name of a graph node's call target (`aten.conv2d.default`, `_operator.mul`), or None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        packet = target._overloadpacket.__name__
        return f"aten.{packet}.{target._overloadname}" if packet in ATEN else None
    return next((name for name, f in PYTHON_OPS.items() if f is target), None)


def resolve(name: str) -> Callable:
    """The operator an allow-list name stands for; refuses every other name."""
    if name in PYTHON_OPS:
        return PYTHON_OPS[name]
    m = _ATEN_NAME.fullmatch(name)
    ops = getattr(torch.ops.aten, m[1], None) if m is not None and m[1] in ATEN else None  # None: not in this torch
    if ops is not None and m is not None and m[2] in ops.overloads():
        return getattr(ops, m[2])
    raise not_allowed(name)


# ---- encoding (inside the sandbox): an ExportedProgram's graph → JSON-able nodes and named tensors


def encode(program: torch.export.ExportedProgram) -> tuple[dict, dict[str, Tensor]]:
    """The program's graph as ladder.graph/1 and its tensors by name (parameters, buffers, constants)."""
    from torch.export.graph_signature import InputKind, OutputKind

    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    user_out = [i for i, s in enumerate(program.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
    index: dict[fx.Node, int] = {}
    nodes: list[dict] = []
    tensors: dict[str, Tensor] = {}
    params: list[str] = []

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            return {"node": index[a]}
        if isinstance(a, (list, tuple)):
            return [arg(x) for x in a]
        if isinstance(a, float) and not math.isfinite(a):
            return {"float": str(a)}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, torch.dtype):
            return {"dtype": str(a).removeprefix("torch.")}
        if isinstance(a, torch.device):
            return {"device": "model"}  # wherever the network runs, not where it was exported
        if isinstance(a, torch.layout):
            return {"layout": str(a).removeprefix("torch.")}
        if isinstance(a, torch.memory_format):
            return {"memory_format": str(a).removeprefix("torch.")}
        raise InputError(f"model: the exported graph passes a {type(a).__name__} to an operator, which is not supported")

    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                nodes.append({"op": "input"})
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                source = program.state_dict if spec.target in program.state_dict else program.constants
                tensors[spec.target] = source[spec.target].detach()
                if spec.kind == InputKind.PARAMETER:
                    params.append(spec.target)
                nodes.append({"op": "tensor", "name": spec.target})
            else:
                raise InputError(f"model: the exported program takes a {spec.kind.name.lower()} input, which is not "
                                 "supported; export a network whose inputs are one image batch and its own tensors")
        elif node.op == "call_function":
            name = target_name(node.target)
            if name is None:
                raise not_allowed(str(node.target))
            nodes.append({"op": "call", "target": name, "args": arg(node.args), "kwargs": {k: arg(v) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            outs = [node.args[0][i] for i in user_out]
            if len(outs) != 1:
                raise InputError(f"model: the network returns {len(outs)} values; export one that returns the logits alone")
            nodes.append({"op": "output", "value": arg(outs[0])})
        else:  # get_attr and call_module: submodules of control-flow operators
            raise InputError(f"model: the exported graph holds a {node.op} node (control flow such as torch.cond?), which "
                             "is not supported; export a network without data-dependent control flow")
        index[node] = len(nodes) - 1
    return {"format": FORMAT, "nodes": nodes, "parameters": params}, tensors


# ---- decoding (in the worker): checked JSON and tensors → GraphNet


def decode(graph: object, tensors: dict[str, Tensor]) -> "GraphNet":
    """The network described by `graph` (ladder.graph/1) with `tensors`; refuses anything not in the format."""
    if not (isinstance(graph, dict) and graph.get("format") == FORMAT and isinstance(graph.get("nodes"), list)
            and isinstance(graph.get("parameters"), list)):
        raise InputError("model: the converted network is not in the ladder.graph/1 format")
    raw = graph["nodes"]
    if not 2 <= len(raw) <= _MAX_NODES:
        raise InputError(f"model: the network has {len(raw)} graph nodes; the limit is {_MAX_NODES}")
    nodes: list[tuple] = []
    inputs = 0
    for i, node in enumerate(raw):
        op = node.get("op") if isinstance(node, dict) else None
        if op == "input":
            inputs += 1
            nodes.append(("input",))
        elif op == "tensor":
            name = node.get("name")
            if not (isinstance(name, str) and NAME.fullmatch(name) and name in tensors):
                raise InputError(f"model: graph node {i} names the tensor {str(name)[:100]!r}, which is not a plain dotted "
                                 "identifier of a tensor the archive holds")
            nodes.append(("tensor", name))
        elif op == "call" and isinstance(node.get("target"), str) and isinstance(node.get("kwargs"), dict):
            nodes.append(("call", resolve(node["target"]), _value(node.get("args"), i),
                          {_key(k): _value(v, i) for k, v in node["kwargs"].items()}))
        elif op == "output" and i == len(raw) - 1:
            nodes.append(("output", _value(node.get("value"), i)))
        else:
            raise InputError(f"model: graph node {i} is not an input, tensor, operator call or the final output")
    if inputs != 1 or nodes[-1][0] != "output":
        raise InputError(f"model: the network takes {inputs} inputs; export one that takes a single image batch")
    params = set(graph["parameters"])
    if not params <= set(tensors) or any(not tensors[p].is_floating_point() for p in params):
        raise InputError("model: the network's parameters must be floating-point tensors it holds")
    return GraphNet(nodes, tensors, params)


def _key(k: object) -> str:
    if not (isinstance(k, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,40}", k)):
        raise InputError(f"model: an operator's keyword {str(k)[:50]!r} is not a plain name")
    return k


def _value(v: object, at: int) -> object:
    """An operator argument: numbers, short strings, lists, references to earlier nodes, dtypes and the like."""
    if v is None or isinstance(v, (bool, str)):
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9_]{0,40}", v):
            raise InputError(f"model: graph node {at} passes the string {v[:50]!r}, which is not a plain word")
        return v
    if isinstance(v, int):
        if abs(v) >= 1 << 63:
            raise InputError(f"model: graph node {at} passes an integer beyond 64 bits")
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        return [_value(x, at) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "node" and type(x) is int and 0 <= x < at:
            return _Ref(x)
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "device" and x == "model":
            return _DEVICE
        for tag_, table in (("dtype", _DTYPES), ("layout", _LAYOUTS), ("memory_format", _MEMORY_FORMATS)):
            if tag == tag_ and x in table:
                return table[x]
    raise InputError(f"model: graph node {at} passes an argument that is not a number, word, list or earlier node")


class _Ref(int):
    """A reference to an earlier node's value."""


_DEVICE = object()  # stands for the device the network's tensors are on


class GraphNet(nn.Module):
    """Runs a decoded graph: each call looks up its arguments and calls its operator. Parameters and buffers sit
    under their original dotted names (so its state dict reads like the exported module's)."""

    def __init__(self, nodes: list[tuple], tensors: dict[str, Tensor], params: set[str]):
        super().__init__()
        self._nodes = nodes
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not isinstance(getattr(owner, part, None), nn.Module):
                    try:
                        owner.add_module(part, nn.Module())
                    except KeyError as e:  # a name that would shadow a module attribute (training, forward, …)
                        raise InputError(f"model: the tensor name {name!r} clashes with a module attribute; rename it") from e
                owner = getattr(owner, part)
            try:
                if name in params:
                    owner.register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=True))
                else:
                    owner.register_buffer(leaf, t.clone())
            except KeyError as e:
                raise InputError(f"model: the tensor name {name!r} clashes with a module attribute or another tensor") from e
        self._paths = {name: name.split(".") for name in tensors}

    def _tensor(self, name: str) -> Tensor:
        owner: Any = self
        for part in self._paths[name]:
            owner = getattr(owner, part)
        return owner

    def forward(self, x: Tensor) -> Tensor:
        values: list[object] = []
        device = next((t.device for t in self.parameters()), x.device)

        def value(v: object) -> object:
            if isinstance(v, _Ref):
                return values[v]
            if isinstance(v, list):
                return [value(a) for a in v]
            return device if v is _DEVICE else v

        for node in self._nodes:
            kind = node[0]
            if kind == "input":
                values.append(x)
            elif kind == "tensor":
                values.append(self._tensor(node[1]))
            elif kind == "call":
                values.append(node[1](*value(node[2]), **{k: value(v) for k, v in node[3].items()}))  # type: ignore[misc]
            else:
                return value(node[1])  # type: ignore[return-value]  # decode() makes the output node a tensor's
        raise AssertionError("decode() guarantees a final output node")


def to_bytes(graph: dict, tensors: dict[str, Tensor]) -> bytes:
    """One safetensors file: the tensors, and the graph as its metadata."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"ladder.graph": json.dumps(graph)})


_STORED = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "U8": torch.uint8,
           "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def read(path: Path, meta: bool = False) -> GraphNet:
    """The network of a file written by to_bytes (the safetensors library parses it; decode checks the rest).
    With `meta`, its tensors are shapes on the meta device: a check that allocates no weights (the API's)."""
    try:
        with safe_open(str(path), "pt") as f:
            graph = json.loads((f.metadata() or {}).get("ladder.graph", "null"))
            if meta:
                tensors = {}
                for k in f.keys():  # noqa: SIM118 (safe_open is no dict)
                    piece = f.get_slice(k)
                    if piece.get_dtype() not in _STORED:
                        raise InputError(f"model: the converted tensor {k[:100]!r} has the unsupported dtype {piece.get_dtype()}")
                    tensors[k] = torch.empty(piece.get_shape(), dtype=_STORED[piece.get_dtype()], device="meta")
            else:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise InputError(f"model: the converted network cannot be read ({type(e).__name__}); upload it again") from e
    return decode(graph, tensors)
