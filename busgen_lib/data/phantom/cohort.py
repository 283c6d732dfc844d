"""The phantom's cohort: patients -> exams -> lesions -> views.

Each patient has 1-2 exams, each on one device; a patient with a finding has
1-2 lesions of one pathology (the image label stays unambiguous), each imaged
in 2-8 views spread over the exams, so one lesion can be seen on two devices.
A view is a probe pose: azimuth (which cross-section of the lesion), lateral
offset, in-plane tilt and depth zoom. Every patient is drawn from its own
random stream (seed, index), so a patient does not depend on how many came
before it.

A patient's presentation (symptomatic, or found at opportunistic screening:
the paper's Fig 3d population) is drawn last, from a stream of its own, so
adding it left every earlier draw, and so every image, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from busgen_lib.data.phantom.anatomy import Anatomy, sample_anatomy
from busgen_lib.data.phantom.lesions import Lesion, sample_lesion
from busgen_lib.data.phantom.lexicon import ALN_POSITIVE_RATE, rate_birads, sample_descriptors, sample_subtype
from busgen_lib.data.devices import device_names

# Patient-level pathology mix; normal and lesion patients have the same expected
# number of images, so this is also the image mix.
PATHOLOGY_MIX: dict[str, float] = {"normal": 0.25, "benign": 0.45, "malignant": 0.30}
SECOND_EXAM_RATE = 0.3
SECOND_LESION_RATE = 0.3
NEIGHBOUR_RATE = 0.5           # second lesion close enough to share some views
NEIGHBOUR_GAP = (1.1, 1.8)     # centre distance / (2 x first lesion's lateral semi-axis)
FAR_AWAY = 10.0                # coronal distance of a non-neighbouring second lesion
VIEWS_PER_LESION = (2, 8)
VIEWS_PER_NORMAL_EXAM = (2, 8)
PROBE_OFFSET = 0.15            # max lateral offset of the target, fraction of width
PROBE_TILT_DEG = 10.0
ZOOM = (0.85, 1.15)
LESION_MARGIN_BELOW_FAT = 0.03
LESION_MAX_DEPTH = 0.62

# Presentation: a phantom assumption, not a clinical estimate. Larger lesions
# (palpable) and malignant ones are more likely to cause symptoms, so patients
# found at screening have smaller lesions and a lower malignant share:
# P(symptomatic) = sigmoid(base + malignant_shift * [malignant] + per_size * (a - reference)),
# with a the lateral semi-axis of the patient's largest lesion (fraction of height).
PRESENTATIONS: tuple[str, str] = ("screening", "symptomatic")
SYMPTOMATIC_BASE_LOGIT = -0.5
SYMPTOMATIC_MALIGNANT_SHIFT = 1.0
SYMPTOMATIC_PER_SIZE = 20.0       # log-odds per unit semi-axis: +-1 over the 0.05..0.15 range
SYMPTOMATIC_REFERENCE_SIZE = 0.1
NORMAL_SCREENING_RATE = 0.7       # patients without a lesion
PRESENTATION_STREAM = 0x50524553  # third rng key ("PRES"); view streams use 1 + view number


@dataclass(frozen=True)
class View:
    """One image: a probe pose in an exam, aimed at a lesion (or at none)."""

    exam: int
    target: int | None       # index into Patient.lesions
    index: int               # view number within the lesion (or the exam, for normals)
    azimuth_deg: float
    offset: float
    tilt_deg: float
    zoom: float


@dataclass(frozen=True)
class Patient:
    patient_id: str
    pathology: str
    anatomy: Anatomy
    devices: tuple[str, ...]              # one per exam
    lesions: tuple[Lesion, ...]
    birads: tuple[tuple[str, ...], ...]   # [lesion][exam]: each exam's reader rates anew
    views: tuple[View, ...]
    presentation: str                     # one of PRESENTATIONS

    def exam_id(self, exam: int) -> str:
        return f"{self.patient_id}-E{exam + 1}"


def _pose(rng: np.random.Generator, exam: int, target: int | None, index: int) -> View:
    return View(
        exam=exam, target=target, index=index,
        azimuth_deg=float(rng.uniform(0.0, 180.0)),
        offset=float(rng.uniform(-PROBE_OFFSET, PROBE_OFFSET)),
        tilt_deg=float(rng.uniform(-PROBE_TILT_DEG, PROBE_TILT_DEG)),
        zoom=float(rng.uniform(*ZOOM)),
    )


def _view_counts(pathology: str, n_exams: int, rng: np.random.Generator, max_images: int) -> tuple[str, int, list[int]]:
    """(pathology, n_exams, views per lesion or per exam), trimmed to fit `max_images`."""
    if pathology == "normal":
        counts = [int(rng.integers(VIEWS_PER_NORMAL_EXAM[0], VIEWS_PER_NORMAL_EXAM[1] + 1)) for _ in range(n_exams)]
    else:
        n_lesions = 2 if rng.random() < SECOND_LESION_RATE else 1
        counts = [int(rng.integers(VIEWS_PER_LESION[0], VIEWS_PER_LESION[1] + 1)) for _ in range(n_lesions)]
    if sum(counts) <= max_images:
        return pathology, n_exams, counts
    if pathology != "normal" and max_images < VIEWS_PER_LESION[0]:
        return "normal", 1, [max_images]
    return pathology, 1, [min(counts[0], max_images)]


def _lesions(patient_id: str, pathology: str, anatomy: Anatomy, n: int, rng: np.random.Generator) -> list[Lesion]:
    depth_range = (anatomy.fat_bottom + LESION_MARGIN_BELOW_FAT, min(anatomy.gland_bottom, LESION_MAX_DEPTH))
    neighbour = rng.random() < NEIGHBOUR_RATE
    lesions: list[Lesion] = []
    for k in range(n):
        subtype = sample_subtype(pathology, rng)
        aln = bool(rng.random() < ALN_POSITIVE_RATE[subtype]) if pathology == "malignant" else None
        descriptors = sample_descriptors(subtype, bool(aln), rng)
        position = (0.0, 0.0)
        if k:
            first = lesions[0].semi_axes[0]
            direction = rng.uniform(0, 2 * np.pi)
            distance = FAR_AWAY if not neighbour else rng.uniform(*NEIGHBOUR_GAP) * 2.0 * first
            position = (float(distance * np.cos(direction)), float(distance * np.sin(direction)))
        lesions.append(sample_lesion(f"{patient_id}-L{k + 1}", pathology, subtype, descriptors, aln,
                                     depth_range, position, rng))
    return lesions


def _lesion_views(counts: list[int], n_exams: int, rng: np.random.Generator) -> list[View]:
    """Views of each lesion, the first ones in exam 1 and the rest in exam 2."""
    views = []
    for target, n_views in enumerate(counts):
        in_first = int(rng.integers(1, n_views)) if n_exams == 2 else n_views
        views += [_pose(rng, int(i >= in_first), target, i) for i in range(n_views)]
    return views


def draw_presentation(pathology: str, lesions: tuple[Lesion, ...] | list[Lesion], seed: int, index: int) -> str:
    """"screening" or "symptomatic" for patient `index`, from its own stream (see PRESENTATION_STREAM)."""
    rng = np.random.default_rng([seed, index, PRESENTATION_STREAM])
    if not lesions:
        p_symptomatic = 1.0 - NORMAL_SCREENING_RATE
    else:
        size = max(lesion.semi_axes[0] for lesion in lesions)
        logit = (SYMPTOMATIC_BASE_LOGIT + SYMPTOMATIC_MALIGNANT_SHIFT * (pathology == "malignant")
                 + SYMPTOMATIC_PER_SIZE * (size - SYMPTOMATIC_REFERENCE_SIZE))
        p_symptomatic = 1.0 / (1.0 + np.exp(-logit))
    return PRESENTATIONS[int(rng.random() < p_symptomatic)]


def plan_patient(index: int, seed: int, max_images: int) -> Patient:
    """Draw patient `index` of the cohort with seed `seed`, with at most `max_images` views."""
    rng = np.random.default_rng([seed, index])
    patient_id = f"PH{index:05d}"
    names = device_names()
    pathology = list(PATHOLOGY_MIX)[rng.choice(len(PATHOLOGY_MIX), p=list(PATHOLOGY_MIX.values()))]
    n_exams = 2 if rng.random() < SECOND_EXAM_RATE else 1
    pathology, n_exams, counts = _view_counts(pathology, n_exams, rng, max_images)
    devices = tuple(names[i] for i in rng.integers(0, len(names), size=n_exams))
    anatomy = sample_anatomy(rng)
    if pathology == "normal":
        lesions: list[Lesion] = []
        views = [_pose(rng, exam, None, i) for exam, n in enumerate(counts) for i in range(n)]
    else:
        lesions = _lesions(patient_id, pathology, anatomy, len(counts), rng)
        views = _lesion_views(counts, n_exams, rng)
    birads = tuple(tuple(rate_birads(lesion.descriptors, rng) for _ in range(n_exams)) for lesion in lesions)
    presentation = draw_presentation(pathology, lesions, seed, index)
    return Patient(patient_id, pathology, anatomy, devices, tuple(lesions), birads, tuple(views), presentation)
