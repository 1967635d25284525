"""Stage 3: the generator G: z → x, trained to minimise ‖x − G(Φ(x))‖ₚᵖ with Φ frozen (method.md, stage 3).

Presets: `mnist` mirrors the authors' MNIST generator (Linear D→50·4·4, then transposed convs
with 50 and 20 channels, sigmoid), i.e. LeNet run backwards; `generic` builds one for any C×H×W
(nearest-neighbour upsampling + 3×3 convs from a 4×4 start, channels halving from 256). `auto`
takes `mnist` for 28×28 inputs and `generic` otherwise. Training stops at the epoch or time
budget, or when the held-out reconstruction error has not improved for `patience` epochs; the
best held-out state is kept.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.method import numerics, placement
from services.method.config import GeneratorConfig
from services.method.errors import InputError
from services.method.models import device_of, eval_mode
from services.method.progress import Progress, silent


class Generator(nn.Module):
    """G: latents (B, D) → images (B, C, H, W) in [0,1]; latents are divided by their training RMS first."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], preset: str):
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.preset = preset
        self.register_buffer("scale", torch.ones(()))
        if preset == "mnist":
            self.start = (50, 4, 4)
            self.body = nn.Sequential(  # strided transposed convs: 4× fewer MACs than upsample + 5×5
                nn.ConvTranspose2d(50, 50, 6, stride=2), nn.BatchNorm2d(50), nn.ReLU(),  # 4 → 12
                nn.ConvTranspose2d(50, 20, 6, stride=2), nn.BatchNorm2d(20), nn.ReLU(),  # 12 → 28
                nn.Conv2d(20, c, 3, padding=1),
            )
        else:
            stages = max(0, math.ceil(math.log2(max(min(h, w), 4) / 4)))
            width = 256
            self.start = (width, math.ceil(h / 2**stages), math.ceil(w / 2**stages))
            layers: list[nn.Module] = []
            for _ in range(stages):
                out = max(32, width // 2)
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                width = out
            layers.append(nn.Conv2d(width, c, 3, padding=1))
            self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(latent_dim, math.prod(self.start))

    scale: Tensor

    def forward(self, z: Tensor) -> Tensor:
        x = F.relu(self.fc(z / self.scale)).view(-1, *self.start)
        x = self.body(x)[..., : self.shape[1], : self.shape[2]]  # generic: crop the upsampled grid
        return torch.sigmoid(x)  # (B, C, H, W)


def resolve_preset(preset: str, shape: tuple[int, int, int]) -> str:
    """`auto` → `mnist` for 28×28 inputs, else `generic`."""
    if preset == "auto":
        return "mnist" if shape[1:] == (28, 28) else "generic"
    if preset == "mnist" and shape[1:] != (28, 28):
        raise InputError(f"the mnist generator preset makes 28×28 images, not {shape[1]}×{shape[2]}; use generic")
    return preset


@dataclass
class GeneratorFit:
    """The trained generator's weights and how training went."""

    state: dict[str, Tensor]
    preset: str
    latent_dim: int
    shape: list[int]
    epochs: int
    stopped: str  # "patience", "time_budget" or "max_epochs"
    holdout_loss: list[float]
    holdout_index: Tensor  # rows of the training set held out for early stopping and fidelity

    def build(self) -> Generator:
        """The generator module with the trained weights, in eval mode."""
        g = Generator(self.latent_dim, tuple(self.shape), self.preset)
        g.load_state_dict(self.state)
        return g.eval()


def _loss(kind: str, pred: Tensor, x: Tensor) -> Tensor:
    return F.mse_loss(pred, x) if kind == "l2" else F.l1_loss(pred, x)


@torch.no_grad()
def _evaluate(g: Generator, z: Tensor, x: Tensor, kind: str, batch_size: int) -> float:
    dev = device_of(g)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i in range(0, len(z), batch_size):
        rows = slice(i, i + batch_size)
        zb, xb = placement.batch(z, rows, dev), placement.batch(x, rows, dev)
        total += _loss(kind, g(zb), xb) * len(zb)
    return total.item() / len(z)


def train_generator(
    z: Tensor, x: Tensor, cfg: GeneratorConfig, seed: int, progress: Progress = silent, device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> GeneratorFit:
    """Train G on (z, x) pairs: z (N, D) latents of the images x (N, C, H, W), on `device` (the weights it keeps
    are on the CPU), its steps at `precision` (numerics.training; held-out losses in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = tuple(x.shape[1:])
    preset = resolve_preset(cfg.preset, shape)
    order = torch.randperm(len(z), generator=gen)
    n_hold = max(1, int(len(z) * cfg.holdout_fraction))
    hold, train = order[:n_hold], order[n_hold:]
    device = torch.device(device)
    g = Generator(z.shape[1], shape, preset).to(device)
    g.scale.fill_(z[train].pow(2).mean().sqrt().clamp_min(1e-12))
    z, x = placement.inputs(device, z, x)
    train, hold = train.to(z.device), hold.to(z.device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr)
    best, best_state, since_best, history = float("inf"), None, 0, []
    started, stopped, epoch = time.perf_counter(), "max_epochs", 0
    for epoch in range(1, cfg.max_epochs + 1):
        g.train()
        perm = train[torch.randperm(len(train), generator=gen).to(train.device)]
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            zb, xb = placement.batch(z, idx, device), placement.batch(x, idx, device)
            with numerics.training(precision, device):
                loss = _loss(cfg.loss, g(zb).float(), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        g.eval()
        held = _evaluate(g, z[hold], x[hold], cfg.loss, 1024)
        history.append(held)
        if held < best * (1 - 1e-3):
            best, best_state, since_best = held, {k: v.detach().cpu().clone() for k, v in g.state_dict().items()}, 0
        else:
            since_best += 1
        elapsed = time.perf_counter() - started
        progress("generator", min(1.0, max(epoch / cfg.max_epochs, elapsed / cfg.time_budget_s)), {"holdout_loss": held})
        if since_best >= cfg.patience:
            stopped = "patience"
            break
        if elapsed >= cfg.time_budget_s:
            stopped = "time_budget"
            break
    return GeneratorFit(best_state, preset, z.shape[1], list(shape), epoch, stopped, history, hold.cpu())


@torch.no_grad()
def fidelity(g: Generator, classifier: nn.Module, z: Tensor, x: Tensor, y: Tensor, x_train: Tensor) -> dict[str, float]:
    """Held-out reconstruction MSE, the MSE of predicting the mean training image, and f's accuracy on G(z)."""
    g_dev, f_dev = device_of(g), device_of(classifier)
    recon = torch.cat([g(z[i : i + 1024].to(g_dev)).cpu() for i in range(0, len(z), 1024)])
    with eval_mode(classifier):
        acc = (classifier(recon.to(f_dev)).argmax(1).cpu() == y).float().mean().item()
        clean = (classifier(x.to(f_dev)).argmax(1).cpu() == y).float().mean().item()
    return {
        "reconstruction_mse": F.mse_loss(recon, x).item(),
        "mean_image_mse": F.mse_loss(x_train.mean(0, keepdim=True).expand_as(x), x).item(),
        "reconstruction_accuracy": acc,
        "clean_accuracy": clean,
        "n": len(z),
    }
