"""The embedded BUS phantom (DESIGN.md, "The embedded default: the BUS phantom").

A procedural B-mode simulator: layered anatomy (anatomy.py) and BI-RADS
lesions (lexicon.py, lesions.py) composed per probe view (scene.py), imaged by
one of 18 devices (speckle.py: scatterers * PSF, envelope; render.py: attenuation,
TGC, log compression, noise; overlay.py), for a cohort of patients, exams,
lesions and views (cohort.py), written as PNGs plus a manifest (writer.py).
"""

from busgen_lib.data.phantom.anatomy import Anatomy, sample_anatomy, tissue_maps
from busgen_lib.data.phantom.cohort import Patient, View, plan_patient
from busgen_lib.data.phantom.lesions import Lesion, LesionView, footprint, sample_lesion
from busgen_lib.data.phantom.render import Scene, render_image
from busgen_lib.data.phantom.scene import build_scene
from busgen_lib.data.phantom.speckle import (
    detect_envelope, homogeneous_envelope, psf_kernel, simulate_iq, speckle_snr,
)
from busgen_lib.data.phantom.writer import EXTRA_COLUMNS, iter_patients, label_boxes, render_view, write_phantom

__all__ = [
    "Anatomy", "EXTRA_COLUMNS", "Lesion", "LesionView", "Patient", "Scene", "View",
    "build_scene", "detect_envelope", "footprint", "homogeneous_envelope", "iter_patients", "label_boxes",
    "plan_patient", "psf_kernel", "render_image", "render_view", "sample_anatomy", "sample_lesion",
    "simulate_iq", "speckle_snr", "tissue_maps", "write_phantom",
]
