"""What a study asks, the allowed answers and their keyboard shortcuts (one table for pages and checks).

The paper ran two kinds of study: a visual Turing test (real or generated, §2.2)
and a BI-RADS reader study where readers answered again after seeing the
model's output (§2.5, Supplementary §5). A study asks one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from busgen_lib.evaluate.turing import SOURCES

TURING = "turing"
BIRADS = "birads"
QUESTIONS = (TURING, BIRADS)

CONFIDENCES = ("1", "2", "3", "4", "5")  # 1 = guessing, 5 = certain
BIRADS_CHOICES = ("2", "3", "4a", "4b", "4c", "5")  # the paper's reader-study categories (§4.4.3)


@dataclass(frozen=True)
class Choice:
    """One answer button: the value stored, its label, and the key that picks it."""

    value: str
    label: str
    key: str


SOURCE_CHOICES = (Choice("real", "Real", "r"), Choice("generated", "Generated", "g"))
CONFIDENCE_CHOICES = tuple(Choice(c, c, c) for c in CONFIDENCES)
BIRADS_BUTTONS = tuple(Choice(b, b.upper(), b[-1]) for b in BIRADS_CHOICES)  # keys 2 3 a b c 5


def check_answer(question: str, form: dict[str, str], second: bool) -> dict[str, str] | None:
    """The validated answer fields of a submitted form, or None when anything is missing or unknown.

    Turing: answer (real/generated) and confidence (1-5). BI-RADS: birads, or second_birads after the
    model's output was shown. Fields of the other question are refused, so a form cannot smuggle them in.
    """
    if question == TURING and not second:
        wanted = {"answer": SOURCES, "confidence": CONFIDENCES}
    elif question == BIRADS:
        wanted = {"second_birads" if second else "birads": BIRADS_CHOICES}
    else:
        return None
    extra = set(form) - set(wanted) - {"position", "image_id", "stage"}
    if extra or any(form.get(field) not in allowed for field, allowed in wanted.items()):
        return None
    return {field: form[field] for field in wanted}
