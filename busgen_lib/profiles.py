"""Named run profiles (smoke / demo / paper): the one table every number comes from.

A notebook receives the profile name as a papermill parameter and reads its
sizes here, so that `PROFILE=paper make figures` scales the whole study.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
