"""Does adaptation beat the frozen backbone it adapts? (layout ``vs_frozen``, printed by ``smn run``)

Every adapted method (SMN, STN, supervised masking, FFT) and the BN control (``pretrained_bn``) set
beside the frozen backbone (``pretrained``) of the same backbone and dataset: the paper's k-NN
(k = 200, T = 0.1), DINO's k-NN (k = 20, T = 0.07) and the linear probe, each as mean ± std over
seeds and as the difference to the frozen backbone in accuracy points, with the number of
collapsed cells. A method that loses to its own baseline shows a negative difference, in plain
sight under the run's table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.reports.baselines import cell_frame
from orchestrator.reports.registry import mean_std, register_table

__all__ = ["vs_frozen", "COMPARED"]

COMPARED = (("knn_top1", "k-NN (k=200)"), ("knn_dino_top1", "k-NN (k=20)"), ("linear_probe_top1", "linear probe"))


def _grid_label(grid_json: str) -> str:
    import json
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(json.loads(grid_json).items()))


@register_table("vs_frozen", "Adapted vs frozen backbone: k-NN (k=200 and k=20), linear probe, difference in "
                "points, collapsed cells")
def vs_frozen(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, dataset, method, grid) with a ``pretrained`` reference.

    Columns: for each metric of :data:`COMPARED`, ``<name>`` (mean ± std over seeds) and
    ``<name> vs frozen`` (mean difference to the frozen backbone, in accuracy points, signed);
    ``collapsed`` (collapsed cells / cells). Empty when the ledger has no ``pretrained`` cell.
    """
    cells = cell_frame(df)
    if cells.empty or "pretrained" not in set(cells["method"]):
        return pd.DataFrame()
    cells = cells.assign(grid=cells["grid_json"].map(_grid_label))
    rows = []
    for (backbone, data), group in cells.groupby(["backbone", "data"], sort=False):
        frozen = group[group["method"] == "pretrained"]
        if frozen.empty:
            continue
        ref = {m: frozen[m].mean() for m, _ in COMPARED if m in frozen}
        row = {"Backbone": backbone, "Dataset": data, "Method": "frozen (pretrained)"}
        for m, name in COMPARED:
            row[name] = mean_std(ref.get(m, np.nan))
            row[f"{name} vs frozen"] = ""
        row["collapsed"] = ""
        rows.append(row)
        for (method, grid), g in group[group["method"] != "pretrained"].groupby(["method", "grid"], sort=False):
            row = {"Backbone": backbone, "Dataset": data, "Method": method + (f" ({grid})" if grid else "")}
            for m, name in COMPARED:
                values = g[m] if m in g else pd.Series(dtype=float)
                row[name] = mean_std(values.mean(), values.std(), values.count())
                diff = 100.0 * (values.mean() - ref.get(m, np.nan))
                row[f"{name} vs frozen"] = "-" if pd.isna(diff) else f"{diff:+.1f}"
            collapsed = g["collapsed"].fillna(0) if "collapsed" in g else pd.Series(0.0, index=g.index)
            row["collapsed"] = f"{int((collapsed > 0).sum())}/{len(g)}" if method in ("smn", "stn") else ""
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index(["Backbone", "Dataset", "Method"])
