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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from busgen_lib.data.dataset import boxes_to_mask
from busgen_lib.diffusion.conditions import ConditionEncoder
from busgen_lib.profiles import SAMPLING, UNET, get_profile

ARCHITECTURE = "busgen-unet2d-v1"


# --------------------------------------------------------------------------- profile tables

@dataclass(frozen=True)
class SamplingDefaults:
    """Sampler settings per profile; `sample.sample` takes them as keyword arguments."""

    sampler: str = "dpmsolver++-singlestep"
    steps: int = 50
    order: int = 3
    guidance: float = 1.8


SAMPLING_DEFAULTS: dict[str, SamplingDefaults] = {name: SamplingDefaults(**values) for name, values in SAMPLING.items()}


def config_for_profile(profile: str, device_names: Sequence[str], **overrides: Any) -> dict[str, Any]:
    """The `BUSGenUNet` arguments of a run profile; `overrides` replace single ones (e.g. box_mode)."""
    prof = get_profile(profile)
    return {"profile": prof.name, "image_size": prof.image_size, "device_names": tuple(device_names),
            "max_boxes": prof.max_boxes, **UNET[prof.name], **overrides}


# --------------------------------------------------------------------------- network

class BUSGenUNet(ModelMixin, ConfigMixin):
    """ε_θ(x_t, t, c) with c = (pathology, device, boxes): the network of eq. 1 and eq. 2.

    A diffusers model: its arguments are its configuration (`model.config.profile`,
    `.image_size`, `.device_names`, the schedule's `.num_train_timesteps`,
    `.beta_start`, `.beta_end`, ...), and `save_pretrained` / `from_pretrained`
    write and read `config.json` + `diffusion_pytorch_model.safetensors`.
    """

    @register_to_config
    def __init__(
        self,
        profile: str,
        image_size: int,
        device_names: Sequence[str],
        block_out_channels: Sequence[int],
        attention_levels: Sequence[bool],  # self-attention in the encoder level i (decoder has none)
        layers_per_block: int = 2,
        mid_attention: bool = True,
        attention_head_dim: int | None = None,  # None: one head over all channels, as the reference
        resample: str = "conv",  # "conv" | "resnet" (learned resampling blocks)
        time_scale_shift: str = "default",  # "default" (additive) | "scale_shift" (FiLM)
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        cond_dim: int | None = None,  # width of the condition embeddings; None: block_out_channels[0]
        box_mode: str = "mask",  # "mask" (reference) | "embedding" (paper text) | "both"
        max_boxes: int = 4,
        box_freqs: int = 8,
        p_uncond: float = 0.1,
        independent_drop: bool = False,
        num_train_timesteps: int = 500,
        beta_start: float = 1e-4,
        beta_end: float = 0.028,
        offset_noise: float = 0.0,  # per-image constant in the training noise (schedule.diffusion_loss); reference: 0
        architecture: str = ARCHITECTURE,
    ):
        super().__init__()
        if architecture != ARCHITECTURE:
            raise ValueError(f"model architecture {architecture!r} is not {ARCHITECTURE!r}")
        if len(attention_levels) != len(block_out_channels):
            raise ValueError("attention_levels needs one entry per level of block_out_channels")
        if resample not in ("conv", "resnet"):
            raise ValueError(f"resample must be 'conv' or 'resnet', got {resample!r}")
        emb_dim = 4 * block_out_channels[0]  # the timestep embedding's width (diffusers), which the conditions join
        self.conditions = ConditionEncoder(
            emb_dim=emb_dim,
            num_devices=len(device_names),
            cond_dim=cond_dim or block_out_channels[0],
            box_mode=box_mode,
            p_uncond=p_uncond,
            independent_drop=independent_drop,
            box_freqs=box_freqs,
        )
        plain_down = "ResnetDownsampleBlock2D" if resample == "resnet" else "DownBlock2D"
        up = "ResnetUpsampleBlock2D" if resample == "resnet" else "UpBlock2D"
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=1 + (box_mode in ("mask", "both")),  # the box mask is an extra input channel
            out_channels=1,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attention_levels),
            up_block_types=(up,) * len(block_out_channels),
            downsample_type=resample,
            upsample_type=resample,
            add_attention=mid_attention,
            attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=time_scale_shift,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            class_embed_type="identity",
        )

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


def build_model(profile: str, device_names: Sequence[str], **overrides: Any) -> BUSGenUNet:
    """A freshly initialised BUSGen UNet for a run profile."""
    return BUSGenUNet(**config_for_profile(profile, device_names, **overrides))


def model_settings(model: ConfigMixin) -> dict[str, Any]:
    """A diffusers model's arguments as plain JSON values (run records compare them; diffusers adds private `_` keys)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
