"""Evaluation: the paper's statistics and the measurements behind its figures (§4.5, Figs 2–5).

Modules (import them directly; nothing is imported eagerly here, so that
`import busgen_lib.evaluate.stats` stays free of torch):

- `stats`    — bootstrap and Wilson confidence intervals, DeLong's AUC test,
               permutation tests for sensitivity/specificity (§4.5).
- `probes`   — small CNN classifiers and a mini UNet segmenter trained on real
               images, used as judges of generated images.
- `control`  — "does conditioning work?": box, pathology and device control of
               generated images, measured by the probes, with real-data ceilings.
"""
