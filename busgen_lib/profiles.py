"""Named run profiles (smoke / demo / paper): the one table every number comes from.

A notebook receives the profile name as a papermill parameter and reads its
sizes here, so that `PROFILE=paper make figures` scales the whole study.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from busgen_lib.errors import UsageError


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
    # Training seeds per arm of a downstream comparison (notebook 03): the test runs across seeds, so >= 2.
    # demo: 3, not 5 — each seed trains 4 arms (~2-3 min on 2 cores); 5 would add ~6 min to notebook 03.
    downstream_seeds: int = 3


PROFILES: dict[str, Profile] = {
    # 600 images: the smallest phantom (seed 0) with DCIS and TNBC images left for a judge beside 4 shots.
    "smoke": Profile("smoke", image_size=32, phantom_images=600, phantom_size=64, num_workers=0,
                     eval_samples=12, probe_epochs=1, few_shots=4, synthetic_images=48, cpsample_steps=20,
                     memorisation_steps=20, downstream_seeds=2),
    # demo generation: ~2 images/s on 2 cores at 64 px, so 1,000 + 2 x 150 images keep notebook 03 near 25 min.
    "demo": Profile("demo", image_size=64, phantom_images=3000, phantom_size=128, num_workers=0,
                    synthetic_images=1000, cpsample_steps=500),
    "paper": Profile("paper", image_size=160, phantom_images=100_000, phantom_size=256, num_workers=8,
                     eval_samples=3000, probe_size=64, probe_epochs=30, synthetic_images=20_000,
                     cpsample_steps=20_000, downstream_seeds=5),
}


def get_profile(name: str, **overrides) -> Profile:
    """Look up a profile by name, optionally overriding fields (e.g. from a notebook)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
    return replace(profile, **overrides) if overrides else profile


# --------------------------------------------------------------------------- detector (Fig 3a–c, §4.4.1)
# The lesion detector's numbers, kept apart from `Profile` so that each downstream model has its own block.
# Anchors are fractions of the input side, so they follow `image_size`: lesion boxes in the phantom span
# ~0.07–0.48 of the side (median 0.18) and real BUS lesions up to ~0.8, so four sizes a factor 2 apart
# (0.08–0.64) put every lesion within √2 of an anchor side (IoU ≥ 0.5 for a centred square); aspect ratios
# (height/width) 0.5–2 cover parallel (wider-than-tall) and non-parallel (taller-than-wide) lesions.

@dataclass(frozen=True)
class DetectorSettings:
    backbone: str            # timm model name, created with features_only=True, in_chans=1, pretrained=False
    feature_index: int       # which of its feature maps feeds the RPN (out_indices): stride 8 for convnets
    image_size: int          # input side (px, square)
    epochs: int
    batch_size: int
    lr: float                # AdamW, cosine-annealed to 0 over the run
    weight_decay: float = 1e-4
    anchor_fractions: tuple[float, ...] = (0.08, 0.16, 0.32, 0.64)  # anchor side / image side
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)               # anchor height / width
    head_dim: int = 256      # width of the two-layer box head (torchvision's default 1024 is for COCO's 80 classes)
    roi_samples: int = 128   # proposals sampled per image for the box head (torchvision's default 512)
    scale_jitter: tuple[float, float] = (0.9, 1.1)  # training zoom range (RandomAffine), lesions stay whole-ish


DETECTOR_SETTINGS: dict[str, DetectorSettings] = {
    # timm's test_resnet (0.4M parameters) to its stride-4 stage: the whole train/predict path in seconds.
    # (On 32 px squares a stride-8 map reached AP50 0.14 where stride 4 reached 0.65 in the same 72 steps.)
    "smoke": DetectorSettings("test_resnet", feature_index=1, image_size=64, epochs=2, batch_size=8, lr=2e-3,
                              head_dim=64, roi_samples=64),
    # ResNet-18 to its stride-8 stage (layer2, 128 channels) at the demo's 64 px: an 8 x 8 feature map.
    "demo": DetectorSettings("resnet18", feature_index=2, image_size=64, epochs=12, batch_size=8, lr=1e-3),
    # The paper's detector used a ViT-L backbone (Mask R-CNN, §4.4.1); its stride-16 token grid at 224 px.
    "paper": DetectorSettings("vit_large_patch16_224", feature_index=-1, image_size=224, epochs=50, batch_size=16,
                              lr=1e-4, weight_decay=0.05, head_dim=1024, roi_samples=512),
}


def detector_settings(profile: str, **overrides) -> DetectorSettings:
    """The detector's settings under `profile`, optionally overriding fields."""
    try:
        settings = DETECTOR_SETTINGS[profile]
    except KeyError:
        raise UsageError(f"unknown profile {profile!r}; choose one of {', '.join(DETECTOR_SETTINGS)}") from None
    return replace(settings, **overrides) if overrides else settings
