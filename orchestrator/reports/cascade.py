"""Table 3 (the self-masking cascade) and Fig. 11 (cluster homogeneity), rebuilt from the ledger.

Registered with :mod:`orchestrator.reports.registry`: ``smn table DIR --layout table3`` and
``smn plot DIR --figure fig11``. Rows come from ``orchestrator.engine.cascade``: the dispatchers (``smn``
cells named by a cascade's ``dispatcher_cell_id``), ``cascade_conditional`` /
``cascade_unconditional`` cells, and ``cascade_router`` cells (cluster homogeneity).
"""

from __future__ import annotations

import json
import re

import pandas as pd

from orchestrator.results import ledger
from orchestrator.reports.registry import mean_std, register_figure, register_table, save_figure

__all__ = ["table3", "fig11"]

_ROWS = (("dispatcher", "Self-masking"),
         ("control", "Self-masking, projected alike (control)"),
         ("cascade_conditional", "Self-masking + cascade (conditional)"),
         ("cascade_unconditional", "Self-masking + cascade (unconditional)"))


def _wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, one column per metric (plus dataset)."""
    w = ledger.wide(rows)
    return w.drop(columns=[c for c in ledger.META_COLUMNS if c != "dataset"])


@register_table("table3", "Table 3: self-masking cascade (storage, forward passes, k-NN and linear probe)")
def table3(df: pd.DataFrame) -> pd.DataFrame:
    """Table 3 from ledger rows: one row per method (dispatcher alone; the dispatcher alone centred,
    projected and scaled like the cascades, a control the paper does not have; conditional and
    unconditional cascade), columns Storage (masks x beta/32, beta = the backbone in fp32, and the measured fraction
    of beta), forward passes per image, and per dataset k-NN and linear-probe top-1 (mean ± std over
    seeds when there are several). Empty when the ledger holds no cascade."""
    combos = df[df["method"].isin(["cascade_conditional", "cascade_unconditional"])]
    if combos.empty:
        return pd.DataFrame()
    dispatcher_ids = {json.loads(c).get("dispatcher_cell_id") for c in combos["config_json"].unique()}
    disp = df[df["cell_id"].isin(dispatcher_ids)].copy()
    disp["method"] = "dispatcher"
    wide = _wide(pd.concat([disp, combos]))
    kinds = pd.concat([disp, combos]).drop_duplicates("cell_id").set_index("cell_id")["method"]
    wide["kind"] = wide["cell_id"].map(kinds)
    # control row: the dispatcher alone, projected and scaled like the cascades (from the unconditional rows,
    # or the conditional ones when only those exist)
    src = wide[wide["kind"] == "cascade_unconditional"]
    if src.empty:
        src = wide[wide["kind"] == "cascade_conditional"]
    control = src.copy()
    control["kind"] = "control"
    for m in ("knn_top1", "linear_probe_top1"):
        control[m] = control.get(f"dispatcher_projected_{m}", float("nan"))
    control["storage_beta"] = control["storage_beta"] / control["storage_masks"]
    control["storage_masks"], control["forward_passes"] = 1, 1
    wide = pd.concat([wide, control], ignore_index=True)
    if "storage_beta" not in wide:
        wide["storage_beta"] = float("nan")
    if {"storage_bits", "backbone_params"} <= set(wide.columns):
        is_disp = wide["kind"] == "dispatcher"
        wide.loc[is_disp, "storage_beta"] = wide.loc[is_disp, "storage_bits"] / (32.0 * wide.loc[is_disp, "backbone_params"])
    datasets = sorted(wide["dataset"].unique())
    out = []
    for kind, label in _ROWS:
        sub = wide[wide["kind"] == kind]
        if sub.empty:
            continue
        masks = 1 if kind == "dispatcher" else int(sub["storage_masks"].iloc[0])
        beta = sub["storage_beta"].mean()
        row = {"Method": label,
               "Storage": f"{masks}β/32" + ("" if pd.isna(beta) else f" (={beta:.3f}β)"),
               "Passes": str(1 if kind == "dispatcher" else int(sub["forward_passes"].iloc[0]))}
        for ds in datasets:
            d = sub[sub["dataset"] == ds]
            for metric, name in (("knn_top1", "k-NN"), ("linear_probe_top1", "linear probe")):
                v = d[metric] if metric in d else pd.Series(dtype=float)
                row[f"{ds} {name}"] = mean_std(v.mean(), v.std(), v.count()) if v.count() else "-"
        out.append(row)
    return pd.DataFrame(out).set_index("Method")


_TOP = re.compile(r"^cluster(\d+)_top(\d+)$")


@register_figure("fig11", "Fig. 11: share of each cascade cluster held by its x most common classes (train set)")
def fig11(df: pd.DataFrame, out: str) -> None:
    """Fig. 11 (App. G) from the ``cascade_router`` rows: for each router (one panel per dataset and
    seed) one line per cluster, x = the number of most common classes, y = the share of the cluster's
    train images they hold.

    Raises:
        ValueError: if the ledger holds no cascade router rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    routers = df[(df["method"] == "cascade_router")]
    if routers.empty:
        raise ValueError("the ledger holds no cascade_router rows (run `smn cascade SPEC.yaml` first)")
    cells = routers.drop_duplicates("cell_id")[["cell_id", "dataset", "seed"]].values.tolist()
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, (cid, dataset, seed) in zip(axes[0], cells):
        rows = routers[routers["cell_id"] == cid]
        values = dict(zip(rows["metric"], rows["value"]))
        curves: dict[int, dict[int, float]] = {}
        for metric, v in values.items():
            m = _TOP.match(metric)
            if m:
                curves.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
        for c in sorted(curves):
            xs = sorted(curves[c])
            size = int(values.get(f"cluster{c}_train_size", 0))
            ax.plot(xs, [curves[c][x] for x in xs], marker="o", markersize=3, label=f"cluster {c} ({size} images)")
        ax.set_xlabel("x most common classes")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share of the cluster's train images")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{dataset}, seed {seed} (router {cid[:8]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out)
