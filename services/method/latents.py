"""Stage 1: latents z = Φ(x), the input of the classifier's last linear layer (method.md, stage 1)."""

import torch
from torch import Tensor

from services.method import placement
from services.method.models import LatentSplit, eval_mode
from services.method.progress import Progress, silent


@torch.no_grad()
def extract_latents(split: LatentSplit, x: Tensor, batch_size: int = 512, progress: Progress = silent) -> Tensor:
    """Φ(x) for every image, in eval mode, batched; x: (N, C, H, W) in [0,1] → (N, D)."""
    device = next(split.parameters()).device
    (x,) = placement.inputs(device, x)
    out = placement.Gather(device)
    with eval_mode(split):
        for i in range(0, len(x), batch_size):
            out.add(split.features(placement.batch(x, slice(i, i + batch_size), device)))
            progress("latents", min(1.0, (i + batch_size) / len(x)), {})
    return out.result()
