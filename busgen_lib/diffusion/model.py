"""The conditional ε-prediction UNet of BUSGen (§4.3.1) and its sizes per run profile.

The network is diffusers' `UNet2DModel`; what is ours is the condition encoder
(`conditions.py`) and the glue: the condition embedding enters through
`class_embed_type="identity"`, which adds it to the timestep embedding (see
`UNet2DModel.forward`: `emb = emb + class_embedding(class_labels)`), and that
sum is projected into every `ResnetBlock2D` — the reference's "conditions summed
into every residual block". The box mask is an extra input channel.

Reference architecture → diffusers (paper profile):

| reference                                   | here                                        |
|---------------------------------------------|---------------------------------------------|
| 128 channels × (1, 2, 2, 2), 2 res blocks   | block_out_channels (128, 256, 256, 256), layers_per_block 2 |
| self-attention after every encoder block, one head | AttnDownBlock2D at every level, attention_head_dim None (one head) |
| middle: res+attn, res                       | UNetMidBlock2D (res, attn, res)             |
| decoder: 3 res blocks per level, no attention | UpBlock2D-family (3 resnets per level)    |
| learned 5×5 strided / transposed resampling | learned resampling resnet blocks (`resample="resnet"`) |
| separate time and condition projections per block (2·tdim·C) | FiLM scale-shift projection per block (tdim·2C) |

The last two rows bring the paper network to 43.6M parameters (encoders
included) against the reference's ≈48M, of which its 5×5 resampling convolutions
hold ≈8.6M; a plain diffusers UNet of the same widths has 36.1M. Like the
reference, the paper network attends at full resolution (160² tokens, one head):
affordable on a GPU with PyTorch's fused attention, not on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from busgen_lib.data.dataset import boxes_to_mask
from busgen_lib.diffusion.conditions import ConditionEncoder
from busgen_lib.profiles import SAMPLING, UNET, get_profile

ARCHITECTURE = "busgen-unet2d-v1"


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class BUSGenConfig:
    """Everything that fixes the network's shape and its noise schedule; saved with each checkpoint."""

    profile: str
    image_size: int
    device_names: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]  # self-attention in the encoder level i (decoder has none)
    layers_per_block: int = 2
    mid_attention: bool = True
    attention_head_dim: int | None = None  # None: one head over all channels, as the reference
    resample: str = "conv"  # "conv" | "resnet" (learned resampling blocks)
    time_scale_shift: str = "default"  # "default" (additive) | "scale_shift" (FiLM)
    norm_num_groups: int = 32
    dropout: float = 0.0
    cond_dim: int | None = None  # width of the condition embeddings; None: block_out_channels[0]
    box_mode: str = "mask"  # "mask" (reference) | "embedding" (paper text) | "both"
    max_boxes: int = 4
    box_freqs: int = 8
    p_uncond: float = 0.1
    independent_drop: bool = False
    num_train_timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.028
    offset_noise: float = 0.0  # per-image constant in the training noise (schedule.diffusion_loss); reference: 0
    architecture: str = ARCHITECTURE
    in_channels: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_names", tuple(self.device_names))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        object.__setattr__(self, "in_channels", 1 + (self.box_mode in ("mask", "both")))
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per level of block_out_channels")
        if self.resample not in ("conv", "resnet"):
            raise ValueError(f"resample must be 'conv' or 'resnet', got {self.resample!r}")

    @property
    def num_devices(self) -> int:
        return len(self.device_names)

    @property
    def emb_dim(self) -> int:
        """Width of the timestep embedding (diffusers: 4 × base channels), which the conditions join."""
        return 4 * self.block_out_channels[0]

    def unet_kwargs(self) -> dict[str, Any]:
        """The `UNet2DModel` arguments this configuration stands for."""
        attn_down = "AttnDownBlock2D"
        plain_down = "ResnetDownsampleBlock2D" if self.resample == "resnet" else "DownBlock2D"
        up = "ResnetUpsampleBlock2D" if self.resample == "resnet" else "UpBlock2D"
        return dict(
            sample_size=self.image_size,
            in_channels=self.in_channels,
            out_channels=1,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(attn_down if a else plain_down for a in self.attention_levels),
            up_block_types=(up,) * len(self.block_out_channels),
            downsample_type=self.resample,
            upsample_type=self.resample,
            add_attention=self.mid_attention,
            attention_head_dim=self.attention_head_dim,
            resnet_time_scale_shift=self.time_scale_shift,
            norm_num_groups=self.norm_num_groups,
            dropout=self.dropout,
            class_embed_type="identity",
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BUSGenConfig:
        """Inverse of `to_dict`; refuses a checkpoint written for another architecture."""
        if data.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"checkpoint architecture {data['architecture']!r} is not {ARCHITECTURE!r}")
        names = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - names - {"in_channels"}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; was the checkpoint written by a newer busgen?")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> BUSGenConfig:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- profile tables

@dataclass(frozen=True)
class SamplingDefaults:
    """Sampler settings per profile; `sample.sample` takes them as keyword arguments."""

    sampler: str = "dpmsolver++-singlestep"
    steps: int = 50
    order: int = 3
    guidance: float = 1.8


SAMPLING_DEFAULTS: dict[str, SamplingDefaults] = {name: SamplingDefaults(**values) for name, values in SAMPLING.items()}


def config_for_profile(profile: str, device_names: tuple[str, ...] | list[str], **overrides: Any) -> BUSGenConfig:
    """The model configuration of a run profile; `overrides` replace single fields (e.g. box_mode)."""
    prof = get_profile(profile)
    sizes = UNET[prof.name]
    config = BUSGenConfig(profile=prof.name, image_size=prof.image_size, device_names=tuple(device_names),
                          max_boxes=prof.max_boxes, **sizes)
    return replace(config, **overrides) if overrides else config


# --------------------------------------------------------------------------- network

class BUSGenUNet(nn.Module):
    """ε_θ(x_t, t, c) with c = (pathology, device, boxes): the network of eq. 1 and eq. 2."""

    def __init__(self, config: BUSGenConfig):
        super().__init__()
        self.config = config
        self.conditions = ConditionEncoder(
            emb_dim=config.emb_dim,
            num_devices=config.num_devices,
            cond_dim=config.cond_dim or config.block_out_channels[0],
            box_mode=config.box_mode,
            p_uncond=config.p_uncond,
            independent_drop=config.independent_drop,
            box_freqs=config.box_freqs,
        )
        self.unet = UNet2DModel(**config.unet_kwargs())

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        pathology: torch.Tensor,
        device: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        force_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise ε in x_t (B, 1, S, S) at timesteps t (scalar or (B,)).

        Missing boxes mean "no lesion box"; a missing box mask is rasterised from
        the valid boxes with the data layer's rule, so training and sampling agree.
        `force_drop` (B,) bool replaces the conditions of those samples by the null ones.
        """
        batch = x_t.shape[0]
        if boxes is None:
            boxes = x_t.new_zeros(batch, self.config.max_boxes, 4)
        if box_valid is None:
            box_valid = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=x_t.device)
        if box_mask is None and self.conditions.uses_mask:
            box_mask = boxes_to_mask(torch.where(box_valid[..., None], boxes, 0.0), x_t.shape[-2:])[:, None]
        emb, mask = self.conditions(pathology, device, boxes, box_valid, box_mask, force_drop)
        if mask is not None:
            x_t = torch.cat((x_t, mask.to(x_t.dtype)), dim=1)
        t = torch.as_tensor(t, device=x_t.device).expand(batch)
        return self.unet(x_t, t, class_labels=emb).sample


def build_model(profile: str, device_names: tuple[str, ...] | list[str], **overrides: Any) -> BUSGenUNet:
    """A freshly initialised BUSGen UNet for a run profile."""
    return BUSGenUNet(config_for_profile(profile, device_names, **overrides))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
