"""Named run profiles (smoke / demo / paper): the one table every number comes from.

A notebook receives the profile name as a papermill parameter and reads its
sizes here, so that `PROFILE=paper make figures` scales the whole study.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: int          # training/generation resolution (px, square)
    phantom_images: int      # size of the embedded phantom dataset
    phantom_size: int        # resolution the phantom is rendered at
    num_workers: int
    max_boxes: int = 4       # padded lesion boxes per image (conditions)
    eval_samples: int = 150  # generated images per model for the conditioning-control numbers (notebook 01)
    probe_size: int = 32     # resolution of the small real-data classifiers/segmenter that judge generated images
    probe_epochs: int = 20   # their training epochs
    few_shots: int = 34      # images of a phenotype for few-shot adaptation (the paper's DCIS task: 34)
    synthetic_images: int = 2000    # category-balanced images of the base synthetic dataset (notebook 03)
    cpsample_steps: int = 1000      # training steps of each CPSample classifier
    memorisation_steps: int = 2000  # steps of the deliberately memorising model (and its classifier), 16 images


PROFILES: dict[str, Profile] = {
    # 600 images: the smallest phantom (seed 0) with DCIS and TNBC images left for a judge beside 4 shots.
    "smoke": Profile("smoke", image_size=32, phantom_images=600, phantom_size=64, num_workers=0,
                     eval_samples=12, probe_epochs=1, few_shots=4, synthetic_images=48, cpsample_steps=20,
                     memorisation_steps=20),
    # demo generation: ~2 images/s on 2 cores at 64 px, so 1,000 + 2 x 150 images keep notebook 03 near 25 min.
    "demo": Profile("demo", image_size=64, phantom_images=3000, phantom_size=128, num_workers=0,
                    synthetic_images=1000, cpsample_steps=500),
    "paper": Profile("paper", image_size=160, phantom_images=100_000, phantom_size=256, num_workers=8,
                     eval_samples=3000, probe_size=64, probe_epochs=30, synthetic_images=20_000,
                     cpsample_steps=20_000),
}


def get_profile(name: str, **overrides) -> Profile:
    """Look up a profile by name, optionally overriding fields (e.g. from a notebook)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
    return replace(profile, **overrides) if overrides else profile


# --------------------------------------------------------------------------- downstream models (§4.4)
# BUS-DM and Baseline-CLIP read their numbers here (busgen_lib/downstream/). One block, one dataclass,
# so the classifier, the CLIP baseline and the cross-validation grid change together per profile.

@dataclass(frozen=True)
class DownstreamProfile:
    backbone: str                           # timm model name (BUS-DM and Baseline-CLIP's image tower alike)
    input_size: int                         # images are resized to input_size x input_size grayscale
    backbone_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (img_size, patch_size...)
    epochs: int = 10                        # training epochs of the default recipe (before cross-validation)
    batch_size: int = 32
    lr: float = 1e-3                        # AdamW learning rate of the default recipe
    weight_decay: float = 0.05
    lr_grid: tuple[float, ...] = (1e-3,)    # cross-validation grid: learning rates x epochs
    epochs_grid: tuple[int, ...] = (10,)
    cv_folds: int = 5                       # §4.4: "5-fold cross-validation on downstream training sets"
    repeats: int = 5                        # §4.4: "repeated each experiment 5 times"
    clip_embed_dim: int = 64                # joint image-text embedding width
    clip_text_width: int = 64               # text transformer width, layers, heads, context (tokens)
    clip_text_layers: int = 2
    clip_text_heads: int = 2
    clip_context_length: int = 64
    clip_epochs: int = 10                   # contrastive (image-report) pretraining epochs
    clip_lr: float = 1e-3


DOWNSTREAM: dict[str, DownstreamProfile] = {
    # The tiniest ViT that runs: one block of width 32 on 32 px, 8 px patches; seconds per fit.
    "smoke": DownstreamProfile("vit_tiny_patch16_224", input_size=32,
                               backbone_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2),
                               epochs=2, batch_size=16, lr_grid=(1e-3,), epochs_grid=(2,), cv_folds=2, repeats=2,
                               clip_embed_dim=16, clip_text_width=16, clip_text_layers=1, clip_text_heads=1,
                               clip_context_length=40, clip_epochs=1),
    # A ViT like the paper's, sized for a CPU: vit_tiny (5.4M params) on 64 px with 8 px patches (64 tokens).
    # Measured on the smoke phantom's benign vs malignant at 64 px (326 train / 135 test images, seed 0,
    # AdamW 1e-3, 8 epochs, ONE thread, CPU seconds of training): vit_tiny/8 AUC 0.728 in 121 s;
    # resnet18 0.576 in 47 s; regnetx_002 0.569 in 24 s. At the ViT's budget the convnets stay behind:
    # resnet18 20 epochs 0.640 in 117 s, regnetx_002 40 epochs 0.591 in 92 s (one seed each, n_test 135).
    "demo": DownstreamProfile("vit_tiny_patch16_224", input_size=64, backbone_kwargs=dict(img_size=64, patch_size=8),
                              epochs=10, batch_size=32, lr_grid=(3e-4, 1e-3), epochs_grid=(10,)),
    # The paper's encoder: ViT-L/16 at 224 px (§2, "all baseline models shared the same vision encoder (ViT-L)").
    "paper": DownstreamProfile("vit_large_patch16_224", input_size=224, backbone_kwargs=dict(img_size=224),
                               epochs=30, batch_size=64, lr=1e-4, weight_decay=0.05, lr_grid=(3e-5, 1e-4, 3e-4),
                               epochs_grid=(10, 30), clip_embed_dim=768, clip_text_width=512, clip_text_layers=12,
                               clip_text_heads=8, clip_context_length=77, clip_epochs=10, clip_lr=1e-4),
}


def get_downstream(profile: str) -> DownstreamProfile:
    """The downstream-model settings of a profile (smoke / demo / paper)."""
    try:
        return DOWNSTREAM[profile]
    except KeyError:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(DOWNSTREAM)}") from None
