"""The sandboxed child that deserialises an uploaded torch.export archive (.pt2); run by services.sandbox only.

`python -m services.pt2check MODE IN_FD OUT_FD SPEC_JSON MEMORY_BYTES CPU_S` caps its own memory, CPU
time, processes, open files and file sizes, reads the archive from descriptor IN_FD, loads it with
torch.export.load, turns its graph into the allow-listed form of services.method.graphnet, rebuilds
the network from that form as the worker will, and writes the form to descriptor OUT_FD. MODE `check`
also tries the network (random batches of the spec's shape, the latent split, one backward pass);
MODE `convert` does not. It prints one JSON line, `{}` or `{"error": message}`. The parent has already refused every
archive whose names are not plain identifiers or whose members hold native code, non-tensor pickles or
Python snippets (services.pt2scan); this process is the second wall, and the sandbox the third.
"""

import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import IO

import torch

from services.errors import InputError
from services.method import graphnet
from services.method.models import Classifier, ModelSpec, check_outputs, prepare


def load_program(f: IO[bytes]) -> torch.export.ExportedProgram:
    """The exported program of an archive that passed the upload scan (graphnet.encode then checks every call)."""
    try:
        program = torch.export.load(f)
    except Exception as e:  # deserialising an untrusted archive fails in many ways; each is an input problem
        raise InputError(f"model: the .pt2 archive cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                         f"save it with torch.export.save (torch {torch.__version__.split('+')[0]})") from e
    return program


def rebuilt(program: torch.export.ExportedProgram, spec: ModelSpec) -> tuple[Classifier, bytes]:
    """The classifier the worker will get (through the graphnet form and back), and that form's bytes."""
    graph, tensors = graphnet.encode(program)
    data = graphnet.to_bytes(graph, tensors)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        tmp.write(data)
        tmp.flush()
        net = graphnet.read(Path(tmp.name))
    model = Classifier(net, spec.mean, spec.std).eval()
    check_outputs(model, spec)
    return model, data


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


def limit(memory: int, cpu_s: int) -> None:
    """Cap this process: address space, CPU seconds, processes/threads, open files, file size, no core dumps."""
    # set here rather than in a preexec_fn, which is unsafe in the API's threaded process; torch is already
    # imported (trusted code), so the caps bound what loading and running the archive may add
    for what, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_NPROC, 64),
                        (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_FSIZE, min(memory, 4 << 30)),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))


def main(argv: list[str]) -> int:
    """Entry point of the sandboxed child: load, convert or try, print one JSON line."""
    mode, in_fd, out_fd, spec_json, memory, cpu_s = argv
    limit(int(memory), int(cpu_s))
    torch.set_num_threads(1)
    try:
        spec = ModelSpec.model_validate_json(spec_json)
        with os.fdopen(int(in_fd), "rb") as f:
            program = load_program(f)
        model, data = rebuilt(program, spec)
        if mode == "check":
            trial(model, spec)
        with os.fdopen(int(out_fd), "wb") as out:
            out.write(data)
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
