"""Condition encoders of BUSGen (§4.3.1): pathology, device and lesion boxes → one embedding.

The embedding is added to the UNet's timestep embedding, so every residual block
sees it (the reference code sums its condition projection into every block too).
Classifier-free guidance needs an unconditional model ε_θ(x_t, t) next to the
conditional ε_θ(x_t, t, c) (eq. 2); as in DiT's LabelEmbedder, the condition
dropout that trains it lives here, inside the encoder, so no training loop has
to know about it:

* pathology → index 0 (null), device → index 0 (null),
* box embedding → a learned null token, box-mask channel → zeros.

By default all conditions of a sample are dropped together with probability
p = 0.1 (the reference); `independent_drop` draws one coin per condition.
`force_drop` lets a sampler ask for the unconditional branch explicitly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from busgen_lib.data.schema import PATHOLOGIES

BOX_MODES = ("mask", "embedding", "both")


# --------------------------------------------------------------------------- boxes

def sinusoidal_box_features(boxes: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """Fourier features of relative boxes (..., 4) → (..., 4 · 2 · num_freqs).

    Each coordinate c ∈ [0, 1] becomes (sin(2^k π c), cos(2^k π c)) for k < num_freqs:
    the positional embedding of boxes that the paper describes (§4.3.1).
    """
    freqs = (2.0 ** torch.arange(num_freqs, dtype=boxes.dtype, device=boxes.device)) * math.pi
    angles = boxes[..., None] * freqs  # (..., 4, F)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class BoxEmbedding(nn.Module):
    """Sum over the valid boxes of MLP(sinusoidal features); a learned null token when none is valid.

    Summing (not averaging) keeps the number of lesions in the embedding. Padding
    slots never contribute, whatever coordinates they hold.
    """

    def __init__(self, dim: int, num_freqs: int = 8):
        super().__init__()
        self.num_freqs = num_freqs
        self.mlp = nn.Sequential(nn.Linear(8 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, boxes: torch.Tensor, box_valid: torch.Tensor) -> torch.Tensor:
        h = self.mlp(sinusoidal_box_features(boxes, self.num_freqs))  # (B, K, D)
        pooled = torch.where(box_valid[..., None], h, 0.0).sum(dim=1)
        return torch.where(box_valid.any(dim=1, keepdim=True), pooled, self.null.to(pooled.dtype))


# --------------------------------------------------------------------------- all conditions

class ConditionEncoder(nn.Module):
    """(pathology, device, boxes) → an embedding of width `emb_dim`, with CFG dropout inside.

    e = MLP(E_path[pathology] + E_dev[device] + E_box(boxes)); the box term is
    present only in box modes "embedding" and "both". The box-mask channel (modes
    "mask" and "both") is dropped here as well and returned for the UNet input.
    """

    def __init__(
        self,
        emb_dim: int,
        num_devices: int,
        cond_dim: int,
        box_mode: str = "mask",
        p_uncond: float = 0.1,
        independent_drop: bool = False,
        box_freqs: int = 8,
    ):
        super().__init__()
        if box_mode not in BOX_MODES:
            raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        self.box_mode = box_mode
        self.p_uncond = p_uncond
        self.independent_drop = independent_drop
        self.pathology = nn.Embedding(len(PATHOLOGIES) + 1, cond_dim)  # 0: null, then PATHOLOGIES order
        self.device_embedding = nn.Embedding(num_devices + 1, cond_dim)
        self.boxes = BoxEmbedding(cond_dim, box_freqs) if box_mode in ("embedding", "both") else None
        self.proj = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    @property
    def uses_mask(self) -> bool:
        return self.box_mode in ("mask", "both")

    def drop_masks(self, batch: int, device: torch.device, force_drop: torch.Tensor | None) -> torch.Tensor:
        """(3, B) bool: which samples lose their pathology, device and box condition.

        Training draws them (jointly, or per condition); `force_drop` adds the
        samples the caller wants unconditional, in training and evaluation alike.
        """
        if self.training and self.p_uncond > 0:
            if self.independent_drop:
                drop = torch.rand(3, batch, device=device) < self.p_uncond
            else:
                drop = (torch.rand(batch, device=device) < self.p_uncond).expand(3, batch)
        else:
            drop = torch.zeros(3, batch, dtype=torch.bool, device=device)
        if force_drop is not None:
            drop = drop | force_drop.to(device=device, dtype=torch.bool)[None]
        return drop

    def forward(
        self,
        pathology: torch.Tensor,
        device: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
        box_mask: torch.Tensor | None,
        force_drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (embedding (B, emb_dim), box-mask channel (B, 1, H, W) or None when unused)."""
        drop = self.drop_masks(pathology.shape[0], pathology.device, force_drop)
        pathology = torch.where(drop[0], 0, pathology)
        device = torch.where(drop[1], 0, device)
        e = self.pathology(pathology) + self.device_embedding(device)
        if self.boxes is not None:
            e = e + self.boxes(boxes, box_valid & ~drop[2, :, None])
        mask = None
        if self.uses_mask:
            mask = torch.where(drop[2, :, None, None, None], 0.0, box_mask).to(box_mask.dtype)
        return self.proj(e), mask
