"""The model zoo (and custom networks from torch.export), the classifier wrapper (normalisation inside)
and the split f = h ∘ Φ.

Every stage sees images in [0,1]; `Classifier` applies the spec's mean/std itself, so one
preprocessing serves every stage (method.md, stage 1). The split into latents Φ(x) and head h
is cut out of the traced graph with torch.fx, so it works for any traceable network, and is
checked numerically: h(Φ(x)) must equal f(x).
"""

import copy
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, fx, nn

from services.method.errors import InputError

PAPER_ARCHITECTURES = ("lenet", "svhnnet", "celebanet")
OWN_ARCHITECTURES = ("smallcnn",)  # a cheap net unlike LeNet: the default black-box surrogate
CUSTOM = "custom"  # a network that comes with its weights as a torch.export program (.pt2), not from the zoo
# a module path such as layer4.1.conv2: attribute names and indices, none private or dunder (getattr would reach them)
_MODULE_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")


class ModelSpec(BaseModel):
    """What a model is: architecture, classes, input shape [C,H,W], normalisation, latent layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    num_classes: int = Field(ge=2)
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    latent_layer: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        c, h, w = self.input_shape
        if min(c, h, w) < 1 or c > 16 or max(h, w) > 1024:
            raise ValueError(f"input_shape {list(self.input_shape)} is not [C,H,W] with 1 ≤ C ≤ 16, H,W ≤ 1024")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, c):
                raise ValueError(f"{name} has {len(v)} values; give 1 or C = {c}")
            if not all(math.isfinite(x) for x in v):
                raise ValueError(f"{name} must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        layer = self.latent_layer
        if layer is not None and not (len(layer) <= 200 and _MODULE_PATH.fullmatch(layer)):
            raise ValueError(f"latent_layer {layer[:100]!r} is not a module path: give names joined by dots, "
                             "such as 'fc1' or 'layer4.1.conv2', none starting with '_'")
        if self.architecture == CUSTOM:
            if self.latent_layer is not None:
                raise ValueError("latent_layer cannot be set for a custom architecture yet; leave it out "
                                 "(the latent is the input of the last linear layer)")
        elif self.architecture not in available_architectures():
            raise ValueError(
                f"unknown architecture {self.architecture!r}; use one of {', '.join(PAPER_ARCHITECTURES + OWN_ARCHITECTURES)}, "
                f"a torchvision classification builder such as resnet18, or {CUSTOM} with a .pt2 model"
            )
        return self


def available_architectures() -> set[str]:
    """The paper's nets plus every torchvision classification builder."""
    return set(PAPER_ARCHITECTURES + OWN_ARCHITECTURES) | set(torchvision.models.list_models(module=torchvision.models))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class _TwoConv(nn.Module):
    """conv-k, ReLU, pool 2, conv-k, ReLU, pool 2, fc(hidden), ReLU, fc(classes); latents = fc2's input."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int], k: int, widths: tuple[int, int], hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], k)
        self.conv2 = nn.Conv2d(widths[0], widths[1], k)
        h, w = ((hw[0] - k + 1) // 2 - k + 1) // 2, ((hw[1] - k + 1) // 2 - k + 1) // 2
        if min(h, w) < 1:
            raise InputError(f"{type(self).__name__.lower()} needs larger inputs than {hw[0]}×{hw[1]} pixels")
        self.fc1 = nn.Linear(widths[1] * h * w, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))  # (B, hidden): the latent
        return self.fc2(x)


class LeNet(_TwoConv):
    """The paper's LeNet: conv20-5, pool, conv50-5, pool, fc500, fc(classes); latents are 500-d."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int]):
        super().__init__(num_classes, in_channels, hw, 5, (20, 50), 500)


class SmallCNN(_TwoConv):
    """conv32-3, pool, conv64-3, pool, fc128, fc(classes): about LeNet's cost, but another architecture."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int]):
        super().__init__(num_classes, in_channels, hw, 3, (32, 64), 128)


class _VGGStyle(nn.Module):
    """Conv blocks (two 3×3 convs + BN + ReLU, then max-pool), one hidden fc, then the classifier."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int], widths: tuple[int, ...], hidden: int):
        super().__init__()
        blocks, cin = [], in_channels
        for cout in widths:
            blocks.append(_conv_block(cin, cout))
            cin = cout
        self.features = nn.Sequential(*blocks)
        h, w = hw[0] >> len(widths), hw[1] >> len(widths)
        if min(h, w) < 1:
            raise InputError(f"inputs of {hw[0]}×{hw[1]} pixels are too small for {len(widths)} pooling stages")
        self.fc1 = nn.Linear(cin * h * w, hidden)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x).flatten(1)
        x = self.drop(F.relu(self.fc1(x)))  # (B, hidden): the latent
        return self.fc2(x)


class SVHNNet(_VGGStyle):
    """A VGG-style net for 32×32 digits (3 blocks of 32/64/128 channels, fc 256); ours, in the paper's spirit."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int]):
        super().__init__(num_classes, in_channels, hw, (32, 64, 128), 256)


class CelebANet(_VGGStyle):
    """A VGG-style net for 64×64 faces (4 blocks of 32…256 channels, fc 256); ours, in the paper's spirit."""

    def __init__(self, num_classes: int, in_channels: int, hw: tuple[int, int]):
        super().__init__(num_classes, in_channels, hw, (32, 64, 128, 256), 256)


class Classifier(nn.Module):
    """f: [0,1] images → logits; normalisation is the first thing it does."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    mean: Tensor
    std: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def _torchvision_net(name: str, num_classes: int, in_channels: int) -> nn.Module:
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    try:
        net = torchvision.models.get_model(name, **kwargs)
    except Exception as e:  # a builder's own complaint, passed on as an input problem
        raise InputError(f"torchvision could not build {name!r} with num_classes={num_classes}: {e}") from e
    first = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first[1].in_channels != in_channels:
        path, conv = first
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        setattr(parent, path.rpartition(".")[2], nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
            conv.dilation, conv.groups, conv.bias is not None,  # type: ignore[arg-type]  # Conv2d's own, 2-tuples
        ))
    return net


def build_net(spec: ModelSpec) -> nn.Module:
    """The bare network of a spec, randomly initialised."""
    if spec.architecture == CUSTOM:
        raise InputError("a custom architecture has no builder: its network comes from the uploaded .pt2 archive")
    c, h, w = spec.input_shape
    own = {"lenet": LeNet, "svhnnet": SVHNNet, "celebanet": CelebANet, "smallcnn": SmallCNN}
    if spec.architecture in own:
        return own[spec.architecture](spec.num_classes, c, (h, w))
    return _torchvision_net(spec.architecture, spec.num_classes, c)


def build_classifier(spec: ModelSpec, weights: dict[str, Tensor] | None = None) -> Classifier:
    """A Classifier for the spec, with the given state dict of the bare network, in eval mode."""
    model = Classifier(build_net(spec), spec.mean, spec.std)
    if weights is not None:
        load_net_weights(model, weights)
    model.eval()
    check_outputs(model, spec)
    return model


def check_outputs(model: Classifier, spec: ModelSpec) -> None:
    """Refuse a model that cannot take inputs of the spec's shape or does not give one logit per class."""
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *spec.input_shape, device=model.mean.device))
    except RuntimeError as e:
        raise InputError(f"{spec.architecture} cannot take inputs of shape {list(spec.input_shape)}: {e}") from e
    if out.shape != (2, spec.num_classes):
        raise InputError(f"{spec.architecture} gives outputs of shape {list(out.shape[1:])}, not [{spec.num_classes}]")


def load_net_weights(model: Classifier, weights: dict[str, Tensor]) -> None:
    """Load a bare network's state dict, refusing missing/extra keys, wrong shapes or dtypes and NaN/Inf."""
    own = model.net.state_dict()
    check_weight_layout(own, {k: (tuple(v.shape), v.dtype) for k, v in weights.items()})
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"weight {k} contains NaN or Inf values; upload finite weights")
    model.net.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def check_weight_layout(own: dict[str, Tensor], weights: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Refuse weights (name → shape, dtype) with keys, shapes or dtypes that do not fit the network's state dict `own`."""
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
        raise InputError(f"weights do not match the spec's architecture: {'; '.join(parts)}")
    for k, (shape, dtype) in weights.items():
        if shape != tuple(own[k].shape):
            raise InputError(f"weight {k} has shape {list(shape)} but the spec's architecture needs {list(own[k].shape)}")
        # a float tensor may come in any common float precision; a count (BatchNorm's) in any integer width;
        # bool, complex, 8-bit floats and int↔float swaps would be silently rounded into something else
        if own[k].is_floating_point():
            if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise InputError(f"weight {k} is stored as {str(dtype).removeprefix('torch.')} but the architecture "
                                 "needs floating-point values; save it as float32")
        elif dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise InputError(f"weight {k} is stored as {str(dtype).removeprefix('torch.')} but the architecture "
                             f"needs integers ({str(own[k].dtype).removeprefix('torch.')}); save it as such")


def net_weights(model: Classifier) -> dict[str, Tensor]:
    """The bare network's state dict, contiguous and detached (ready for safetensors)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.net.state_dict().items()}


def device_of(module: nn.Module | Callable) -> torch.device:
    """Where a module's parameters (or, without any, its buffers) live; the CPU for a module with neither.
    A bound method of a module (LatentSplit.head) answers for its module."""
    module = getattr(module, "__self__", module)
    assert isinstance(module, nn.Module), "a module or a bound method of one"
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode, then restore every submodule's own mode (wrappers share layers)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class LatentSplit(nn.Module):
    """f = h ∘ Φ cut at the input of one layer; latents are flattened to (B, D)."""

    def __init__(self, features: fx.GraphModule, head: fx.GraphModule, latent_shape: tuple[int, ...], layer: str):
        super().__init__()
        self.phi = features
        self.h = head
        self.latent_shape = latent_shape
        self.layer = layer

    @property
    def dim(self) -> int:
        """D, the number of latent features."""
        return math.prod(self.latent_shape)

    def features(self, x: Tensor) -> Tensor:
        """Φ(x): (B, C, H, W) → (B, D)."""
        return self.phi(x).flatten(1)

    def head(self, z: Tensor) -> Tensor:
        """h(z): (B, D) → (B, classes)."""
        return self.h(z.view(z.shape[0], *self.latent_shape))  # (B, classes)


def _find(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.name == name)


def _only_outputs_matter(node: fx.Node) -> bool:
    # an in-place op (relu_, add_) or an assert of an exported graph counts as impure to fx, and would keep the
    # other half of the network alive in each half; a classifier's ops only ever mutate their own intermediates
    return node.op in ("placeholder", "output")


def _prune(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(_only_outputs_matter)
    gm.delete_all_unused_submodules()
    gm.recompile()


def split_latents(model: Classifier, input_shape: tuple[int, int, int], layer: str | None = None) -> LatentSplit:
    """Split f at the input of `layer` (a module path of the bare net; default: the last nn.Linear called)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        raise InputError(f"the model cannot be traced to find its latents ({type(e).__name__}: {e})") from e
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    if layer is None:
        # an exported network (custom architecture) has no submodules left, only the aten ops they called
        linear = [n for n in calls if isinstance(gm.get_submodule(n.target), nn.Linear)] or [
            n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
        if not linear:
            raise InputError("the model calls no nn.Linear layer; set latent_layer to the layer whose input is the latent")
        node = linear[-1]
    else:
        found = [n for n in calls if n.target == f"net.{layer}"]
        if len(found) != 1:
            if not calls:
                raise InputError(f"latent_layer {layer!r} cannot be found: the model has no named layers (an exported "
                                 "program?); leave latent_layer unset to split at the input of the last linear layer")
            names = ", ".join(n.target.removeprefix("net.") for n in calls[-5:])
            how = "is not a layer the model calls" if not found else "is called more than once"
            raise InputError(f"latent_layer {layer!r} {how}; the last layers called are: {names}")
        node = found[0]
    latent_name = node.args[0].name

    phi = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out = next(n for n in phi.graph.nodes if n.op == "output")
    out.args = (_find(phi.graph, latent_name),)
    _prune(phi)

    head = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    inputs = [n for n in head.graph.nodes if n.op == "placeholder"]
    with head.graph.inserting_before(inputs[0]):
        z = head.graph.placeholder("latent")
    _find(head.graph, latent_name).replace_all_uses_with(z)
    head.graph.eliminate_dead_code(_only_outputs_matter)
    target = node.target.removeprefix("net.") if node.op == "call_module" else node.name
    if any(n.users for n in inputs):
        raise InputError(
            f"the output depends on more than the input of {target!r} (a skip connection around it?); "
            "choose a latent_layer that every path to the output goes through"
        )
    for n in inputs:
        head.graph.erase_node(n)
    _prune(head)
    with torch.no_grad():
        latent_shape = tuple(phi(torch.zeros(1, *input_shape, device=device_of(model))).shape[1:])
    return LatentSplit(phi, head, latent_shape, target)


def prepare(model: Classifier, spec: ModelSpec, layer: str | None = None) -> LatentSplit:
    """Split the model at its latent layer and check that h(Φ(x)) reproduces f(x) on random inputs."""
    split = split_latents(model, spec.input_shape, layer if layer is not None else spec.latent_layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, *spec.input_shape, generator=gen).to(device_of(model))
    with torch.no_grad(), eval_mode(model):
        logits = model(x)
        again = split.head(split.features(x))
    tol = 1e-4 * (1 + logits.abs().max().item())
    if not torch.allclose(logits, again, atol=tol, rtol=1e-4):
        raise InputError(f"h(Φ(x)) does not reproduce f(x) when split at {split.layer!r}; choose another latent_layer")
    return split
