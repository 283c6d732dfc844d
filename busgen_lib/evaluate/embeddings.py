"""How well a model's features separate a label: 2-D maps and clustering scores (Fig 5c–d, Supplementary §8).

The paper draws t-SNE maps of the [CLS] features of BUS-DM and Baseline-CLIP on
the test images, coloured by label (TNBC vs non-TNBC, ALN-positive vs
negative), and scores the clustering with NMI, ARI and the silhouette
coefficient. Here, as the issue specifies: NMI and ARI compare k-means clusters
(k = 2, on the features themselves, not on the 2-D map, which is stochastic and
distorts distances) with the labels; the silhouette coefficient is that of the
labels in feature space (how concentrated each label's cluster is). Each gets a
percentile bootstrap CI over test images, stratified by label
(`stats.bootstrap_ci`). The maps come from scikit-learn's t-SNE and umap-learn.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.stats import bootstrap_ci

METRICS = ("nmi", "ari", "silhouette")


def _checked(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if features.ndim != 2:
        raise DataError(f"features must be a 2-D array (images x feature dims), got shape {features.shape}")
    if len(features) != len(labels):
        raise DataError(f"features have {len(features)} rows but labels {len(labels)}: one label per image")
    if len(np.unique(labels)) < 2:
        raise DataError(f"clustering scores need images of two labels, got only {np.unique(labels).tolist()}")
    return features, labels


def kmeans_clusters(features: np.ndarray, k: int = 2, seed: int = 0) -> np.ndarray:
    """k-means cluster of each row (scikit-learn, 4 restarts)."""
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(features)


def clustering_metric(name: str, k: int = 2, seed: int = 0):
    """metric(features, labels) -> float for `name` in METRICS; the callable `bootstrap_ci` resamples."""
    def nmi(features: np.ndarray, labels: np.ndarray) -> float:
        return normalized_mutual_info_score(labels, kmeans_clusters(features, k, seed))

    def ari(features: np.ndarray, labels: np.ndarray) -> float:
        return adjusted_rand_score(labels, kmeans_clusters(features, k, seed))

    def silhouette(features: np.ndarray, labels: np.ndarray) -> float:
        return silhouette_score(features, labels)

    table = {"nmi": nmi, "ari": ari, "silhouette": silhouette}
    if name not in table:
        raise UsageError(f"unknown clustering metric {name!r}: use one of {', '.join(METRICS)}")
    return table[name]


def clustering_scores(features: np.ndarray, labels: np.ndarray, k: int = 2, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> pd.DataFrame:
    """NMI, ARI (k-means, k clusters, vs labels) and silhouette (of the labels) with bootstrap CIs.

    One row per metric: metric, estimate, lo, hi, n. Images are resampled within
    each label, so every replicate holds both labels.
    """
    features, labels = _checked(features, labels)
    rows = []
    for name in METRICS:
        estimate, lo, hi = bootstrap_ci(clustering_metric(name, k, seed), features, labels, n_boot=n_boot,
                                        level=level, seed=seed, stratify=labels)
        rows.append({"metric": name, "estimate": estimate, "lo": lo, "hi": hi, "n": len(labels)})
    return pd.DataFrame(rows)


def project_2d(features: np.ndarray, method: Literal["tsne", "umap"] = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) map of the features for a scatter plot: t-SNE (scikit-learn) or UMAP (umap-learn).

    Perplexity and neighbours shrink with tiny test sets (both need fewer than N).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 4:
        raise DataError(f"a 2-D map needs at least 4 feature rows (images x dims), got shape {features.shape}")
    n = len(features)
    if method == "tsne":
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(
            features)
    if method == "umap":
        import umap  # imported here: umap-learn compiles numba code on import, which only this map needs

        return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1).fit_transform(features)
    raise UsageError(f"unknown projection {method!r}: use 'tsne' or 'umap'")
