"""Clustering scores of features against labels (Fig 5c–d): against sklearn on known clusterings, and hand values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.embeddings import clustering_metric, clustering_scores, project_2d

# Two unmistakable 1-D clusters: k-means must return {0, 0.1, 0.2} and {10, 10.1, 10.2}.
FEATURES = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
TRUE_CLUSTERS = np.array([0, 0, 0, 1, 1, 1])
LABELS = np.array([0, 0, 1, 1, 1, 0])


def _silhouette_by_hand(x: np.ndarray, labels: np.ndarray) -> float:
    """Rousseeuw's definition written out: s_i = (b_i - a_i) / max(a_i, b_i), averaged."""
    s = []
    for i in range(len(x)):
        d = np.abs(x[:, 0] - x[i, 0])
        same = (labels == labels[i]) & (np.arange(len(x)) != i)
        a, b = d[same].mean(), d[labels != labels[i]].mean()
        s.append((b - a) / max(a, b))
    return float(np.mean(s))


def test_nmi_and_ari_score_the_kmeans_clusters_against_the_labels():
    nmi = clustering_metric("nmi")(FEATURES, LABELS)
    ari = clustering_metric("ari")(FEATURES, LABELS)
    assert nmi == pytest.approx(normalized_mutual_info_score(LABELS, TRUE_CLUSTERS))
    assert ari == pytest.approx(adjusted_rand_score(LABELS, TRUE_CLUSTERS))
    # by hand, contingency [[2, 1], [1, 2]]: ARI = (2 - 6*6/15) / (6 - 6*6/15) = -1/9;
    # NMI = MI / ln 2 with MI = 2/3 ln(4/3) + 1/3 ln(2/3)
    assert ari == pytest.approx(-1 / 9)
    assert nmi == pytest.approx((2 / 3 * np.log(4 / 3) + 1 / 3 * np.log(2 / 3)) / np.log(2))


def test_silhouette_is_rousseeuws_coefficient_of_the_labels():
    assert clustering_metric("silhouette")(FEATURES, LABELS) == pytest.approx(_silhouette_by_hand(FEATURES, LABELS))


def test_perfectly_separated_labels_score_one_with_a_degenerate_interval():
    table = clustering_scores(FEATURES, TRUE_CLUSTERS, n_boot=50).set_index("metric")
    assert table.loc["nmi", ["estimate", "lo", "hi"]].tolist() == pytest.approx([1, 1, 1])
    assert table.loc["ari", ["estimate", "lo", "hi"]].tolist() == pytest.approx([1, 1, 1])
    assert table.loc["silhouette", "estimate"] == pytest.approx(_silhouette_by_hand(FEATURES, TRUE_CLUSTERS))


def test_the_interval_brackets_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def blobs(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([0, 1], n)
        return rng.normal(size=(2 * n, 3)) + 1.5 * y[:, None], y

    small = clustering_scores(*blobs(15), n_boot=200).set_index("metric")
    large = clustering_scores(*blobs(150), n_boot=200).set_index("metric")
    for table in (small, large):
        assert (table["lo"] <= table["estimate"]).all() and (table["estimate"] <= table["hi"]).all()
        assert (table["hi"] > table["lo"]).all()
    assert ((large["hi"] - large["lo"]) < (small["hi"] - small["lo"])).all()


def test_refusals_name_the_problem():
    with pytest.raises(DataError, match="6 rows but labels 5"):
        clustering_scores(FEATURES, LABELS[:5])
    with pytest.raises(DataError, match="two labels"):
        clustering_scores(FEATURES, np.zeros(6))
    with pytest.raises(DataError, match="2-D"):
        clustering_scores(FEATURES[:, 0], LABELS)
    with pytest.raises(UsageError, match="unknown clustering metric"):
        clustering_metric("purity")
    with pytest.raises(UsageError, match="unknown projection"):
        project_2d(np.zeros((8, 3)), "pca")


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_a_2d_map_keeps_separate_clusters_apart(method):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 8)) + 12 * y[:, None]
    points = project_2d(x, method, seed=0)
    assert points.shape == (40, 2)
    d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(40) * 1e9
    assert (y[d.argmin(axis=1)] == y).all()  # every point's nearest neighbour on the map has its label
