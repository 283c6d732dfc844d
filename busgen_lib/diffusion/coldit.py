"""CoLDiT: a latent diffusion transformer conditioned on BI-RADS (3, 4a, 4b, 4c, 5), the sister system of BUSGen.

Two diffusers networks in one model folder: an `AutoencoderKL` trained from
scratch on BUS images (stage 1, `vae_loss`), and a `DiTTransformer2DModel`
predicting ε over its scaled latents (stage 2, eq. 1 of BUSGen on z instead of
x). Both stages run through BUSGen's training loop (`train.fit`), and sampling
through its sampler (`sample.sample`): the model exposes `latent_shape`,
`encode_latents` and `decode`, the hooks by which those treat a latent model.

What is ours is the label step. diffusers' DiT gives every transformer block
its own label embedder, each of which drops the label on its own during
training, so a sample is almost never fully unconditional and classifier-free
guidance would have no null model to subtract. Here the blocks' dropout is
off; the label is dropped once per sample, before the network (as in DiT's
own `LabelEmbedder`), to the extra null class that diffusers already reserves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import LabelEmbedding

from busgen_lib.data.schema import BIRADS_CLASSES
from busgen_lib.profiles import get_coldit, get_profile

ARCHITECTURE = "coldit-latent-dit-v1"
BACKBONE = "dit"


class CoLDiT(ModelMixin, ConfigMixin):
    """ε_θ(z_t, t, BI-RADS) over the latents z = s · E(x) of its own autoencoder; `decode` maps z back to pixels."""

    condition_keys = ("birads",)  # the dataset/plan fields the network is conditioned on

    @register_to_config
    def __init__(
        self,
        profile: str,
        image_size: int,
        vae_channels: tuple[int, ...],
        latent_channels: int,
        dit_layers: int,
        dit_heads: int,
        dit_head_dim: int,
        patch_size: int,
        norm_num_groups: int,
        kl_weight: float = 1e-4,
        p_uncond: float = 0.1,
        latent_scale: float = 1.0,  # s: set after stage 1 so that the DiT's latents have unit variance
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        offset_noise: float = 0.0,
        backbone: str = BACKBONE,
        architecture: str = ARCHITECTURE,
    ):
        super().__init__()
        if architecture != ARCHITECTURE:
            raise ValueError(f"model architecture {architecture!r} is not {ARCHITECTURE!r}")
        levels = len(vae_channels)
        self.vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=tuple(vae_channels),
                                 down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                                 latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                                 sample_size=image_size)
        side = image_size // 2 ** (levels - 1)
        self.dit = DiTTransformer2DModel(num_attention_heads=dit_heads, attention_head_dim=dit_head_dim,
                                         in_channels=latent_channels, out_channels=latent_channels,
                                         num_layers=dit_layers, sample_size=side, patch_size=patch_size,
                                         num_embeds_ada_norm=len(BIRADS_CLASSES))
        for module in self.dit.modules():  # one label drop per sample, in `forward`, not one per block
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0
        self.null_label = len(BIRADS_CLASSES)  # diffusers' reserved CFG row of every label table
        self.latent_shape = (latent_channels, side, side)

    # ------------------------------------------------------------------ the diffusion network

    def labels(self, birads: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """BI-RADS indices (1..5, 0 = unknown) → DiT class ids (0..4, null = 5), dropped with p_uncond in training."""
        drop = birads <= 0
        if self.training and self.config.p_uncond > 0:
            drop = drop | (torch.rand(birads.shape, device=birads.device) < self.config.p_uncond)
        if force_drop is not None:
            drop = drop | force_drop
        return torch.where(drop, torch.full_like(birads, self.null_label), birads - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, birads: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ε in the latent z_t (B, C, s, s) at timesteps t for BI-RADS indices `birads` (B,)."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.dit(x_t, timestep=t, class_labels=self.labels(birads, force_drop)).sample

    # ------------------------------------------------------------------ the autoencoder

    @torch.no_grad()
    def encode_latents(self, image: torch.Tensor) -> torch.Tensor:
        """z = s · mean of q(z | x) for images in [-1, 1]: the DiT's x_0 (the autoencoder is frozen then)."""
        return self.vae.encode(image).latent_dist.mode() * self.config.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.vae.decode(z / self.config.latent_scale).sample.clamp(-1.0, 1.0)


def vae_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> torch.Tensor:
    """Stage 1: ‖x − D(z)‖² + β · KL(q(z|x) ‖ N(0, I)), z drawn from q (reparameterised, global RNG).

    `model` is the CoLDiT (possibly wrapped for data parallelism); the loop seeds the RNG per step.
    """
    vae = model.module.vae if hasattr(model, "module") else model.vae
    x = batch["image"]
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return F.mse_loss(recon.float(), x.float()) + kl_weight * posterior.kl().mean() / x[0].numel()


def build_coldit(profile: str, **overrides) -> CoLDiT:
    """A freshly initialised CoLDiT for a run profile (sizes: profiles.COLDIT, resolution: the Profile's)."""
    s = get_coldit(profile)
    settings = dict(profile=profile, image_size=get_profile(profile).image_size, vae_channels=s.vae_channels,
                    latent_channels=s.latent_channels, dit_layers=s.dit_layers, dit_heads=s.dit_heads,
                    dit_head_dim=s.dit_head_dim, patch_size=s.patch_size, norm_num_groups=s.norm_num_groups,
                    kl_weight=s.kl_weight)
    return CoLDiT(**{**settings, **overrides})


def set_latent_scale(model: CoLDiT, images: torch.Tensor) -> float:
    """s = 1 / std of the latents of `images` (LDM's rescaling): the DiT's x_0 then has unit variance like x's."""
    model.register_to_config(latent_scale=1.0)
    z = model.encode_latents(images)
    scale = float(1.0 / z.float().std().clamp_min(1e-6))
    model.register_to_config(latent_scale=scale)
    return scale
