"""Multi-view lesion recognition (LR) as an auxiliary task of benign/malignant classification (seeds/003).

The framework of Guo et al.: a CNN backbone f_θ, a linear benign/malignant head
g_φ trained with cross-entropy (eq. 1), and a contrastive loss over the
backbone's pooled features z (eq. 2) whose positives are the other views of the
same lesion and whose negatives are the views of other lesions (eq. 3); the
total is L = L_cls + α·L_con (eq. 4). `VARIANTS` are the rows of its Tables 1–2.

Eq. 2 is pytorch-metric-learning's SupConLoss (cosine similarity over a
temperature τ; eq. 2 itself has none, i.e. τ = 1), with two conventions of
SupCon: an anchor is not its own positive, and its log-probabilities are
averaged over its positives rather than summed (with M views per lesion that is
a constant factor M − 1, absorbed in α). Mini-batches of lesions × views come
from pytorch-metric-learning's MPerClassSampler with the lesion as the class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from sklearn.metrics import (accuracy_score, f1_score, precision_score, recall_score, roc_auc_score)
from sklearn.model_selection import StratifiedGroupKFold

from busgen_lib.downstream.classifier import PREDICT_BATCH, create_backbone
from busgen_lib.downstream.tasks import Task
from busgen_lib.downstream.training import as_inputs, augment_batch, classification_augment, train_loop
from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.stats import paired_differences
from busgen_lib.profiles import LesionRecognitionSettings, get_lesion_recognition

METRICS = ("auc", "acc", "sensitivity", "precision", "specificity", "f1", "mcr")


# --------------------------------------------------------------------------- the variants of Tables 1-2

@dataclass(frozen=True)
class Variant:
    label: str                 # the paper's row name
    positives: str | None      # "lesion" (other views), "instance" (the other augmentation), None (no L_con)
    negatives: str = "all"     # "all" | "none" | "other-class" | "same-class" (which other lesions repel)


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("Baseline", None),
    "ir": Variant("IR", "instance"),
    "lr": Variant("LR", "lesion"),
    "lr-": Variant("LR(-)", "lesion", "none"),
    "lr-sc": Variant("LR(-SC)", "lesion", "other-class"),   # same-class negatives removed
    "lr-dc": Variant("LR(-DC)", "lesion", "same-class"),    # different-class negatives removed
}
TABLE1, TABLE2 = ("baseline", "ir", "lr"), ("lr-", "lr-sc", "lr-dc", "lr")

# The paper's numbers (mean ± std %, 5-fold CV on 5,911 in-house images of 2,131 lesions).
PAPER = pd.DataFrame.from_dict({
    "Baseline": ["94.7 ± 1.7", "86.3 ± 1.7", "92.6 ± 3.8", "87.6 ± 2.6", "76.3 ± 5.1", "89.9 ± 1.4", "59.9 ± 4.6"],
    "IR": ["93.9 ± 1.7", "84.5 ± 2.6", "86.6 ± 8.6", "90.3 ± 5.6", "80.8 ± 12.6", "88.0 ± 2.6", "63.3 ± 7.9"],
    "LR": ["96.2 ± 1.0", "89.1 ± 1.9", "92.3 ± 3.7", "91.5 ± 2.4", "83.1 ± 5.5", "91.8 ± 1.4", "52.7 ± 4.1"],
    "LR(-)": ["94.9 ± 1.3", "86.1 ± 1.2", "91.4 ± 4.2", "88.2 ± 2.9", "76.0 ± 6.2", "89.7 ± 1.0", "—"],
    "LR(-SC)": ["95.0 ± 1.4", "86.6 ± 1.2", "91.9 ± 3.1", "88.4 ± 1.9", "76.5 ± 4.1", "90.1 ± 1.0", "—"],
    "LR(-DC)": ["95.6 ± 1.1", "88.3 ± 1.8", "91.6 ± 2.9", "90.9 ± 1.7", "81.9 ± 3.9", "91.2 ± 1.3", "—"],
}, orient="index", columns=list(METRICS))


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown lesion-recognition variant {name!r}; choose one of {', '.join(VARIANTS)}") from None


# --------------------------------------------------------------------------- eqs. 2-3: pairs and loss

def pair_masks(ids: torch.Tensor, classes: torch.Tensor, negatives: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(P, N): boolean (n, n) masks of eq. 3's positive and negative pairs of each anchor (row).

    Positives share the anchor's id (lesion for LR, image for IR), itself excluded;
    negatives have another id, all of them or only those of the other ("other-class")
    or the same ("same-class") benign/malignant class, or none. pytorch-metric-learning
    derives pairs from one label only, so the class-restricted ablations need these masks.
    """
    same = ids[:, None] == ids[None, :]
    pos = same & ~torch.eye(len(ids), dtype=torch.bool)
    neg = ~same
    if negatives == "none":
        neg = torch.zeros_like(neg)
    elif negatives in ("other-class", "same-class"):
        same_class = classes[:, None] == classes[None, :]
        neg &= ~same_class if negatives == "other-class" else same_class
    elif negatives != "all":
        raise UsageError(f"negatives {negatives!r}: use all, none, other-class or same-class")
    return pos, neg


class _SupConEq2(SupConLoss):
    """SupConLoss that keeps eq. 2 when no pair is negative (LR(−)), where pytorch-metric-learning returns 0."""

    def _compute_loss(self, mat, pos_mask, neg_mask):
        if pos_mask.bool().any() and not neg_mask.bool().any():
            neg_mask = pos_mask  # its denominator runs over pos | neg = P(i): eq. 2 with N(i) empty
        return super()._compute_loss(mat, pos_mask, neg_mask)


def contrastive_loss(z: torch.Tensor, ids: torch.Tensor, classes: torch.Tensor, negatives: str = "all",
                     temperature: float = 1.0) -> torch.Tensor:
    """Eq. 2 over features z (n, d): −mean over anchors and their positives of log softmax of cos(z_i, z_j)/τ,
    the softmax over P(i) ∪ N(i); the mean runs over all n anchors, as eq. 2's 1/N_b (one without a positive
    adds 0; SupConLoss's default reducer would leave out every zero term)."""
    pos, neg = pair_masks(ids, classes, negatives)
    loss = _SupConEq2(temperature=temperature, reducer=MeanReducer())
    return loss(z, indices_tuple=(*torch.where(pos), *torch.where(neg)))


# --------------------------------------------------------------------------- the network and its training

class LesionNet(torch.nn.Module):
    """f_θ (a timm backbone up to its pooled features) and g_φ (its linear classifier): forward gives (z, logits)."""

    def __init__(self, backbone: str):
        super().__init__()
        self.net = create_backbone(backbone, {}, num_classes=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return z, self.net.get_classifier()(z)


@contextmanager
def _sampler_seed(seed: int) -> Iterator[None]:
    """pytorch-metric-learning draws from its module-level NUMPY_RANDOM; seed it for one use, then restore."""
    saved = pml_common.NUMPY_RANDOM
    pml_common.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        yield
    finally:
        pml_common.NUMPY_RANDOM = saved


def lesion_batches(lesion_codes: np.ndarray, lesions: int, views: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of `lesions` × `views` image indices (MPerClassSampler, lesion = class); a lesion with
    fewer than `views` images repeats some of them (the sampler draws with replacement then)."""
    n_lesions = len(np.unique(lesion_codes))
    if n_lesions < lesions:
        raise DataError(f"{n_lesions} lesions to train on, but a batch holds {lesions}; use more data")
    size = lesions * views
    sampler = MPerClassSampler(np.asarray(lesion_codes), m=views, batch_size=size, length_before_new_iter=steps * size)
    with _sampler_seed(seed):
        order = list(iter(sampler))
    return list(torch.tensor(order).split(size))


def fit(variant: str, images: torch.Tensor, y: np.ndarray, lesion_codes: np.ndarray,
        settings: LesionRecognitionSettings, seed: int = 0) -> LesionNet:
    """Train a LesionNet from scratch with eq. 4 (L_cls alone for the baseline) on (N, 1, S, S) images."""
    spec = get_variant(variant)
    torch.manual_seed(seed)
    net = LesionNet(settings.backbone).train()
    transform = classification_augment(settings.input_size)
    labels, codes = torch.as_tensor(y, dtype=torch.int64), torch.as_tensor(lesion_codes, dtype=torch.int64)

    def loss(index: torch.Tensor) -> torch.Tensor:
        z, logits = net(augment_batch(images[index], transform))
        total = F.cross_entropy(logits, labels[index])
        if spec.positives == "instance":  # IR: the image's second augmentation (and any repeat of it) is positive
            z2, _ = net(augment_batch(images[index], transform))
            z, ids, classes = torch.cat([z, z2]), index.repeat(2), labels[index].repeat(2)
        else:
            ids, classes = codes[index], labels[index]
        if spec.positives is not None:
            total = total + settings.alpha * contrastive_loss(z, ids, classes, spec.negatives, settings.temperature)
        return total

    batches = lesion_batches(lesion_codes, settings.lesions_per_batch, settings.views_per_lesion, settings.steps, seed)
    train_loop(net.parameters(), lambda epoch: batches, loss, 1, settings.lr, settings.weight_decay)
    return net.eval()


@torch.no_grad()
def predict_proba(net: LesionNet, images: torch.Tensor) -> np.ndarray:
    """P(malignant) per image, unaugmented."""
    net.eval()
    return torch.cat([net(x)[1].softmax(dim=1)[:, 1] for x in images.split(PREDICT_BATCH)]).numpy()


# --------------------------------------------------------------------------- data

def lesion_rows(df: pd.DataFrame, source: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, y): the benign/malignant rows of a manifest whose lesions LR can use.

    LR needs a `lesion_id` on every lesion image, one pathology per lesion, and some
    lesion seen in at least two views; anything else is a DataError naming the manifest.
    """
    source = source or df.attrs.get("source", "manifest")
    if "lesion_id" not in df.columns:
        raise DataError(f"{source}: lesion recognition needs a lesion_id column (which images show the same "
                        "lesion); the manifest has none")
    rows, y = Task.parse("benign-malignant").select(df, source)
    rows = rows.reset_index(drop=True)
    ids = rows["lesion_id"].astype(str).str.strip()
    blank = np.flatnonzero(rows["lesion_id"].isna().to_numpy() | ids.isin(["", "nan"]).to_numpy())
    if len(blank):
        raise DataError(f"{source}: {len(blank)} lesion image(s) have an empty lesion_id, e.g. image "
                        f"{rows['image'].iloc[blank[0]]}; give every lesion image its lesion's id")
    mixed = pd.Series(y).groupby(ids.to_numpy()).nunique()
    if (mixed > 1).any():
        raise DataError(f"{source}: lesion_id {mixed[mixed > 1].index[0]!r} has both benign and malignant images; "
                        "one lesion has one pathology")
    if ids.value_counts().max() < 2:
        raise DataError(f"{source}: every lesion has a single view ({ids.nunique()} lesions, one image each); "
                        "lesion recognition needs lesions seen in two or more views")
    return rows.assign(lesion_id=ids), y


# --------------------------------------------------------------------------- metrics (Tables 1-2)

def inner_lesion_mcr(y: np.ndarray, pred: np.ndarray, lesion_ids: Sequence) -> float:
    """MCR (§3.2): W/N of each lesion (misclassified / all its images), averaged over the lesions with at least
    one misclassified image; NaN when no image is misclassified (an empty average)."""
    per_lesion = pd.Series(np.asarray(pred) != np.asarray(y)).groupby(np.asarray(lesion_ids)).mean()
    wrong = per_lesion[per_lesion > 0]
    return float(wrong.mean()) if len(wrong) else float("nan")


def lesion_metrics(y: np.ndarray, proba: np.ndarray, lesion_ids: Sequence, threshold: float = 0.5
                   ) -> dict[str, float]:
    """The columns of Tables 1–2 (fractions, not %): AUC, and at `threshold` ACC, sensitivity, precision,
    specificity, F1 and MCR."""
    y, pred = np.asarray(y).astype(int), (np.asarray(proba) >= threshold).astype(int)
    return {"auc": float(roc_auc_score(y, proba)), "acc": accuracy_score(y, pred),
            "sensitivity": recall_score(y, pred, zero_division=0.0),
            "precision": precision_score(y, pred, zero_division=0.0),
            "specificity": recall_score(y, pred, pos_label=0, zero_division=0.0),
            "f1": f1_score(y, pred, zero_division=0.0), "mcr": inner_lesion_mcr(y, pred, lesion_ids)}


# --------------------------------------------------------------------------- 5-fold cross-validation (§3.1)

def patient_folds(rows: pd.DataFrame, y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of k folds grouped by patient and stratified by pathology (sklearn)."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups=rows["patient_id"].astype(str)))


def cross_validate(df: pd.DataFrame, variants: Sequence[str], profile: str, seed: int = 0,
                   extra: pd.DataFrame | None = None, arm: str = "real", progress: bool = False) -> pd.DataFrame:
    """One row per (variant, fold): the test fold's metrics after training on the other folds.

    `extra` (e.g. generated multi-view lesions) joins every fold's training set,
    never its test set; where it has a `source_lesion` column (the real lesion
    whose conditions made it), rows made from a test-fold lesion are left out of
    that fold. `arm` names the setting in the table.
    """
    settings = get_lesion_recognition(profile)
    for v in variants:
        get_variant(v)
    rows, y = lesion_rows(df)
    images = as_inputs(rows, settings.input_size)
    codes = pd.factorize(rows["lesion_id"])[0]
    if extra is not None:
        extra_rows, extra_y = lesion_rows(extra)
        extra_images = as_inputs(extra_rows, settings.input_size)
        extra_codes = pd.factorize(extra_rows["lesion_id"])[0] + codes.max() + 1
    records = []
    for fold, (train, test) in enumerate(patient_folds(rows, y, settings.folds, seed)):
        x, t, c = images[train], y[train], codes[train]
        if extra is not None:
            keep = ~extra_rows.get("source_lesion", pd.Series("", index=extra_rows.index)).isin(
                rows["lesion_id"].iloc[test]).to_numpy()
            x, t = torch.cat([x, extra_images[keep]]), np.concatenate([t, extra_y[keep]])
            c = np.concatenate([c, extra_codes[keep]])
        for v in variants:
            net = fit(v, x, t, c, settings, seed=seed + fold)
            metrics = lesion_metrics(y[test], predict_proba(net, images[test]), rows["lesion_id"].iloc[test])
            records.append({"arm": arm, "variant": v, "fold": fold, "n_train": len(t), "n_test": len(test), **metrics})
            if progress:
                print(f"{arm} · {VARIANTS[v].label} · fold {fold}: AUC {metrics['auc']:.3f}", flush=True)
    return pd.DataFrame(records)


def summary_table(table: pd.DataFrame, variants: Sequence[str] = tuple(VARIANTS)) -> pd.DataFrame:
    """Mean ± std (%) over folds per variant, formatted as the paper's tables, rows named as there."""
    rows = {}
    for v in variants:
        part = table[table["variant"] == v]
        if len(part):
            rows[VARIANTS[v].label] = {m: f"{100 * part[m].mean():.1f} ± {100 * part[m].std(ddof=1):.1f}"
                                       for m in METRICS}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(METRICS))


def paired_test(table: pd.DataFrame, a: str = "lr", b: str = "baseline", by: str = "variant",
                level: float = 0.95) -> pd.DataFrame:
    """Per metric: the fold-paired difference a − b (values of column `by`) with its t CI, paired t-test and
    Wilcoxon p across folds.

    Folds pair the two because both train and test on the same split; give `table`
    one arm (by="variant") or one variant (by="arm"). A fold where either MCR is NaN
    (no misclassified image) is left out of the MCR row.
    """
    out = {}
    for m in METRICS:
        pair = table[table[by].isin([a, b])].pivot_table(index="fold", columns=by, values=m).dropna()
        if a not in pair or b not in pair or len(pair) < 2:
            raise UsageError(f"paired test of {a} vs {b} on {m}: needs both on >= 2 common folds")
        out[m] = {"n_folds": len(pair), f"mean_{a}": pair[a].mean(), f"mean_{b}": pair[b].mean(),
                  **paired_differences(pair[a].to_numpy(), pair[b].to_numpy(), level)}
    return pd.DataFrame.from_dict(out, orient="index")
