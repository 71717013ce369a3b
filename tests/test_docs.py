"""README.md and docs/: every result number generated from a committed ledger, every link alive (issue 24).

The result pages under ``docs/results/`` and the generated blocks of README.md and ``docs/*.md`` are
regenerated here from the ledgers committed under ``docs/results/<experiment>/ledger/`` and the per-image
correctness beside them (``<experiment>/per_image/``, where the cells stored it), copied alone into a
temporary folder, so nothing else lying there locally takes part; a page that differs from its ledger
fails, with the command that rewrites it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.reports import docs

from .conftest import REPO

pytestmark = pytest.mark.unit

DOCS = REPO / "docs"
RESULTS = DOCS / "results"
README = REPO / "README.md"
REGENERATE = ("python -m orchestrator.reports.docs docs/results --fill README.md docs/recipe.md "
              "(the pages and the generated blocks)")


def _pages() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory) -> Path:
    """A results folder holding only the committed ledgers of docs/results (``<experiment>/ledger/*.parquet``) and
    their per-image correctness (``<experiment>/per_image/*.parquet``, where committed)."""
    root = tmp_path_factory.mktemp("docs_results") / "docs" / "results"  # named as the pages' commands name it
    files = sorted(RESULTS.glob("*/ledger/*.parquet"))
    assert files, "docs/results has no committed ledger"
    for f in files + sorted(RESULTS.glob("*/per_image/*.parquet")):
        dest = root / f.relative_to(RESULTS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return root


def test_result_pages_are_generated_from_the_committed_ledgers(ledgers, tmp_path, monkeypatch):
    """``smn report docs/results --docs OUT``, the command the pages name, writes every committed page byte for
    byte (run where the ledgers alone lie under docs/results)."""
    from orchestrator.cli import main

    monkeypatch.chdir(ledgers.parent.parent)
    out = tmp_path / "pages"
    assert main(["report", "docs/results", "--docs", str(out)]) == 0
    written = sorted(out.glob("*.md"))
    committed = sorted(p.name for p in RESULTS.glob("*.md"))
    assert [p.name for p in written] == committed, f"pages and ledgers disagree; run {REGENERATE}"
    for page in written:
        assert page.read_text() == (RESULTS / page.name).read_text(), f"docs/results/{page.name} is stale; run {REGENERATE}"


def test_smn_report_docs_refuses_a_folder_without_ledgers(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["report", str(tmp_path), "--docs", str(tmp_path / "out")]) == 2
    assert "no experiment with ledger rows" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--docs", str(tmp_path / "out"), "--experiment", "demo"]) == 2
    assert "leave out --experiment" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pages_carry_no_durations_and_no_machine(ledgers):
    rows = docs.ledger.read_ledger(str(ledgers), "demo")
    assert {"wall_s", "train_seconds"} & set(rows["metric"]), "the demo's ledger records durations"
    kept = set(docs.page_rows(rows)["metric"])
    assert not {m for m in kept if "seconds" in m or m == "wall_s"}
    assert {"knn_top1", "knn_dino_top1", "linear_probe_top1", "density"} <= kept
    page = (RESULTS / "demo.md").read_text()
    assert "wall_s" not in page
    for host in set(rows["host"]):
        assert host not in page
    assert str(ledgers) not in page


def test_readme_demo_block_is_the_table_the_demo_prints(ledgers):
    text = README.read_text()
    start, end = text.index(docs.DEMO_START), text.index(docs.DEMO_END)
    block = text[start + len(docs.DEMO_START):end].strip("\n")
    assert block == docs.demo_table(str(ledgers)), f"README.md's demo table is stale; run {REGENERATE}"
    assert re.search(r"\|\s*smn\s*\|", block) and "vs frozen" in block  # the self-masked row, beside frozen


def test_every_generated_block_matches_its_ledger(ledgers):
    blocks = 0
    for page in _pages():
        text = page.read_text()
        blocks += len(docs.GENERATED.findall(text))
        assert docs.fill_generated(text, str(ledgers)) == text, f"{page.relative_to(REPO)} is stale; run {REGENERATE}"
    assert blocks >= 2  # docs/recipe.md's measured tables


def test_fill_generated_refuses_unknown_layouts_and_experiments(ledgers):
    with pytest.raises(ValueError, match="not known"):
        docs.fill_generated("<!-- generated: demo no_such_layout -->\n<!-- generated: end -->", str(ledgers))
    with pytest.raises(ValueError, match="no ledger rows"):
        docs.fill_generated("<!-- generated: no_such_run vs_frozen -->\n<!-- generated: end -->", str(ledgers))
    with pytest.raises(ValueError, match="demo-table"):
        docs.readme_with_demo("no markers here", "table")


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200; the rest belongs in docs/)"
    text = "\n".join(lines)
    for part in ("Self-Masking Networks for Unsupervised Adaptation", "```bibtex", "experiments/demo.yaml",
                 docs.DEMO_START, "docs/architecture.md"):
        assert part in text, part


def _readme_prose_numbers() -> list[str]:
    """The numbers of README.md outside code blocks, link targets and the generated demo block."""
    text = README.read_text()
    text = text[:text.index(docs.DEMO_START)] + text[text.index(docs.DEMO_END):]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)|<https?://[^>]*>", "]", text)
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:-\d+)?", text)


def test_every_number_in_the_readme_prose_is_checked_here():
    """Each number the README states is read here from its source: the demo spec, the exit codes, the mask
    format, pyproject.toml. A number added to the README without a check here fails."""
    import tomllib

    from orchestrator.cli.app import EXIT_CODES
    from orchestrator.spec.experiment import load_spec
    from smn_core.masking import MaskConfig

    text = " ".join(README.read_text().split())
    spec = load_spec(str(REPO / "experiments" / "demo.yaml"))
    src, tgt = spec.pretrain.dataset.classes, spec.dataset.classes
    python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"].lstrip(">=")
    claims = {
        f"M = 1[S > {MaskConfig().threshold:g}]": ("1", f"{MaskConfig().threshold:g}"),
        "A mask costs 1 bit per weight, 32x less than a fine-tuned fp32 copy": ("1", "32"),
        f"only Python {python}+ needed": (python,),
        f"CIFAR ResNet-{spec.backbone.arch.removeprefix('cifar_resnet')} on the digits {min(src)}-{max(src)}":
            (spec.backbone.arch.removeprefix("cifar_resnet"), f"{min(src)}-{max(src)}"),
        f"the unlabeled digits {min(tgt)}-{max(tgt)}": (f"{min(tgt)}-{max(tgt)}",),
        f"the paper's k = {spec.eval.knn_k} (`knn_top1`)": (str(spec.eval.knn_k),),
        f"DINO's k = {spec.eval.knn_dino_k} (`knn_dino_top1`)": (str(spec.eval.knn_dino_k),),
        f"over {len(spec.seeds)} seeds": (str(len(spec.seeds)),),
    }
    ok, failed, usage, interrupted = sorted(EXIT_CODES)
    claims[f"Exit codes: {ok} success, {failed} a runtime failure"] = (str(ok), str(failed))
    claims[f"{usage} a usage or spec error"] = (str(usage),)
    claims[f"{interrupted} interrupted (run the same command again to resume)"] = (str(interrupted),)
    assert "interrupted" in EXIT_CODES[interrupted] and "usage" in EXIT_CODES[usage]
    from orchestrator.reports.intervals import LEVEL
    from orchestrator.reports.tables import results_table

    level = f"{100 * LEVEL:.0f}"  # the intervals of the tables (issue 25)
    claims[f"with its {level} % t-interval in brackets"] = (level,)
    claims[f"only when its {level} % interval excludes 0"] = (level, "0")

    full_mask = pd.DataFrame({"cell_id": "c", "experiment": "e", "method": "smn", "backbone": "b", "dataset": "d",
                              "seed": 0, "grid_json": "{}", "metric": ["storage_bits", "backbone_params"],
                              "value": [1000.0, 1000.0]})  # a mask over every weight: one bit each
    storage = results_table(full_mask)
    assert storage[("bits_per_weight", "mean")].iloc[0] == 1 and storage[("x_smaller_than_fft", "mean")].iloc[0] == 32
    for classes in (src, tgt):  # the README writes them as a range
        assert list(classes) == list(range(min(classes), max(classes) + 1))
    checked = []
    for claim, numbers in claims.items():
        assert claim in text, f"README no longer says {claim!r} (its source says so)"
        checked += numbers
    unchecked = list(_readme_prose_numbers())
    for n in checked:
        if n in unchecked:
            unchecked.remove(n)
    assert not unchecked, f"numbers in README.md that no test checks: {unchecked}"


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_command = [line for line in ci if "scripts/setup.sh" in line]
    assert len(ci_command) == 1, ".ci/run should run exactly one setup-and-test command"
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    tests = [b.strip() for b in blocks if "scripts/setup.sh" in b and "smn run" not in b]
    assert tests == [ci_command[0].strip()], f"README's test command {tests} is not .ci/run's {ci_command}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _broken_links(pages: list[Path], root: Path) -> list[str]:
    """Relative links of ``pages`` (outside code blocks) whose file, or heading, does not exist."""
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(root)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def test_every_relative_link_points_to_an_existing_file():
    broken = _broken_links(_pages(), REPO)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# The title\n\n[ok](p.md#the-title) [web](https://example.org/x) [bad](missing.md) "
                    "[anchor](p.md#nothing)\n\n```\n[in code](nowhere.md)\n```\n")
    assert _broken_links([page], tmp_path) == ["p.md: missing.md", "p.md: p.md#nothing (no such heading)"]


def test_spec_files_maps_experiment_names_to_spec_files(tmp_path):
    (tmp_path / "b.yaml").write_text("name: table3_small\nmethods: [smn]\n")
    (tmp_path / "a.yaml").write_text("methods: [smn]\n")  # no name
    (tmp_path / "c.yaml").write_text("name: [unclosed\n")  # does not parse
    assert docs.spec_files(tmp_path) == {"table3_small": "b.yaml"}
    assert docs.spec_files()["demo"] == "demo.yaml"


def test_page_rows_drop_durations_and_the_results_folder():
    rows = pd.DataFrame({"metric": ["knn_top1", "wall_s", "train_seconds", "eval_seconds", "steps"],
                         "value": [0.5, 3.0, 2.0, 1.0, 10.0]})
    rows.attrs["results"] = "somewhere"
    out = docs.page_rows(rows)
    assert list(out["metric"]) == ["knn_top1", "steps"]
    assert "results" not in out.attrs and rows.attrs["results"] == "somewhere"


def test_pages_pair_over_images_where_the_cells_stored_them(tmp_path):
    """A docs folder whose demo cells stored per-image correctness (``demo/per_image/``): the page's vs_frozen
    pairs over images x seeds and shows the McNemar p-values, and the scorecard's evidence pairs over images (the
    committed pages without such files pair over seeds: the test above)."""
    import numpy as np

    from orchestrator.results.layout import ExperimentLayout
    from orchestrator.results.per_image import write_correctness

    results = tmp_path / "docs" / "results"
    shutil.copytree(RESULTS / "demo" / "ledger", results / "demo" / "ledger")
    rows = docs.ledger.read_ledger(str(results), "demo")
    lay, rng = ExperimentLayout.of(str(results), "demo"), np.random.default_rng(0)
    for cid, method in zip(*(rows.drop_duplicates("cell_id")[k] for k in ("cell_id", "method"))):
        correct = rng.random(269) < (0.9 if method == "smn" else 0.8)
        write_correctness(lay, cid, {m: correct for m in ("knn_top1", "knn_dino_top1", "linear_probe_top1")})
    vs = docs.registry.render_frame(docs.registry.tables()["vs_frozen"].build(docs.page_rows(rows)))
    assert "images x seeds" in vs and "vs frozen: McNemar p" in vs and str(results) not in vs
    card = docs.scorecard_page({"demo": rows})
    assert "SMN - frozen, k-NN (k=20)" in card and "(images x seeds)" in card


def test_committed_per_image_files_agree_with_their_ledgers():
    """Each committed ``per_image/<cell>.parquet`` beside a docs ledger comes from the run that wrote the ledger
    (or a rerun of the same cells): the share of images it marks correct is the ledger's accuracy, for every
    cell and metric, and no file names a cell the ledger lacks."""
    from orchestrator.results import ledger
    from orchestrator.results.per_image import load_correctness

    checked = 0
    for folder in sorted(RESULTS.glob("*/per_image")):
        experiment = folder.parent.name
        cells = ledger.wide(ledger.read_ledger(str(RESULTS), experiment)).set_index("cell_id")
        assert {p.name.split(".")[0] for p in folder.glob("*.parquet")} <= set(cells.index), experiment
        for cell_id, c in cells.iterrows():
            for metric in ("knn_top1", "knn_dino_top1", "linear_probe_top1"):
                correct = load_correctness(str(RESULTS), experiment, cell_id, metric)
                if correct is not None:
                    assert correct.size == int(c["num_test"]), (experiment, cell_id, metric)
                    assert correct.mean() == pytest.approx(c[metric], abs=1e-12), (experiment, cell_id, metric)
                    checked += 1
    assert checked, "no committed per-image file"
