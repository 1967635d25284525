"""The `ladder` command: train a vanilla model on built-in or given data, and harden a model with LADDER."""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import services
from services.checkpoints import DirectoryStore, atomic_write
from services.datasets import (
    ImageData, channels_first, conform, load_npz, mnist5k, mnist_idx, require_every_class, save_npz, stratified_split,
)
from services.errors import InputError
from services.method.config import LadderConfig
from services.method.finetune import accuracy, fit
from services.method.models import ModelSpec, build_classifier, net_weights
from services.method.pipeline import STAGE_SCHEMA, STAGES, harden

BUILTIN_DATA = {"mnist5k": mnist5k}
console = Console(stderr=True)


def _one_line(e: ValidationError, what: str) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{what}: {where}: {first['msg']}{more}"


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InputError(f"{what} {path} must hold a JSON object")
    return value


def load_spec(path: Path) -> ModelSpec:
    """A ModelSpec from a JSON file, refusing bad fields in one line."""
    try:
        return ModelSpec.model_validate(_read_json(path, "spec"))
    except ValidationError as e:
        raise InputError(_one_line(e, f"spec {path}")) from e


def load_config(path: Path | None) -> LadderConfig:
    """The method configuration from a JSON file, or the defaults."""
    if path is None:
        return LadderConfig()
    try:
        return LadderConfig.model_validate(_read_json(path, "config"))
    except ValidationError as e:
        raise InputError(_one_line(e, f"config {path}")) from e


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (never a pickle)."""
    try:
        return load_file(str(path))
    except FileNotFoundError as e:
        raise InputError(f"model weights {path} not found") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"model weights {path} are not a valid safetensors file ({e}); save them with safetensors.torch.save_file") from e


def load_data(source: str, what: str, split: str = "train") -> ImageData:
    """Built-in data by name, a folder of MNIST IDX files (its `train` or `t10k` split), or an .npz file."""
    if source in BUILTIN_DATA:
        return BUILTIN_DATA[source]()
    path = Path(source)
    if path.is_dir():
        return mnist_idx(path, split)
    if not path.exists():
        raise InputError(f"{what} {source} not found; give an .npz file, a folder of MNIST IDX files or one of: {', '.join(BUILTIN_DATA)}")
    return load_npz(path, f"{what} {source}")


def _digest(*parts: bytes | torch.Tensor) -> str:
    h = hashlib.sha256()
    for p in parts:  # tensors are hashed through their buffer, without a copy
        h.update(hashlib.sha256(p.contiguous().numpy() if isinstance(p, torch.Tensor) else p).digest())
    return h.hexdigest()[:16]


class _Bars:
    """Rich progress bars, one per stage, fed by the method's progress callback."""

    def __init__(self, stages: tuple[str, ...]):
        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TextColumn("{task.fields[metric]}"), TimeElapsedColumn(), console=console)
        self.tasks = {s: self.progress.add_task(s, total=1.0, metric="", start=False, visible=False) for s in stages}

    def __call__(self, stage: str, fraction: float, metrics: dict[str, float]) -> None:
        task = self.tasks.get(stage)
        if task is None:
            return
        self.progress.start_task(task)  # a bar shows once its stage reports: an early refusal prints one line
        metric = " ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:2])
        self.progress.update(task, visible=True, completed=fraction, **({"metric": metric} if metric else {}))


def cmd_train(args: argparse.Namespace) -> None:
    """Train a vanilla classifier (the paper's recipe: SGD lr 0.01, momentum 0.5, batch 64)."""
    data = load_data(args.data, "training data")
    if args.test or (args.data not in BUILTIN_DATA and Path(args.data).is_dir()):
        train, test = data, load_data(args.test or args.data, "test data", "t10k")
    else:
        train, test = stratified_split(data, 0.2, args.seed)
    train = channels_first(train)
    num_classes = int(train.y.max()) + 1
    try:
        spec = ModelSpec(
            architecture=args.architecture, num_classes=num_classes, input_shape=tuple(train.x.shape[1:]),
            mean=train.x.mean((0, 2, 3)).tolist(), std=train.x.std((0, 2, 3)).clamp_min(1e-3).tolist(),
        )
    except ValidationError as e:
        raise InputError(_one_line(e, "model spec")) from e
    train = conform(train, spec.input_shape, num_classes, "training data")
    test = conform(test, spec.input_shape, num_classes, "test data")
    torch.manual_seed(args.seed)
    model = build_classifier(spec)
    bars = _Bars(("train",))
    with bars.progress:
        fit(model, train.x, train.y, epochs=args.epochs, lr=args.lr, momentum=0.5, batch_size=64, seed=args.seed,
            stage="train", progress=bars)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_npz(train, out / "train.npz")
    save_npz(test, out / "test.npz")
    (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    atomic_write(out / "model.safetensors", lambda p: save_file(net_weights(model), str(p)))
    print(f"{spec.architecture}: test accuracy {accuracy(model, test.x, test.y):.4f} on {len(test)} images")
    print(f"wrote {out}/model.safetensors, spec.json, train.npz, test.npz")


def cmd_harden(args: argparse.Namespace) -> None:
    """Harden a model with LADDER and write the hardened weights and the report."""
    spec = load_spec(Path(args.spec))
    config = load_config(Path(args.config) if args.config else None)
    weights = load_weights(Path(args.model))
    model = build_classifier(spec, weights)
    train = conform(load_data(args.train, "training data"), spec.input_shape, spec.num_classes, "training data")
    if args.test:
        test = conform(load_data(args.test, "test data", "t10k"), spec.input_shape, spec.num_classes, "test data")
    else:
        train, test = stratified_split(train, config.test_fraction, config.seed)
    require_every_class(train, spec.num_classes, 3, "training data")
    if len(test) == 0:
        raise InputError("the test split is empty; give --test data or a larger test_fraction in the config")
    out = Path(args.out)
    key = _digest(  # stored stages are reused only for the same code, inputs and configuration
        f"{services.__version__}/{STAGE_SCHEMA}".encode(), Path(args.model).read_bytes(), spec.model_dump_json().encode(),
        config.model_dump_json().encode(), train.x, train.y, test.x, test.y,
    )
    store = DirectoryStore(out / "stages" / key)
    bars = _Bars(STAGES)
    with bars.progress:
        result = harden(model, spec, train, test, config, store, bars)
    models_dir = out / "models"
    models_dir.mkdir(exist_ok=True)
    for name, m in result.models.items():
        if name != "vanilla":
            atomic_write(models_dir / f"{name}.safetensors", lambda p, m=m: save_file(net_weights(m), str(p)))
    atomic_write(out / "hardened.safetensors", lambda p: save_file(net_weights(result.models["ladder"]), str(p)))
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(result.report, indent=2) + "\n"))
    print_summary(result.report)
    print(f"wrote {out}/hardened.safetensors and {out}/report.json")


def print_summary(report: dict) -> None:
    """A before/after table: clean and attack accuracies per model."""
    models = report["models"]
    cols = [(s, a) for s in ("whitebox", "blackbox") for a in next(iter(models.values()))["attacks"][s]]
    header = ["model", "clean"] + [f"{s[:5]}-{a}" for s, a in cols]
    rows = [[name, f"{m['clean_accuracy']:.4f}"] + [f"{m['attacks'][s][a]['accuracy']:.4f}" for s, a in cols]
            for name, m in models.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ladder` console script."""
    parser = argparse.ArgumentParser(prog="ladder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a vanilla classifier to harden")
    t.add_argument("--architecture", default="lenet")
    t.add_argument("--data", default="mnist5k", help="mnist5k, a folder of MNIST IDX files, or an .npz with x and y")
    t.add_argument("--test", help="test data (default: the IDX folder's t10k split, else a stratified 20%% hold-out)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(run=cmd_train)
    h = sub.add_parser("harden", help="harden a model with LADDER")
    h.add_argument("--model", required=True, help="weights of the bare network (safetensors)")
    h.add_argument("--spec", required=True, help="model spec (JSON)")
    h.add_argument("--train", required=True, help="training data (.npz or mnist5k)")
    h.add_argument("--test", help="test data (.npz); default: a stratified hold-out of the training data")
    h.add_argument("--config", help="method configuration (JSON); default: the paper's settings")
    h.add_argument("--out", required=True)
    h.set_defaults(run=cmd_harden)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except InputError as e:
        print(f"ladder: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
