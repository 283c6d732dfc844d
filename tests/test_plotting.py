"""Figure files: the provenance caption sits below every axis label, never on top of one."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from busgen_lib import plotting  # noqa: E402


@pytest.mark.parametrize("layout", [None, "constrained"])
def test_caption_does_not_overlap_a_long_x_label(tmp_path, layout):
    plotting.apply_style()
    # a short figure whose three-line x label reaches below the figure's lower edge: the old fixed caption
    # position (2% of the height below the edge) landed on it
    fig, ax = plt.subplots(figsize=(3.0, 1.4), layout=layout)
    ax.hist(np.random.default_rng(0).random(50))
    label = ax.set_xlabel("lesion box area / image area\n(relative, per lesion)\nsmallest 30% marked", fontsize=11)
    caption = plotting.provenance("phantom, a long description of the data behind this figure", "smoke", 50)
    png = plotting.save_figure(fig, tmp_path, "caption", caption)
    renderer = fig.canvas.get_renderer()
    footer = next(t for t in fig.texts if t.get_text() == caption)
    footer_box, label_box = footer.get_window_extent(renderer), label.get_window_extent(renderer)
    ticks_box = ax.xaxis.get_tightbbox(renderer)
    assert not footer_box.overlaps(label_box) and footer_box.y1 < label_box.y0
    assert footer_box.y1 < ticks_box.y0
    assert png.exists() and (tmp_path / "caption.pdf").exists()
    plt.close(fig)


def test_seeded_aucs_draws_one_row_per_arm_with_its_mean():
    aucs = {"generated": [0.80, 0.82, 0.78], "cleaned": [0.85, 0.88, 0.86]}
    fig = plotting.seeded_aucs(aucs, {"cleaned": "p = 0.02"}, reference="generated")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cleaned", "generated"]
    means = sorted(line.get_xdata()[0] for line in ax.lines if line.get_marker() == "s")
    assert means == pytest.approx([0.80, np.mean([0.85, 0.88, 0.86])])
    assert [t.get_text() for t in ax.texts] == ["p = 0.02"]
    plt.close(fig)
