"""Stage 1: latents z = Φ(x), the input of the classifier's last linear layer (method.md, stage 1)."""

import torch
from torch import Tensor

from services.method.models import LatentSplit, eval_mode
from services.method.progress import Progress, silent


@torch.no_grad()
def extract_latents(split: LatentSplit, x: Tensor, batch_size: int = 512, progress: Progress = silent) -> Tensor:
    """Φ(x) for every image, in eval mode, batched; x: (N, C, H, W) in [0,1] → (N, D)."""
    device = next(split.parameters()).device
    out = []
    with eval_mode(split):
        for i in range(0, len(x), batch_size):
            out.append(split.features(x[i : i + batch_size].to(device)).cpu())
            progress("latents", min(1.0, (i + batch_size) / len(x)), {})
    return torch.cat(out)
