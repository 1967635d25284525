"""Custom networks (.pt2, torch.export): every member accounted for, pickles and graph scanned, nothing executed;
then loaded in a sandboxed child process (services.pt2check) under limits."""

import ast
import json
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from services import sandbox
from services.errors import InputError
from services.method import graphnet
from services.method.models import (
    Classifier,
    ModelSpec,
    check_outputs,
)
from services.uploads.rules import Limits, MiB
from services.uploads.zips import Budget, open_zip, read_member

_MAX_PT2_JSON = 16 * MiB  # the exported graph and its payload configs
_MAX_PICKLE = 16 * MiB  # the pickled example inputs of a .pt2

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


def scan_pt2(path: Path, limits: Limits) -> None:
    """Refuse a .pt2 archive holding anything torch.export.load could run: native code, non-tensor pickles, Python."""
    with open_zip(path, "model", limits, "is not a .pt2 archive (no zip); save the exported program with torch.export.save") as zf:
        budget = Budget("model", limits)
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


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget) -> object:
    try:
        return json.loads(read_member(zf, info, budget, _MAX_PT2_JSON, "model"))
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


def _scan_torch_save(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, budget: Budget) -> None:
    """Refuse example inputs (a torch.save archive) whose pickle names anything but tensors and containers."""
    with zf.open(info) as f, open_zip(f, "model", limits, f"member {info.filename!r} is not a torch.save archive") as inner:
        for member in inner.infolist():
            rel = member.filename.partition("/")[2]
            where = f"{info.filename}:{member.filename}"
            if rel == "data.pkl":
                _scan_pickle(read_member(inner, member, budget, _MAX_PICKLE, "model"), where)
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
            if op.name == "GLOBAL" and isinstance(arg, str):
                imports.add(arg.replace(" ", "."))
    except ValueError as e:
        raise InputError(f"model: {where!r} is not a valid pickle ({e}); save the exported program with torch.export.save") from e
    if refused := sorted(imports - _PICKLE_GLOBALS):
        raise InputError(f"model: {where!r} is a pickle that calls {', '.join(refused[:3])}, which a pickle of tensors "
                         "never needs; it was not loaded — save the exported program with torch.export.save")
    if odd := sorted(opcodes - _PICKLE_OPCODES):
        raise InputError(f"model: {where!r} is a pickle with opcode(s) {', '.join(odd[:3])}, which torch's weights-only "
                         "loader refuses (torch would then unpickle it in full); save it with torch.export.save's defaults")


def convert_pt2(path: Path, spec: ModelSpec, limits: Limits, mode: str) -> None:
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


def load_graph(path: Path, spec: ModelSpec) -> Classifier:
    model = Classifier(graphnet.read(path), spec.mean, spec.std).eval()
    check_outputs(model, spec)
    return model
