"""``smn report``: one command, from the ledger alone, to a results page a co-author can open.

    smn report RESULTS [--experiment NAME] [--out DIR]

writes ``DIR/report.md``, a self-contained ``DIR/report.html`` (figures embedded as data URIs, no
network) and ``DIR/figures/<experiment>-<figure>.png``. For every experiment under ``RESULTS``:

* what was run: methods, backbones, datasets, seeds, grid axes, the resolved config keys that all its
  cells share (the spec, as the ledger recorded it), and per method and setting its resolved config as the
  keys that differ from the defaults (:func:`orchestrator.reports.settings.method_settings`);
* each setting's mean with its 95 % interval and, under it, one row per seed
  (:func:`orchestrator.reports.tables.per_seed_frame`); cells of different settings are never pooled;
* every registered table layout (:func:`orchestrator.reports.registry.tables`) that its cells support, i.e. that
  builds a non-empty table from them, with mean ± std over seeds, and every registered figure that
  draws from them (a layout or figure the cells do not support is left out, not shown empty);
* per-epoch training curves (loss, density, code entropy) where :mod:`orchestrator.results.curves` stored them;
* failed cells (failure records) and cells whose SwAV training collapsed;
* at the top, the scorecard: the paper's qualitative claims scored against these ledgers
  (:mod:`orchestrator.reports.scorecard`);
* the environment: package versions, the host, when the page was made, and the hosts / smn versions
  that wrote the ledger.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import importlib.util
import json
import platform
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

import smn_core

from orchestrator.results import ledger
from orchestrator.reports import registry as reports
from orchestrator.results.curves import read_curves
from orchestrator.reports.scorecard import scorecard
from orchestrator.reports.settings import method_settings
from orchestrator.reports.tables import per_seed_frame
from orchestrator.spec.keys import flatten
from orchestrator.results.layout import ExperimentLayout, filesystem

__all__ = ["ExperimentSection", "collect", "build_report", "environment", "ls_frame", "related", "RELATED",
           "applicable_tables"]


@dataclass
class ExperimentSection:
    """What the report shows for one experiment."""

    name: str
    summary: dict[str, str]
    shared_config: dict[str, object]
    tables: list[tuple[str, str, pd.DataFrame]] = field(default_factory=list)  # (name, title, frame)
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (name, title, png)
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)
    collapsed: pd.DataFrame = field(default_factory=pd.DataFrame)
    also: list[str] = field(default_factory=list)  # other layouts that build from these cells
    settings: pd.DataFrame = field(default_factory=pd.DataFrame)  # per method and setting: what ran
    per_seed: pd.DataFrame = field(default_factory=pd.DataFrame)  # each setting's mean, its seeds under it


def environment(df: pd.DataFrame | None = None) -> dict[str, str]:
    """Versions (Python, torch, Ray, pandas, smn), host, platform and time of this report, plus the hosts
    and smn versions recorded in the ledger rows ``df``."""
    env = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(),
           "platform": platform.platform(), "python": sys.version.split()[0]}
    env["smn"] = smn_core.__version__
    for mod in ("torch", "ray", "pandas", "pyarrow"):
        env[mod] = _version(mod)
    if df is not None and not df.empty:
        env["ledger written on"] = ", ".join(sorted(df["host"].unique()))
        env["ledger smn versions"] = ", ".join(sorted(df["smn_version"].unique()))
        env["cells finished"] = f"{df['finished_at'].min():%Y-%m-%d %H:%M} .. {df['finished_at'].max():%Y-%m-%d %H:%M} UTC"
    return env


def _version(package: str) -> str:
    """``package``'s version without importing it (``smn report`` loads neither torch nor ray): the
    ``__version__`` line of its ``version.py`` (where torch keeps its build tag, e.g. ``+cu130``), else its
    installed distribution's version; ``"not installed"`` when it is not."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return "not installed"
    for folder in spec.submodule_search_locations or ():
        path = Path(folder) / "version.py"
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(encoding="utf-8"), re.M) \
            if path.is_file() else None
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _summary(df: pd.DataFrame) -> tuple[dict[str, str], dict[str, object]]:
    cells = df.drop_duplicates("cell_id")
    grids = [json.loads(g) for g in cells["grid_json"]]
    axes = sorted({k for g in grids for k in g})
    summary = {
        "cells": str(len(cells)),
        "methods": ", ".join(sorted(cells["method"].unique())),
        "backbones": ", ".join(sorted(cells["backbone"].unique())),
        "datasets": ", ".join(sorted(cells["dataset"].unique())),
        "seeds": ", ".join(str(s) for s in sorted(cells["seed"].unique())),
        "grid axes": ", ".join(f"{a} ∈ {{{', '.join(sorted({str(g[a]) for g in grids if a in g}))}}}" for a in axes)
        or "-",
        "last update": f"{df['finished_at'].max():%Y-%m-%d %H:%M} UTC",
    }
    configs = [flatten(json.loads(c)) for c in cells["config_json"]]
    shared = {}
    if configs:
        for k, v in sorted(configs[0].items()):
            if all(c.get(k, object()) == v for c in configs[1:]):
                shared[k] = v
    return summary, shared


RELATED = {
    "table1": ("table1",), "clip": ("table1",), "fig3": ("lowshot", "fig3"), "fig5": ("invariance", "fig5"),
    "table8": ("table8", "sparsity_blocks", "fig6", "fig7"), "table3": ("table3", "fig11"),
    "appF": ("fig8", "fig9"), "storage": ("table6", "table7"), "table10": ("table10",), "table2": ("table2",),
    "table5a": ("table5a",), "table5b": ("table5b",), "table5c": ("table5c",), "appE": ("appE",),
    "recipe": ("vs_frozen_val",),
}
"""Which registered layouts and figures an experiment shows in full, by the first word of its name (the
paper specs' naming: ``table2_masking_small`` -> Table 2). The generic ``results`` table, ``vs_frozen``
(when the experiment has the frozen backbone beside an adapted method) and the training curves are always
shown; any other layout that builds from the cells is listed with its command."""


def related(experiment: str) -> tuple[str, ...]:
    """Layout and figure names shown in full for ``experiment`` (see :data:`RELATED`)."""
    head = experiment.split("_")[0]
    return ("results", "vs_frozen") + RELATED.get(head, RELATED.get(experiment, ()))


def applicable_tables(df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """``(name, description, frame)`` of every registered table layout that builds a non-empty frame from the
    ledger rows ``df``, in the registry's (alphabetical) order; a layout that raises on these cells does not
    apply to them and is left out (its warnings are silenced)."""
    out = []
    for layout in reports.tables().values():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frame = layout.build(df)
        except Exception:  # noqa: BLE001 - a layout the cells do not support is left out
            continue
        if frame is not None and not frame.empty:
            out.append((layout.name, layout.description, frame))
    return out


def _applicable_figures(df: pd.DataFrame, experiment: str, folder: Path, wanted: set[str]) -> list[tuple[str, str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for fig in reports.figures().values():
        if fig.name not in wanted:
            continue
        path = folder / f"{experiment}-{fig.name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig.draw(df, str(path))
        except Exception:  # noqa: BLE001 - a figure the cells do not support is left out
            plt.close("all")
            path.unlink(missing_ok=True)
            continue
        if path.exists() and path.stat().st_size > 0:
            out.append((fig.name, fig.description, path))
    curves = _curves_figure(df, experiment, folder / f"{experiment}-curves.png")
    if curves is not None:
        out.append(("curves", "Training curves per cell: SwAV loss, mask density and code entropy per epoch", curves))
    return out


def _curves_figure(df: pd.DataFrame, experiment: str, path: Path) -> Path | None:
    results = df.attrs.get("results")
    if not results:
        return None
    cells = df.drop_duplicates("cell_id")[["cell_id", "method", "seed", "grid_json"]]
    lay = ExperimentLayout.of(results, experiment)
    found = []
    for row in cells.itertuples(index=False):
        c = read_curves(lay, row.cell_id)
        if c is not None and len(c):
            found.append((f"{row.method} s{row.seed} {row.cell_id[:6]}", c))
    if not found:
        return None
    import matplotlib.pyplot as plt

    quantities = [q for q in ("loss", "density", "code_entropy") if any(q in c.columns for _, c in found)]
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.2), squeeze=False)
    for ax, q in zip(axes[0], quantities):
        for label, c in found[:12]:
            if q in c.columns:
                ax.plot(c["epoch"] + 1, c[q], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(q.replace("_", " "))
    axes[0][0].legend(fontsize=7)
    reports.save_figure(fig, str(path))
    return path


def collect(results: str, experiment: str, figures_dir: Path) -> ExperimentSection:
    """Everything the report shows for ``experiment`` (figures are drawn into ``figures_dir``)."""
    df = ledger.read_ledger(results, experiment)
    failures = ledger.read_failures(results, experiment)
    fail_frame = pd.DataFrame([{"cell_id": cid, "label": r.get("label", ""), "attempts": r.get("attempts", ""),
                                "error": str(r.get("error", "")).strip().splitlines()[-1][:200] if r.get("error") else ""}
                               for cid, r in sorted(failures.items())])
    if df.empty:
        return ExperimentSection(experiment, {"cells": "0"}, {}, failures=fail_frame)
    summary, shared = _summary(df)
    collapsed_ids = set(df[(df["metric"] == "collapsed") & (df["value"] > 0)]["cell_id"])
    first = df.drop_duplicates("cell_id").set_index("cell_id")
    wide = df.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first")
    collapsed = pd.DataFrame([{"cell_id": cid, "method": first.at[cid, "method"], "seed": int(first.at[cid, "seed"]),
                               "train_loss": round(float(wide.at[cid, "train_loss"]), 4) if "train_loss" in wide else None,
                               "code_entropy": round(float(wide.at[cid, "code_entropy"]), 3) if "code_entropy" in wide else None}
                              for cid in sorted(collapsed_ids)])
    shown = related(experiment)
    tables = applicable_tables(df)
    tables.sort(key=lambda t: shown.index(t[0]) if t[0] in shown else len(shown))
    wanted = {n for n in shown if n in reports.figures()}
    return ExperimentSection(experiment, summary, shared, [t for t in tables if t[0] in shown],
                             _applicable_figures(df, experiment, figures_dir, wanted), fail_frame, collapsed,
                             [t[0] for t in tables if t[0] not in shown], method_settings(df), per_seed_frame(df))


SCORECARD_TITLE = "Scorecard: the paper's claims against these ledgers"
SCORECARD_RULE = ("Differences in accuracy points between cells of one experiment, paired over seeds (or test images "
                  "and seeds), 95 % interval; holds = every interval above 0, does not = one below, inconclusive "
                  "otherwise (single-seed evidence is shown without a vote).")


def _markdown(sections: list[ExperimentSection], env: dict[str, str], results: str, out: Path,
              card: pd.DataFrame | None = None) -> str:
    lines = [f"# smn report: {results}", "",
             f"{len(sections)} experiment(s): " + ", ".join(s.name for s in sections), ""]
    if card is not None and not card.empty:
        lines += [f"## {SCORECARD_TITLE}", "", SCORECARD_RULE, "", reports.render_frame(card, "markdown"), ""]
    for s in sections:
        lines += [f"## {s.name}", ""]
        lines += [pd.DataFrame({"": list(s.summary), "value": list(s.summary.values())}).to_markdown(index=False), ""]
        if s.shared_config:
            lines += ["<details><summary>resolved config shared by every cell</summary>", "", "```",
                      *(f"{k}: {v}" for k, v in s.shared_config.items()), "```", "</details>", ""]
        if not s.settings.empty:
            lines += ["### What ran: each method's settings, as differences from the defaults", "",
                      reports.render_frame(s.settings, "markdown"), ""]
        if not s.per_seed.empty:
            lines += ["### Each setting's mean [95 % interval] and its seeds", "",
                      reports.render_frame(s.per_seed, "markdown"), ""]
        for name, title, frame in s.tables:
            lines += [f"### {title}", "", f"`smn table {results} --experiment {s.name} --layout {name}`", "",
                      reports.render_frame(frame, "markdown"), ""]
        if s.also:
            lines += ["Other layouts that build from these cells: " + ", ".join(f"`{a}`" for a in s.also)
                      + f" (`smn table {results} --experiment {s.name} --layout NAME`)", ""]
        for name, title, png in s.figures:
            lines += [f"### {title}", "", f"![{name}]({png.relative_to(out).as_posix()})", ""]
        lines += ["### Failed cells", "", reports.render_frame(s.failures, "markdown") if not s.failures.empty
                  else "none", "", "### Collapsed cells (SwAV)", "",
                  reports.render_frame(s.collapsed, "markdown") if not s.collapsed.empty else "none", ""]
    lines += ["## Environment", "", pd.DataFrame({"": list(env), "value": list(env.values())}).to_markdown(index=False)]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left}td{text-align:left;white-space:nowrap}.scroll{overflow-x:auto}img{max-width:100%;border:1px solid #eee}
code,pre{background:#f6f6f6;padding:2px 4px}h2{border-bottom:2px solid #333;margin-top:2em}.none{color:#777}"""


def _html_table(frame: pd.DataFrame, cls: str) -> str:
    flat = reports.flat_frame(frame)
    table = flat.astype(object).where(flat.notna(), "-").to_html(index=False, escape=True, classes=cls, border=0)
    return f'<div class="scroll">{table}</div>'


def _html_note(frame: pd.DataFrame) -> str:
    note = frame.attrs.get("note", "")
    return "".join(f'<p class="note">Note: {html.escape(line)}</p>' for line in note.splitlines())


def _html(sections: list[ExperimentSection], env: dict[str, str], results: str,
          card: pd.DataFrame | None = None) -> str:
    e = html.escape
    body = [f"<h1>smn report: {e(results)}</h1>",
            f"<p>{len(sections)} experiment(s): " + ", ".join(f'<a href="#{e(s.name)}">{e(s.name)}</a>' for s in sections)
            + "</p>"]
    if card is not None and not card.empty:
        body.append(f'<section id="scorecard"><h2>{e(SCORECARD_TITLE)}</h2><p>{e(SCORECARD_RULE)}</p>'
                    + _html_table(card, "scorecard") + "</section>")
    for s in sections:
        body.append(f'<section class="experiment" id="{e(s.name)}"><h2>{e(s.name)}</h2>')
        body.append(_html_table(pd.DataFrame({"": list(s.summary), "value": list(s.summary.values())}), "summary"))
        if s.shared_config:
            body.append("<details><summary>resolved config shared by every cell</summary><pre>"
                        + e("\n".join(f"{k}: {v}" for k, v in s.shared_config.items())) + "</pre></details>")
        if not s.settings.empty:
            body.append("<h3>What ran: each method's settings, as differences from the defaults</h3>"
                        + _html_table(s.settings, "settings"))
        if not s.per_seed.empty:
            body.append("<h3>Each setting's mean [95 % interval] and its seeds</h3>"
                        + _html_table(s.per_seed, "per-seed") + _html_note(s.per_seed))
        for name, title, frame in s.tables:
            body.append(f'<h3>{e(title)}</h3><p><code>smn table {e(results)} --experiment {e(s.name)} --layout '
                        f'{e(name)}</code></p>' + _html_table(frame, f"smn-table layout-{name}") + _html_note(frame))
        if s.also:
            body.append('<p class="also">Other layouts that build from these cells: ' + ", ".join(
                f"<code>{e(a)}</code>" for a in s.also) + f" (<code>smn table {e(results)} --experiment {e(s.name)} "
                "--layout NAME</code>)</p>")
        for name, title, png in s.figures:
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f'<h3>{e(title)}</h3><img class="smn-figure" alt="{e(name)}" '
                        f'src="data:image/png;base64,{data}">')
        body.append("<h3>Failed cells</h3>" + (_html_table(s.failures, "failures") if not s.failures.empty
                                               else '<p class="none">none</p>'))
        body.append("<h3>Collapsed cells (SwAV)</h3>" + (_html_table(s.collapsed, "collapsed")
                                                        if not s.collapsed.empty else '<p class="none">none</p>'))
        body.append("</section>")
    body.append("<h2>Environment</h2>" + _html_table(pd.DataFrame({"": list(env), "value": list(env.values())}),
                                                     "environment"))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>smn report</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_RENDER_CHECK}</script></body></html>\n")


_RENDER_CHECK = """window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-rendered', good ? imgs[i].naturalWidth + 'x' + imgs[i].naturalHeight : 'no');
    if (good) ok++;
  }
  document.body.setAttribute('data-figures-rendered', ok + '/' + imgs.length);
});"""
"""A few lines of script in the page: after loading, each figure gets ``data-rendered="WxH"`` (or ``no``) and
the body ``data-figures-rendered="k/n"``, so a headless browser's DOM dump shows whether the figures decoded."""


def _experiments_with_anything(results: str) -> list[str]:
    """Experiments with a ledger folder, or with failure records only (every cell failed)."""
    fs, root = filesystem(results)
    names = set(ledger.list_experiments(results))
    for fi in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = fi.path.rstrip("/").rsplit("/", 1)[-1]
        if fi.type != pafs.FileType.Directory or name in names or not ledger.is_plain_name(name):
            continue
        if fs.get_file_info(ExperimentLayout.of(results, name).failures_dir).type == pafs.FileType.Directory:
            names.add(name)
    return sorted(names)


def build_report(results: str, out: str | None = None, experiment: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` for the experiments under ``results``.

    Args:
        results: results folder or URI (the ledger is the only input).
        out: output folder (default ``<results>/report`` for a local results folder, ``./report`` for a URI).
        experiment: only this experiment (default: every one found).

    Returns:
        The folder written.

    Raises:
        ValueError: if ``results`` holds no experiment (or not ``experiment``).
    """
    names = [experiment] if experiment else _experiments_with_anything(results)
    if experiment and experiment not in _experiments_with_anything(results):
        raise ValueError(f"no experiment {experiment!r} under {results!r}; found: "
                         f"{', '.join(_experiments_with_anything(results)) or 'none'}")
    if not names:
        raise ValueError(f"no experiment under {results!r}: no ledger folder (<results>/<experiment>/ledger) found")
    folder = Path(out) if out else (Path("report") if "://" in str(results) else Path(results) / "report")
    figures = folder / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections = [collect(results, name, figures) for name in names]
    all_rows = ledger.read_ledger(results, experiment)
    env = environment(all_rows)
    card = scorecard(all_rows)
    (folder / "report.md").write_text(_markdown(sections, env, str(results), folder, card), encoding="utf-8")
    (folder / "report.html").write_text(_html(sections, env, str(results), card), encoding="utf-8")
    return folder


def ls_frame(results: str) -> pd.DataFrame:
    """``smn ls``: one row per experiment under ``results``: cells done, failed, collapsed, last update (UTC),
    methods and seeds."""
    rows = []
    for name in _experiments_with_anything(results):
        df = ledger.read_ledger(results, name, columns=["cell_id", "experiment", "method", "seed", "metric", "value",
                                                        "finished_at"])  # not the configs: the bulk of the bytes
        failed = ledger.read_failures(results, name)
        collapsed = df[(df["metric"] == "collapsed") & (df["value"] > 0)]["cell_id"].nunique() if len(df) else 0
        rows.append({"experiment": name, "done": int(df["cell_id"].nunique()) if len(df) else 0,
                     "failed": len(failed), "collapsed": int(collapsed),
                     "last_update": (f"{df['finished_at'].max():%Y-%m-%d %H:%M:%S}" if len(df) else None),
                     "methods": ", ".join(sorted(df["method"].unique())) if len(df) else "",
                     "seeds": ", ".join(str(s) for s in sorted(df["seed"].unique())) if len(df) else ""})
    return pd.DataFrame(rows, columns=["experiment", "done", "failed", "collapsed", "last_update", "methods", "seeds"])
