"""Load a custom model (a torch.export archive, .pt2) and try it, in a child process under limits.

`python -m services.pt2check PATH SPEC_JSON MEMORY_BYTES` caps its own address space, loads the
archive, runs the network on random batches of the spec's shape, splits it into latents and head
and takes one gradient step's backward pass; it prints one JSON line, `{}` or `{"error": message}`.
The parent (services.uploads) has already refused, without loading anything, every archive that
holds native code, non-tensor pickles or Python snippets; this process is the second wall.
"""

import json
import math
import operator
import resource
import sys
from pathlib import Path

import torch
from torch import fx

from services.errors import InputError
from services.method.models import Classifier, ModelSpec, exported_classifier, prepare

OPERATOR_NAMESPACES = ("aten", "prims")
HIGHER_ORDER_OPS = ("cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast")
SYMBOLIC_OPS = (  # what an exported graph computes on symbolic sizes (a dynamic batch)
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.neg, operator.pos, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, math.trunc, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min,
    torch.sym_not, torch.sym_ite, torch.sym_sqrt,
)


def _is_operator(target: object) -> bool:
    """Whether a graph node's target is a PyTorch operator (or size arithmetic), not arbitrary Python."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in OPERATOR_NAMESPACES
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name() in HIGHER_ORDER_OPS
    return any(target is op for op in SYMBOLIC_OPS)


def load_exported(path: Path, spec: ModelSpec) -> Classifier:
    """The classifier of a .pt2 archive that passed the upload scan; refuses graphs that call anything but operators."""
    try:
        with path.open("rb") as f:  # a file object: stored uploads have no .pt2 suffix
            program = torch.export.load(f)
    except Exception as e:  # deserialising an untrusted archive fails in many ways; each is an input problem
        raise InputError(f"model: the .pt2 archive cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                         f"save it with torch.export.save (torch {torch.__version__.split('+')[0]})") from e
    for module in program.graph_module.modules():
        for node in module.graph.nodes if isinstance(module, fx.GraphModule) else ():
            if node.op == "call_function" and not _is_operator(node.target):
                raise InputError(f"model: the exported graph calls {node.target!r}, which is not a PyTorch operator; "
                                 "export a network built from torch operations only")
    return exported_classifier(program, spec)


def trial(model: Classifier, spec: ModelSpec) -> None:
    """Refuse a model the method cannot use: fixed batch size, random outputs, no latent split, no gradients."""
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.rand(batch, *spec.input_shape, generator=gen)
        try:
            with torch.no_grad():
                out, again = model(x), model(x)
        except Exception as e:  # a graph specialised to its example batch fails in kernels, views or asserts
            raise InputError(
                f"model: the .pt2 network fails on a batch of {batch} ({type(e).__name__}: {_first_line(e)}); export it "
                "with a dynamic batch size: dynamic_shapes=({0: torch.export.Dim('batch')},)") from e
        if out.shape != (batch, spec.num_classes):
            raise InputError(f"model: the .pt2 network gives outputs of shape {list(out.shape)} for a batch of {batch}, "
                             f"not [{batch}, {spec.num_classes}]; export it with a dynamic batch size")
        if not torch.isfinite(out).all():
            raise InputError("model: the .pt2 network gives NaN or Inf outputs on random inputs; upload finite weights")
        if not torch.allclose(out, again, rtol=1e-5, atol=1e-6):
            raise InputError("model: the .pt2 network gives different outputs for the same input (dropout?); "
                             "call model.eval() before torch.export.export")
    prepare(model, spec)
    model.train()
    model(x).logsumexp(1).mean().backward()
    if not any(p.grad is not None for p in model.parameters()):
        raise InputError("model: the .pt2 network has no trainable parameters; export the module itself, "
                         "not a function of frozen constants")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def main(argv: list[str]) -> int:
    """Entry point of the child process: load, try, print one JSON line."""
    path, spec_json, memory = argv
    # set here rather than in a preexec_fn, which is unsafe in the API's threaded process; torch is already
    # imported (trusted code), so the cap bounds what loading and running the archive may add
    resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    torch.set_num_threads(1)
    try:
        spec = ModelSpec.model_validate_json(spec_json)
        trial(load_exported(Path(path), spec), spec)
        result = {}
    except InputError as e:
        result = {"error": str(e)}
    except MemoryError:
        result = {"error": f"model: the .pt2 network needs more than {int(memory) >> 20} MiB of memory to load and run"}
    except Exception as e:  # noqa: BLE001 (the archive's own failure, reported as an input problem)
        result = {"error": f"model: the .pt2 network could not be loaded and run ({type(e).__name__}: {_first_line(e)})"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
