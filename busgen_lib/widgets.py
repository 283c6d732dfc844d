"""An interactive generator for JupyterLab, the counterpart of the paper's online demo.

`generator(model_dir)` shows a panel: pathology, device, one lesion box typed
as four relative numbers (x0, y0, x1, y1 in 0..1), guidance w of eq. 2, solver
steps and seed → one generated image and the time it took. It draws through
the same path as `pipeline.sample_dataset` (a plan `Request`, checked by
`plan.validate_plan`, sampled by `pipeline.model_sample_fn`), so an image made
here is the image a dataset row with the same conditions and seed would get.
Nothing is sampled until the button is pressed, so a notebook run by papermill
only displays the panel.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import ipywidgets as w
import numpy as np
from PIL import Image

from busgen_lib.data.schema import PATHOLOGIES
from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.checkpoint import load_model
from busgen_lib.diffusion.model import SAMPLING_DEFAULTS, BUSGenUNet
from busgen_lib.diffusion.plan import Request, validate_plan
from busgen_lib.errors import DataError, UsageError

DEFAULT_BOX = "0.3, 0.35, 0.7, 0.65"
SHOWN_PX = 256  # the image is shown at this width, whatever the model's resolution


def parse_box(text: str) -> tuple[float, float, float, float]:
    """Four numbers typed as "x0, y0, x1, y1" (relative 0..1; commas or spaces) → a box."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"box {text!r}: type four numbers x0, y0, x1, y1 between 0 and 1") from None
    if len(values) != 4:
        raise UsageError(f"box {text!r}: type four numbers x0, y0, x1, y1 between 0 and 1, got {len(values)}")
    return values  # type: ignore[return-value]


def generate_image(model: BUSGenUNet, pathology: str, device: str, box: tuple[float, float, float, float] | None,
                   guidance: float, steps: int, seed: int) -> tuple[np.ndarray, float]:
    """One image (S, S) uint8 for these conditions and seed, and the seconds sampling took.

    A normal image has no lesion, so its box is dropped. Conditions are checked
    as a plan row is (`validate_plan`), so a bad device or box is refused with
    the message the `sample` command gives.
    """
    boxes = [] if pathology == "normal" or box is None else [tuple(float(v) for v in box)]
    request = Request(index=0, seed=int(seed), pathology=pathology, device=device, boxes=boxes)
    validate_plan([request], devices=(*model.config.device_names, ""))
    sample_fn = pipeline.model_sample_fn(model, **pipeline.sampling_options(model, steps=int(steps),
                                                                            guidance=float(guidance)))
    start = time.perf_counter()
    image = sample_fn([request])[0]
    return image, time.perf_counter() - start


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()


class GeneratorPanel(w.VBox):
    """The controls, the Generate button, the image and a status line; `generate()` is the button's action."""

    def __init__(self, model: BUSGenUNet, name: str = ""):
        defaults = SAMPLING_DEFAULTS[model.config.profile]
        self.model = model
        self.pathology = w.Dropdown(options=list(PATHOLOGIES), value="malignant", description="pathology")
        devices = list(model.config.device_names) or [""]
        self.device = w.Dropdown(options=[(d or "(none)", d) for d in devices], value=devices[0], description="device")
        self.box = w.Text(value=DEFAULT_BOX, description="box", placeholder="x0, y0, x1, y1 (0..1)")
        self.guidance = w.FloatSlider(value=defaults.guidance, min=0.0, max=8.0, step=0.1, description="guidance w")
        self.steps = w.IntSlider(value=defaults.steps, min=1, max=max(100, defaults.steps), description="steps")
        self.seed = w.IntText(value=0, description="seed")
        self.button = w.Button(description="Generate", button_style="primary")
        self.image = w.Image(format="png", width=SHOWN_PX, height=SHOWN_PX)
        self.status = w.Label(value=f"{name}: press Generate" if name else "press Generate")
        self.button.on_click(lambda _: self.generate())
        self.pathology.observe(lambda change: setattr(self.box, "disabled", change["new"] == "normal"), "value")
        super().__init__([w.HBox([w.VBox([self.pathology, self.device, self.box]),
                                  w.VBox([self.guidance, self.steps, self.seed, self.button])]),
                          self.image, self.status])

    def generate(self) -> np.ndarray | None:
        """Sample with the current values, show the image and the time; a bad value is reported, not raised."""
        try:
            box = None if self.pathology.value == "normal" else parse_box(self.box.value)
            image, seconds = generate_image(self.model, self.pathology.value, self.device.value, box,
                                            self.guidance.value, self.steps.value, self.seed.value)
        except (DataError, UsageError, ValueError) as err:
            self.status.value = f"not generated: {err}"
            return None
        self.image.value = _png(image)
        self.status.value = (f"{self.pathology.value}, device {self.device.value or '(none)'}, seed {self.seed.value}: "
                             f"{seconds:.2f} s ({self.steps.value} steps, w = {self.guidance.value:g})")
        return image


def generator(model_dir: str | Path) -> GeneratorPanel:
    """The interactive generator for a trained model folder (e.g. `runs/demo/busgen/phantom/model`)."""
    return GeneratorPanel(load_model(model_dir), name=Path(model_dir).parent.name)
