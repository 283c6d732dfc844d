"""Forest plot of subgroup AUCs (Supplementary §7): one row per subgroup, point and CI, one column per model."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from busgen_lib.plotting import PALETTE


def forest_plot(tables: Mapping[str, pd.DataFrame], *, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """Subgroup AUCs with CIs of one or more models (name -> `subgroup_auc` table on the same groups).

    Models are drawn side by side within each subgroup row; unscored groups
    keep their row and read "too small", so the figure shows every subgroup.
    """
    names = list(tables)
    groups = list(dict.fromkeys(g for t in tables.values() for g in t["group"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 0.35 * len(groups) + 0.8))
    offsets = np.linspace(-0.2, 0.2, len(names)) if len(names) > 1 else np.zeros(1)
    for name, offset in zip(names, offsets):
        table = tables[name].set_index("group")
        rows = [(i, table.loc[g]) for i, g in enumerate(groups) if g in table.index]
        scored = [(i, r) for i, r in rows if r["status"] == "ok"]
        y = np.array([i + offset for i, _ in scored])
        auc = np.array([r["auc"] for _, r in scored], dtype=float)
        err = np.array([[r["auc"] - r["ci_lo"], r["ci_hi"] - r["auc"]] for _, r in scored], dtype=float)
        err = err.reshape(-1, 2).T
        ax.errorbar(auc, y, xerr=err, fmt="o", ms=3.5, capsize=2, lw=1, color=PALETTE.get(name), label=name)
        for i, r in rows:
            if r["status"] != "ok" and name == names[0]:
                ax.text(0.5, i, "too small", va="center", fontsize=7, color="#999999")
    labels = []
    for g in groups:
        first = tables[names[0]].set_index("group")
        n = f" (n={int(first.loc[g, 'n'])})" if g in first.index else ""
        labels.append(f"{g}{n}")
    ax.set_yticks(range(len(groups)), labels)
    ax.invert_yaxis()
    ax.axvline(0.5, color="#bbbbbb", lw=0.8, ls=":")
    lowest = min([0.4, *(float(t["ci_lo"].min()) for t in tables.values() if t["ci_lo"].notna().any())])
    ax.set_xlim(lowest - 0.02, 1.0)
    ax.set_xlabel("AUC (95% CI)")
    if title:
        ax.set_title(title)
    if len(names) > 1:
        ax.legend(loc="lower left", fontsize=7)
    return ax.figure
