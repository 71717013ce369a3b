"""The generated result pages of ``docs/results/`` (``smn report DIR --docs OUT``), and the README's demo table.

Every number about results in README.md and ``docs/`` comes from a ledger committed under ``docs/results/``
(issue 24: "a number in the docs can never drift"). This module renders those ledgers into Markdown:

* one page per experiment, ``OUT/<experiment>.md``: every registered table layout
  (:func:`orchestrator.reports.registry.tables`) that the experiment's cells support, i.e. whose build
  function returns a non-empty frame from them, each rendered by
  :func:`orchestrator.reports.registry.render_frame` (the renderer of ``smn table``);
* an index, ``OUT/README.md``: one line per experiment with its cells, methods and seeds;
* ``OUT/scorecard.md``: the paper's claims scored against all these ledgers
  (:mod:`orchestrator.reports.scorecard`);
* :func:`demo_table`: the table ``smn run experiments/demo.yaml`` prints (the generic ``results`` table and,
  under it, ``vs_frozen``), which README.md carries between :data:`DEMO_START` and :data:`DEMO_END`;
* :func:`fill_generated`: the generated blocks of a Markdown page (``<!-- generated: EXPERIMENT LAYOUT -->``
  ... ``<!-- generated: end -->``), each one layout of one experiment, e.g. in ``docs/recipe.md``.

The pages are deterministic: the same ledger files give the same bytes. Nothing of the machine or the
moment goes in (no generation time, host, or path of the results folder), and duration metrics
(:data:`DURATION_METRICS`: ``wall_s``, ``train_seconds``, ...) are dropped from the rows before any layout
sees them, since they differ from run to run of the same cell. The layouts see the ledger rows alone
(:func:`page_rows`): one that reads masks or states beside the ledger does not apply, so a page depends on
the committed ledger files only. ``tests/test_docs.py`` regenerates every page
from the committed ledgers (and the per-image files beside them) and fails when one differs from the committed
file. Where an experiment's cells stored their per-image correctness (``docs/results/<experiment>/per_image/``,
committed beside ``ledger/``: a few KB a cell), its paired differences are over test images and seeds, else
over seeds.

    python -m orchestrator report docs/results --docs docs/results   # the pages
    python -m orchestrator.reports.docs docs/results --fill README.md docs/recipe.md   # pages + generated blocks
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from orchestrator.reports import registry
from orchestrator.reports.page import applicable_tables
from orchestrator.reports.page import related as page_related
from orchestrator.reports.scorecard import scorecard
from orchestrator.results import ledger, per_image

__all__ = ["DURATION_METRICS", "DEMO_START", "DEMO_END", "DEMO_EXPERIMENT", "GENERATED", "page_rows", "page_tables", "scorecard_page",
           "SCORECARD_PAGE",
           "SPECS", "spec_files", "experiment_page", "index_page", "demo_table", "readme_with_demo", "layout_block", "fill_generated",
           "write_docs"]

DURATION_METRICS = re.compile(r"(?:^wall_s$|seconds|_time$|^time_|_s$)")
"""Metric names (a regular expression) that hold a duration: they change from one run of a cell to the next."""

DEMO_START = "<!-- demo-table:start -->"
DEMO_END = "<!-- demo-table:end -->"
DEMO_EXPERIMENT = "demo"
"""README.md's generated block: the demo's table, between these two markers."""

GENERATED = re.compile(r"(<!-- generated: ([\w.-]+) ([\w.-]+) -->\n)(.*?)(<!-- generated: end -->)", re.S)
"""A generated block of a page: ``<!-- generated: EXPERIMENT LAYOUT -->``, the rendered layout, ``<!-- generated: end -->``."""


def page_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows a page is built from: ``rows`` (ledger rows) without the duration metrics
    (:data:`DURATION_METRICS`) and without ``attrs["results"]``, the results folder that
    :func:`orchestrator.results.ledger.read_ledger` records, so that a layout reading masks or states beside
    the ledger does not apply: a page depends on the ledger files and, where the cells stored them, their
    per-image correctness files (``<experiment>/per_image/``, :mod:`orchestrator.results.per_image`), which the
    paired differences read through ``attrs[per_image.ROOT]`` (the same folder)."""
    keep = ~rows["metric"].astype(str).str.contains(DURATION_METRICS)
    out = rows[keep].reset_index(drop=True)
    out.attrs = {k: v for k, v in rows.attrs.items() if k != "results"}
    root = per_image.root_of(rows.attrs)
    if root:
        out.attrs[per_image.ROOT] = root
    return out


def page_tables(rows: pd.DataFrame, experiment: str = "") -> list[tuple[str, str, pd.DataFrame]]:
    """``(name, description, frame)`` of every registered layout that builds a non-empty frame from ``rows``
    (one experiment's ledger rows, through :func:`page_rows`): first the layouts
    :func:`orchestrator.reports.page.related` names for ``experiment`` (``results``, ``vs_frozen``, its paper
    table), then the others in the registry's (alphabetical) order. A layout that raises on these cells does
    not apply to them and is left out."""
    out = applicable_tables(page_rows(rows))
    first = {name: i for i, name in enumerate(page_related(experiment))}
    return sorted(out, key=lambda t: first.get(t[0], len(first)))


SPECS = Path(__file__).resolve().parents[2] / "experiments"
"""The checkout's spec folder; a page links the spec whose ``name:`` is its experiment."""


def spec_files(folder: Path = SPECS) -> dict[str, str]:
    """``{experiment name: spec file name}`` of the YAML specs in ``folder`` (their ``name:`` key; a file that
    does not parse, or has no name, is left out)."""
    import yaml

    out = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            continue
        if isinstance(name, str):
            out.setdefault(name, path.name)
    return out


def _cells_line(rows: pd.DataFrame) -> str:
    cells = rows.drop_duplicates("cell_id")
    methods = ", ".join(f"`{m}`" for m in sorted(cells["method"].unique()))
    seeds = ", ".join(str(int(s)) for s in sorted(cells["seed"].unique()))
    return f"{len(cells)} cells; methods {methods}; seeds {seeds}"


def experiment_page(rows: pd.DataFrame, experiment: str, results_label: str = "docs/results",
                    tables: list[tuple[str, str, pd.DataFrame]] | None = None) -> str:
    """The Markdown page of one experiment: a header, then every layout of :func:`page_tables` under the
    ``smn table`` command that prints it (``tables``: those already built from ``rows``). ``results_label`` is
    the results folder as the commands name it."""
    spec = spec_files().get(experiment)
    spec_text = (f"Spec: [`experiments/{spec}`](../../experiments/{spec})" if spec
                 else "Spec: none named so in `experiments/`")
    lines = [f"# {experiment}", "",
             "Generated by `smn report " + results_label + " --docs OUT` from the ledger in "
             f"`{experiment}/ledger/`; do not edit by hand (`tests/test_docs.py` regenerates it).", "",
             f"{_cells_line(rows)}. {spec_text}. Durations are left out.", ""]
    tables = page_tables(rows, experiment) if tables is None else tables
    shown = set(page_related(experiment))
    for i, (name, description, frame) in enumerate(tables):
        if name not in shown and (i == 0 or tables[i - 1][0] in shown):
            lines += ["## Other layouts that build from these cells", "",
                      "The paper's other layouts, applied to this experiment's cells as they are.", ""]
        level = "##" if name in shown else "###"
        lines += [f"{level} {description}", "",
                  f"`smn table {results_label} --experiment {experiment} --layout {name}`", "",
                  registry.render_frame(frame, "markdown"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


SCORECARD_PAGE = "scorecard.md"


def scorecard_page(pages: dict[str, pd.DataFrame]) -> str:
    """``docs/results/scorecard.md``: the paper's claims scored against every experiment's ledger rows
    (``{name: rows}``, durations dropped: :func:`page_rows`), :func:`orchestrator.reports.scorecard.scorecard`."""
    rows = pd.concat(list(pages.values()), ignore_index=True) if pages else pd.DataFrame()
    roots = {per_image.root_of(r.attrs) for r in pages.values()}
    if len(roots) == 1 and None not in roots:  # every experiment read from one folder: its per_image/ files
        rows.attrs[per_image.ROOT] = roots.pop()
    rows = page_rows(rows) if pages else rows
    return "\n".join([
        "# Scorecard: the paper's claims at small scale", "",
        "Generated by `smn report docs/results --docs OUT` from the ledgers under this folder; do not edit by hand "
        "(`tests/test_docs.py` regenerates it). Each claim is tested by differences in accuracy points between "
        "cells of one experiment, paired over seeds (or over test images and seeds where the cells stored their "
        "per-image correctness), with a 95 % interval. A claim **holds** when every difference with an interval "
        "lies above 0, **does not** when one lies below, and is **inconclusive** otherwise: an interval holding "
        "0, single-seed evidence only (shown, without a vote), or no cells that test it. These are the small "
        "specs (digits, a CIFAR-style ResNet-8, one to three seeds), not the paper's setting: a verdict says what "
        "these ledgers show, nothing more.", "",
        registry.render_frame(scorecard(rows), "markdown") if not rows.empty else "(no ledgers)", ""])


def index_page(pages: dict[str, pd.DataFrame], built: dict[str, list] | None = None) -> str:
    """``docs/results/README.md``: one line per experiment (``{name: its ledger rows}``) linking its page, and
    the scorecard's page (``built``: ``{name: page_tables(rows, name)}`` where already built)."""
    built = built or {}
    lines = ["# Results", "",
             "Generated from the ledgers under this folder (`<experiment>/ledger/*.parquet`, committed) by "
             "`smn report docs/results --docs docs/results`; `tests/test_docs.py` fails when a page and its "
             "ledger disagree. Every accuracy in the docs is read from one of these pages.", "",
             f"The paper's claims, scored against these ledgers: [scorecard]({SCORECARD_PAGE}).", "",
             "| experiment | cells | layouts |", "| --- | --- | --- |"]
    for name, rows in sorted(pages.items()):
        layouts = ", ".join(f"`{n}`" for n, _, _ in (built[name] if name in built else page_tables(rows, name)))
        lines.append(f"| [{name}]({name}.md) | {_cells_line(rows)} | {layouts} |")
    return "\n".join(lines) + "\n"


def demo_table(results: str, experiment: str = DEMO_EXPERIMENT) -> str:
    """The table ``smn run`` prints at the end of the demo, from the ledger alone: the generic ``results``
    layout, then ``vs_frozen``, rendered as ``smn run`` renders them (Markdown), without durations.

    Raises:
        ValueError: ``experiment`` has no ledger under ``results``.
    """
    rows = ledger.read_ledger(results, experiment)
    if rows.empty:
        raise ValueError(f"no ledger rows for experiment {experiment!r} under {results!r}")
    rows = page_rows(rows)
    known = registry.tables()
    parts = [registry.render_frame(known["results"].build(rows), "markdown")]
    frozen = known["vs_frozen"].build(rows)
    if frozen is not None and not frozen.empty:
        parts.append(registry.render_frame(frozen, "markdown"))
    return "\n\n".join(parts)


def readme_with_demo(text: str, table: str) -> str:
    """``text`` (README.md) with the block between :data:`DEMO_START` and :data:`DEMO_END` replaced by ``table``.

    Raises:
        ValueError: the markers are missing, or out of order.
    """
    start, end = text.find(DEMO_START), text.find(DEMO_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {DEMO_START} ... {DEMO_END} block")
    return text[:start] + DEMO_START + "\n" + table + "\n" + text[end:]


def layout_block(results: str, experiment: str, layout: str) -> str:
    """One registered layout of one experiment's ledger (without durations), rendered as Markdown.

    Raises:
        ValueError: ``layout`` is not registered, ``experiment`` has no ledger rows under ``results``, or the
            layout builds nothing from them.
    """
    known = registry.tables()
    if layout not in known:
        raise ValueError(f"table layout {layout!r} is not known; allowed: {', '.join(known)}")
    rows = ledger.read_ledger(results, experiment) if experiment in ledger.list_experiments(results) else None
    if rows is None or rows.empty:
        raise ValueError(f"no ledger rows for experiment {experiment!r} under {results!r}")
    frame = known[layout].build(page_rows(rows))
    if frame is None or frame.empty:
        raise ValueError(f"layout {layout!r} builds nothing from experiment {experiment!r}")
    return registry.render_frame(frame, "markdown")


def fill_generated(text: str, results: str) -> str:
    """``text`` (a Markdown page) with every generated block (:data:`GENERATED`) filled from ``results``, and
    README's demo block (:data:`DEMO_START`) too when the page has one.

    Raises:
        ValueError: a block names a layout or experiment that :func:`layout_block` cannot render.
    """
    text = GENERATED.sub(lambda m: m.group(1) + layout_block(results, m.group(2), m.group(3)) + "\n" + m.group(5),
                         text)
    if DEMO_START in text:
        text = readme_with_demo(text, demo_table(results))
    return text


def write_docs(results: str, out: str, results_label: str | None = None) -> list[Path]:
    """Write ``out/<experiment>.md`` for every experiment with ledger rows under ``results``,
    ``out/scorecard.md`` (:func:`scorecard_page`) and ``out/README.md`` (the index); returns the paths
    written, index last.

    ``results_label`` names the results folder in the pages' commands (default: ``results`` as given).

    Raises:
        ValueError: no experiment under ``results`` has a ledger.
    """
    label = results_label or str(results).rstrip("/")
    pages = {name: ledger.read_ledger(results, name) for name in ledger.list_experiments(results)}
    pages = {name: rows for name, rows in pages.items() if not rows.empty}
    if not pages:
        raise ValueError(f"no experiment with ledger rows under {results!r}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written, built = [], {}
    for name, rows in sorted(pages.items()):
        built[name] = page_tables(rows, name)  # once: the page and the index both list them
        path = folder / f"{name}.md"
        path.write_text(experiment_page(rows, name, label, built[name]), encoding="utf-8")
        written.append(path)
    card = folder / SCORECARD_PAGE
    card.write_text(scorecard_page(pages), encoding="utf-8")
    index = folder / "README.md"
    index.write_text(index_page(pages, built), encoding="utf-8")
    return written + [card, index]


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m orchestrator.reports.docs",
                                description="Write the result pages of RESULTS into OUT (default RESULTS) and fill "
                                "the generated blocks of the --fill pages (README.md's demo table, docs/recipe.md).")
    p.add_argument("results")
    p.add_argument("--out", default=None)
    p.add_argument("--fill", nargs="*", default=[], metavar="PAGE.md")
    p.add_argument("--label", default=None, help="the results folder as the pages' commands name it "
                   "(default: RESULTS as given)")
    args = p.parse_args(argv)
    for path in write_docs(args.results, args.out or args.results, args.label):
        print(f"wrote {path}")
    for page in map(Path, args.fill):
        page.write_text(fill_generated(page.read_text(encoding="utf-8"), args.results), encoding="utf-8")
        print(f"filled {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
