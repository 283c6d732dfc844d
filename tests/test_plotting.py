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


def test_similarity_histograms_give_a_set_one_colour_in_every_panel_and_draw_the_lines():
    rng = np.random.default_rng(0)
    panels = {"a": {"plain": rng.random(20), "new real": rng.random(9)},
              "b": {"plain": rng.random(5), "cpsample": rng.random(5), "new real": rng.random(7)}}
    fig = plotting.similarity_histograms(panels, "cosine", {"a": {"threshold": 0.9, "paper": 0.896}})
    colour = {ax.get_title(): {label.split(" (")[0]: handle.get_facecolor()[:3]
                               for handle, label in zip(*ax.get_legend_handles_labels()) if "(n=" in label}
              for ax in fig.axes}
    assert colour["a"]["plain"] == colour["b"]["plain"] and colour["a"]["new real"] == colour["b"]["new real"]
    assert colour["b"]["cpsample"] != colour["b"]["plain"]
    assert [line.get_xdata()[0] for line in fig.axes[0].lines] == [0.9, 0.896] and not fig.axes[1].lines
    plt.close(fig)


def test_turing_bars_draw_each_reader_with_its_ci():
    import pandas as pd

    table = pd.DataFrame({"reader": ["r1", "pooled"], "accuracy": [0.6, 0.55], "accuracy_lo": [0.4, 0.45],
                          "accuracy_hi": [0.8, 0.65], "generated_called_real": [0.5, 0.6],
                          "generated_called_real_lo": [0.3, 0.5], "generated_called_real_hi": [0.7, 0.7]})
    fig = plotting.turing_bars(table, "SIMULATED readers")
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 6) for c in ax.containers for p in getattr(c, "patches", []))
    assert widths == [0.5, 0.55, 0.6, 0.6]
    rows = {t.get_text(): t.get_position()[1] for t in ax.get_yticklabels()}
    assert rows["r1"] > rows["pooled"] and ax.get_title() == "SIMULATED readers"  # readers top down, pooled last
    plt.close(fig)
