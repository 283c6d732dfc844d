"""One figure style for all notebooks, and figure files that say what made them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PALETTE = {"normal": "#7f7f7f", "benign": "#4c72b0", "malignant": "#c44e52",
           "real": "#3b2c5e", "generated": "#a58fd1", "BUS-DM": "#c44e52", "Baseline": "#4c72b0"}


def apply_style() -> None:
    """Matplotlib defaults shared by every figure (paper-like: small, clean; 300 dpi unless saved otherwise)."""
    mpl.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 300, "savefig.bbox": "tight",
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
        "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "image.cmap": "gray",
    })


def provenance(data: str, profile: str, n: int | str) -> str:
    """The line every figure carries: which data, which profile, how many."""
    return f"data: {data} · profile: {profile} · n={n}"


def save_figure(fig: plt.Figure, figures_dir: str | Path, name: str, caption: str) -> Path:
    """Stamp the caption under the figure and write PNG (150 dpi: the screen and the repository) + PDF (print).

    The caption goes below everything already drawn (axis labels, tick labels,
    legends), measured with the renderer after the layout has run, so it never
    overlaps them; `savefig.bbox = "tight"` then grows the file to include it.
    """
    fig.draw_without_rendering()  # run any layout engine first: positions are final
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    gap = 4.0 / 72.0  # 4 pt between the lowest label and the caption
    y = (drawn.y0 - gap) / fig.get_figheight()
    x = max(drawn.x0, 0.0) / fig.get_figwidth()
    fig.text(x, y, caption, ha="left", va="top", fontsize=7, color="#444444", wrap=True)
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=150)
    fig.savefig(out / f"{name}.pdf")
    return png


def image_grid(images: dict[tuple[str, str], np.ndarray | None], rows: list[str], cols: list[str],
               cell: float = 1.2, boxes: dict | None = None) -> plt.Figure:
    """A rows × cols grid of grayscale images (e.g. pathology × device); empty cells say so.

    `boxes` optionally maps the same keys to relative [x0, y0, x1, y1] boxes to outline.
    """
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(cell * len(cols), cell * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            image = images.get((r, c))
            if image is None:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=7, color="#999999")
            else:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
                for x0, y0, x1, y1 in (boxes or {}).get((r, c), []):
                    h, w = image.shape[:2]
                    ax.add_patch(mpl.patches.Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h,
                                                       fill=False, color="#f0c000", lw=0.8))
            if i == 0:
                ax.set_title(c, fontsize=7, rotation=30, ha="left")
            if j == 0:
                ax.set_ylabel(r, fontsize=8)
    return fig


def area_histogram(areas_by_dataset: dict[str, np.ndarray], thresholds: dict[str, float],
                   paper_threshold: float) -> plt.Figure:
    """Fig 3a analogue: lesion relative-area distributions with small-lesion thresholds marked."""
    fig, axes = plt.subplots(1, len(areas_by_dataset), figsize=(3.2 * len(areas_by_dataset), 2.6), squeeze=False)
    for ax, (name, areas) in zip(axes[0], areas_by_dataset.items()):
        bins = np.linspace(0, max(0.5, float(np.max(areas))), 40)
        small = areas < thresholds[name]
        ax.hist(areas[~small], bins=bins, color=PALETTE["benign"], label="other lesions")
        ax.hist(areas[small], bins=bins, color="#dd8452", label="smallest 30%")
        ax.axvline(thresholds[name], color="k", lw=1, ls="--", label=f"ours {thresholds[name]:.3f}")
        ax.axvline(paper_threshold, color="#c44e52", lw=1, ls=":", label=f"paper {paper_threshold}")
        ax.set_title(f"{name} (n={len(areas)} lesions)")
        ax.set_xlabel("lesion box area / image area")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("lesions")
    return fig


def seeded_aucs(aucs: Mapping[str, Sequence[float]], p_values: Mapping[str, str] | None = None,
                reference: str | None = None) -> plt.Figure:
    """Arms trained with several seeds: each seed's AUC (dots) and the mean ± SD over seeds (bar), one row per arm.

    `p_values` optionally maps an arm to a short label (e.g. "p = 0.03 vs generated") printed beside its row;
    `reference` marks the arm the others were tested against with a dashed line at its mean.
    """
    names = list(aucs)[::-1]
    fig, ax = plt.subplots(figsize=(4.6, 0.5 * len(names) + 1.0))
    for i, name in enumerate(names):
        a = np.asarray(aucs[name], dtype=float)
        sd = a.std(ddof=1) if len(a) > 1 else 0.0
        ax.errorbar(a.mean(), i, xerr=sd, fmt="s", color="k", capsize=3, ms=4, zorder=3)
        ax.scatter(a, np.full(len(a), i) + np.linspace(-0.12, 0.12, len(a)), s=14, color=PALETTE["generated"],
                   zorder=2)
        if p_values and name in p_values:
            ax.annotate(p_values[name], (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
    if reference is not None:
        ax.axvline(float(np.mean(aucs[reference])), ls="--", lw=0.8, color="#999999")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="AUC on real test images (dots: seeds; bar: mean ± SD)", ylim=(-0.6, len(names) - 0.4))
    return fig


def turing_bars(table: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 2a: per reader (then pooled) accuracy and share of generated images called real, with their CIs.

    `table` is `evaluate.turing.turing_table`'s; chance (0.5) is dashed. Put "simulated" in `title` when the
    answers are.
    """
    readers = list(table["reader"])
    y = np.arange(len(readers))[::-1]
    fig, ax = plt.subplots(figsize=(4.6, 0.45 * len(readers) + 1.2))
    for offset, (measure, colour, label) in enumerate((("accuracy", PALETTE["real"], "accuracy"),
                                                        ("generated_called_real", PALETTE["generated"],
                                                         "generated called real"))):
        value = table[measure].to_numpy(dtype=float)
        lo, hi = (table[f"{measure}_{end}"].to_numpy(dtype=float) for end in ("lo", "hi"))
        err = [value - lo, hi - value]
        ax.barh(y + 0.2 - 0.4 * offset, value, height=0.38, xerr=err, capsize=2, color=colour, label=label)
    ax.axvline(0.5, color="k", ls="--", lw=0.8, label="chance")
    ax.set_yticks(y, readers)
    ax.set(xlim=(0, 1), xlabel="share (95% CI)", title=title)
    ax.legend(fontsize=6, loc="lower right")
    return fig


def similarity_histograms(panels: Mapping[str, Mapping[str, np.ndarray]], xlabel: str,
                          lines: Mapping[str, Mapping[str, float]] | None = None) -> plt.Figure:
    """One panel per key of `panels` (e.g. a model), overlaid density histograms of its sets (e.g. arms),
    and vertical reference lines `lines[panel] = {label: x}` (a copy threshold, the paper's highest value)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 2.6), squeeze=False, layout="constrained")
    labels = list(dict.fromkeys(label for sets in panels.values() for label in sets))  # one colour per set name
    colours = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (name, sets) in zip(axes[0], panels.items()):
        values = np.concatenate([np.asarray(v, dtype=float) for v in sets.values()])
        marks = (lines or {}).get(name, {})
        bins = np.linspace(min(values.min(), *marks.values()) if marks else values.min(),
                           max(values.max(), *marks.values()) if marks else values.max(), 30)
        for label, v in sets.items():
            ax.hist(v, bins, density=True, alpha=0.55, color=colours[label], label=f"{label} (n={len(v)})")
        for (label, x), style in zip(marks.items(), ("--", ":", "-.")):
            ax.axvline(x, color="k", ls=style, lw=1, label=label)
        ax.set(title=name, xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=6)
    return fig
