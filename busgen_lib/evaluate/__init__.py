"""Evaluation: the paper's statistics and the measurements behind its figures (§4.5, Figs 2–5).

Modules (import them directly; nothing is imported eagerly here, so that
`import busgen_lib.evaluate.stats` stays free of torch):

- `stats`    — bootstrap and Wilson confidence intervals, DeLong's AUC test,
               permutation tests for sensitivity/specificity (§4.5), and the
               comparison of arms trained with several seeds.
- `probes`   — small CNN classifiers and a mini UNet segmenter trained on real
               images, used as judges of generated images.
- `control`  — "does conditioning work?": box, pathology and device control of
               generated images, measured by the probes, with real-data ceilings.
- `phenotype` — a real-data judge of a subtype (DCIS, TNBC-like) and the share of
               generated images it recognises, per model, with McNemar's paired test.
- `memorisation` — nearest training neighbours, near-copy rates against a
               real-data threshold, Fréchet distance in probe features.
- `realism` — Fig 2: cosine similarity of real-data features to the nearest
               training image with a held-out copy threshold, MS-SSIM with it,
               improved precision/recall, and a patient-disjoint classifier
               two-sample test (AUC with bootstrap CI).
- `turing`, `simulated_readers` — visual Turing test statistics from a
               reader-study export; a SIMULATED panel writing that export.
- `cleaning` — a real-data judge removes generated images whose label it contradicts.
- `translation` — device translations checked against the phantom's truth.
- `detection` — AP@0.5 and AP_small (relative-area threshold), bootstrap CIs, paired P.
- `subgroups`, `forest` — AUC per subgroup with CIs, and its forest plot.
- `embeddings` — t-SNE/UMAP maps of model features; NMI, ARI (k-means) and silhouette with bootstrap CIs.
- `saliency` — GradCAM (ViT and CNN) and its share in lesion, margin band and surrounding tissue.
- `scaling`  — data-scaling curves over a training callable (`training`'s contract).
- `shortcut` — device-shortcut (data-acquisition bias) splits, tests and ref. 29's estimate.
- `utility`  — downstream AUC of a classifier trained on a dataset (real,
               generated, cleaned, randomly thinned) on real test images,
               each arm trained with several seeds and tested across them.
"""
