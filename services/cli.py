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

from services.admin import cmd_jobs_resume, cmd_keys, cmd_keys_list, cmd_keys_revoke, cmd_migrate, cmd_serve, cmd_worker
from services.bounds import check_bounds
from services.checkpoints import DirectoryStore, atomic_write, inputs_digest
from services.datasets import channels_first, conform, load_npz, mnist5k, mnist_idx, save_npz
from services.errors import InputError, one_line
from services.method.config import LadderConfig
from services.method.data import ImageData, require_every_class, stratified_split
from services.method.finetune import accuracy, fit
from services.method.harden import harden
from services.method.models import ModelSpec, build_classifier, device_of, net_weights
from services.method.pipeline import split_inputs
from services.method.stages import STAGES

BUILTIN_DATA = {"mnist5k": mnist5k}
console = Console(stderr=True)


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
        raise InputError(one_line(e, f"spec {path}")) from e


def load_config(path: Path | None) -> LadderConfig:
    """The method configuration from a JSON file, or the defaults."""
    if path is None:
        return LadderConfig()
    try:
        return LadderConfig.model_validate(_read_json(path, "config"))
    except ValidationError as e:
        raise InputError(one_line(e, f"config {path}")) from e


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
        h.update(hashlib.sha256(p.contiguous().numpy().data if isinstance(p, torch.Tensor) else p).digest())
    return h.hexdigest()


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
        if metric:
            self.progress.update(task, visible=True, completed=fraction, metric=metric)
        else:
            self.progress.update(task, visible=True, completed=fraction)


def cmd_train(args: argparse.Namespace) -> None:
    """Train a vanilla classifier (the paper's recipe: SGD lr 0.01, momentum 0.5, batch 64)."""
    if not 0 <= args.validation_fraction < 0.5:  # before any data is read
        raise InputError(f"--validation-fraction {args.validation_fraction:g} is outside [0, 0.5)")
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
        raise InputError(one_line(e, "model spec")) from e
    train = conform(train, spec.input_shape, num_classes, "training data")
    test = conform(test, spec.input_shape, num_classes, "test data")
    val = None
    if args.validation_fraction:  # kept from training: the rows a hardening job can judge clean accuracy on
        train, val = stratified_split(train, args.validation_fraction, args.seed)
        require_every_class(val, num_classes, 1, "the validation split (--validation-fraction)")
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
    if val is not None:
        save_npz(val, out / "validation.npz")
    (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    atomic_write(out / "model.safetensors", lambda p: save_file(net_weights(model), str(p)))
    print(f"{spec.architecture}: test accuracy {accuracy(model, test.x, test.y):.4f} on {len(test)} images")
    print(f"wrote {out}/model.safetensors, spec.json, train.npz, test.npz" + (", validation.npz" if val is not None else ""))


def _write_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda p: save_file(weights, str(p)))


def cmd_harden(args: argparse.Namespace) -> None:
    """Harden a model with LADDER and write the hardened weights and the report."""
    spec = load_spec(Path(args.spec))
    config = load_config(Path(args.config) if args.config else None)
    check_bounds(config)  # the LADDER_MAX_* settings, as a submission is checked
    weights = load_weights(Path(args.model))
    from services.devices import resolve
    from services.environment import environment
    from services.method import placement
    from services.report import page
    from services.settings import get_settings

    device = resolve(args.device or get_settings().device)
    placement.set_share(get_settings().gpu_data_share)
    model = build_classifier(spec, weights).to(device)
    train = conform(load_data(args.train, "training data"), spec.input_shape, spec.num_classes, "training data")
    test = conform(load_data(args.test, "test data", "t10k"), spec.input_shape, spec.num_classes, "test data") if args.test else None
    train, test = split_inputs(train, test, config, spec.num_classes)
    val = (conform(load_data(args.validation, "validation data"), spec.input_shape, spec.num_classes, "validation data")
           if args.validation else None)
    out = Path(args.out)
    key = inputs_digest(spec, config, [  # the job's stage key, from the data after its splits
        _digest(Path(args.model).read_bytes()), _digest(train.x, train.y), _digest(test.x, test.y),
        None if val is None else _digest(val.x, val.y)])[:16]
    store = DirectoryStore(out / "stages" / key)
    bars = _Bars(STAGES)
    with bars.progress:
        result = harden(model, spec, train, test, config, store, bars, val, environment(device_of(model)))
    html = page(result.report, result.gallery)
    models_dir = out / "models"
    models_dir.mkdir(exist_ok=True)
    for name, m in result.models.items():
        if name != "vanilla":
            _write_weights(models_dir / f"{name}.safetensors", net_weights(m))
    _write_weights(out / "hardened.safetensors", net_weights(result.models["ladder"]))
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(result.report, indent=2) + "\n"))
    if html is not None:
        atomic_write(out / "report.html", lambda p: p.write_text(html, encoding="utf-8"))
    print_summary(result.report)
    wrote = f" and {out}/report.html" if html is not None else " (no report.html: its rendering failed, see above)"
    print(f"wrote {out}/hardened.safetensors, {out}/report.json{wrote}")
    print("computed on " + ", ".join(f"{k} {v}" for k, v in result.report["device"].items() if v))


def cmd_submit(args: argparse.Namespace) -> None:
    """Upload a job to a server, follow it, download the hardened model and the report."""
    from services.client import Client, ClientError

    client = Client(args.server, args.key)
    opt = lambda p: Path(p) if p else None  # noqa: E731
    try:
        job = client.submit(Path(args.model), Path(args.spec), Path(args.train), opt(args.test), opt(args.config),
                            args.idempotency_key, opt(args.validation))
        console.print(f"job {job['id']} {job['status']}")
        job = client.wait(job["id"], args.poll, console)
        if job["status"] != "succeeded":
            err = job["error"] or {"code": job["status"], "message": "canceled"}
            raise ClientError(f"job {job['id']} {job['status']}: {err['code']}: {err['message']}")
        model, report, page = client.download(job["id"], Path(args.out))
    except ClientError as e:
        raise InputError(str(e)) from e
    print_summary(json.loads(report.read_text()))
    print(f"wrote {model}, {report}" + (f" and {page}" if page else " (the job has no report page)"))


def print_summary(report: dict) -> None:
    """A before/after table per setting: clean, attack and worst-case accuracies and the average rank."""
    models = report["models"]
    for setting in report.get("evaluation", {}).get("settings", ["whitebox", "blackbox"]):
        attacks = list(next(iter(models.values()))["attacks"].get(setting, {}))
        header = [setting, "clean", *attacks, "worst", "rank"]
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        rank = report.get("average_rank", {}).get(setting, {})
        rows = [[name, pct(m["clean_accuracy"]),
                 *("–" if m.get("trained_on") == a else pct(m["attacks"][setting][a]["accuracy"]) for a in attacks),
                 pct(m.get("worst_case", {}).get(setting, {}).get("accuracy")),
                 "n/a" if rank.get(name) is None else f"{rank[name]:.2f}"] for name, m in models.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print()
    sel = report.get("selection")
    if sel:
        chosen = ", ".join(f"{name} {'the uploaded weights' if m['uploaded_weights'] else 'epoch ' + str(m['chosen_epoch'])}"
                           for name, m in sel["models"].items())
        held = "held on the test points" if sel["budget_held_on_test"] else "did NOT hold on the test points for " + \
            ", ".join(k for k, t in sel["on_test"].items() if not t["within_budget"])
        print(f"checkpoints (best {sel['objective']} within {sel['max_clean_drop_points']:g} points of clean accuracy on "
              f"validation): {chosen}; the budget {held}")
        if sel["validation"].get("source") != "uploaded":
            print("validation: a split of the training data; if the uploaded model trained on it, the budget is stricter "
                  "than on unseen data (send validation data the model never saw: --validation)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ladder` console script."""
    parser = argparse.ArgumentParser(prog="ladder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a vanilla classifier to harden")
    t.add_argument("--architecture", default="lenet")
    t.add_argument("--data", default="mnist5k", help="mnist5k, a folder of MNIST IDX files, or an .npz with x and y")
    t.add_argument("--test", help="test data (default: the IDX folder's t10k split, else a stratified 20%% hold-out)")
    t.add_argument("--validation-fraction", type=float, default=0.0,
                   help="of the training data, stratified, not trained on: written as validation.npz for harden "
                        "--validation (default 0: none)")
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
    h.add_argument("--validation", help="data to choose checkpoints on (.npz; rows the model never trained on), with "
                                        "select.max_clean_drop; default: a stratified split of the training data")
    h.add_argument("--config", help="method configuration (JSON); default: the paper's settings")
    h.add_argument("--out", required=True)
    h.add_argument("--device", help="auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N; default LADDER_DEVICE")
    h.set_defaults(run=cmd_harden)
    s = sub.add_parser("serve", help="run the HTTP API (embedded by default: SQLite and an in-process worker)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, default=1, help="API processes (not with the embedded default)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(run=cmd_serve)
    w = sub.add_parser("worker", help="run a Celery worker on LADDER_DEVICE (needs LADDER_BROKER_URL and LADDER_DATABASE_URL)")
    w.add_argument("--name", default="ladder@%h")
    w.add_argument("--log-level", default="info")
    w.add_argument("--gpus", help="one worker per GPU, e.g. 0,1: each sees only its own GPU and is named ladder-gpu<N>@host")
    w.set_defaults(run=cmd_worker)
    m = sub.add_parser("migrate", help="bring the configured database to the newest schema")
    m.add_argument("--revision", default="head")
    m.set_defaults(run=cmd_migrate)
    k = sub.add_parser("keys", help="API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant and print it")
    kc.add_argument("--tenant", required=True)
    kc.set_defaults(run=cmd_keys)
    kl = ksub.add_parser("list", help="list keys: prefix, tenant, created, revoked (never the keys themselves)")
    kl.add_argument("--tenant", help="only this tenant's keys")
    kl.set_defaults(run=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key by the prefix `keys list` shows (or the whole key)")
    kr.add_argument("prefix", metavar="PREFIX")
    kr.set_defaults(run=cmd_keys_revoke)
    j = sub.add_parser("jobs", help="jobs (operators)")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    jr = jsub.add_parser("resume", help="queue again jobs failed by the infrastructure (storage_full, ...), from their kept stages")
    jr.add_argument("ids", nargs="*", metavar="ID")
    jr.add_argument("--all", action="store_true", help="every job that failed with storage_full, storage_unavailable, ...")
    jr.set_defaults(run=cmd_jobs_resume)
    u = sub.add_parser("submit", help="submit a job to a server, follow it and download the results")
    u.add_argument("--server", default="http://127.0.0.1:8000")
    u.add_argument("--key", required=True, help="API key (ladder keys create, or the one `ladder serve` printed)")
    u.add_argument("--model", required=True)
    u.add_argument("--spec", required=True)
    u.add_argument("--train", required=True)
    u.add_argument("--test")
    u.add_argument("--validation", help="validation_data: the data checkpoints are chosen on (see harden --validation)")
    u.add_argument("--config")
    u.add_argument("--idempotency-key")
    u.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    u.add_argument("--out", required=True)
    u.set_defaults(run=cmd_submit)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except InputError as e:
        print(f"ladder: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # the LADDER_* settings (a config file's errors are InputErrors)
        print(f"ladder: error: {one_line(e, 'settings')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
