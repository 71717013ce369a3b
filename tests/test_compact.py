"""Compaction of the ledger (orchestrator.results.compact) on the demo's real cell files: stopped after every
step, readers and resume see the same rows; run again, it finishes; on local disk and on S3 (moto)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from benchmarks.s3_server import moto_s3
from orchestrator.cli.app import main as smn_main
from orchestrator.results import compact, ledger
from orchestrator.results.layout import ExperimentLayout

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[1] / "docs" / "results" / "demo" / "ledger"
DEMO_CELLS = len(list(DEMO.glob("*.parquet")))  # the committed demo's cells (15 since the random-mask controls)


class Stop(Exception):
    """Raised by the test's step hook: compaction killed there."""


def _ledger(tmp_path: Path, first: int | None = None) -> Path:
    """``tmp_path/results`` with the demo's cell files (the first ``first`` of them, or all)."""
    out = tmp_path / "results" / "demo" / "ledger"
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(DEMO.glob("*.parquet"))[:first]:
        shutil.copy2(src, out / src.name)
    return tmp_path / "results"


def _rows(results) -> pd.DataFrame:
    df = ledger.read_ledger(str(results), "demo")
    return df.sort_values(["cell_id", "metric"]).reset_index(drop=True)


def _stopper(at: str, nth: int = 1):
    seen = {"n": 0}

    def hook(step: str) -> None:
        if step == at:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Stop(at)

    return hook


def _check_one_ledger(results: Path, want: pd.DataFrame) -> None:
    got = _rows(results)
    pd.testing.assert_frame_equal(got, want)
    assert not got.duplicated(["cell_id", "metric"]).any()
    cells = set(want["cell_id"])
    assert ledger.completed_cells(str(results), "demo") == cells
    lay = ExperimentLayout.of(str(results), "demo")
    for cid in cells:
        rows = want[want["cell_id"] == cid]
        got_cell = ledger.read_cell(lay, cid)
        assert got_cell is not None and set(got_cell) == set(rows["metric"]), cid


STOPS = [(s, 1) for s in compact.STEPS] + [("removing", 1), ("removing", 3)]


@pytest.mark.parametrize("merge", [False, True], ids=["new-part", "merge-parts"])
@pytest.mark.parametrize("at,nth", STOPS, ids=[f"{s}{n}" for s, n in STOPS])
def test_compaction_stopped_at_any_step_loses_and_doubles_nothing(tmp_path, at, nth, merge):
    results = _ledger(tmp_path, first=5)
    compact.compact(str(results), "demo")  # a part with 5 cells
    _ledger(tmp_path)  # the other 4 land as cell files (the 5 copied again: a replayed landing)
    want = _rows(results)
    assert want["cell_id"].nunique() == DEMO_CELLS
    max_parts = 1 if merge else 8
    with pytest.raises(Stop):
        compact.compact(str(results), "demo", max_parts=max_parts, on_step=_stopper(at, nth))
    _check_one_ledger(results, want)  # killed there: readers and resume see the same ledger
    summary = compact.compact(str(results), "demo", max_parts=max_parts)  # run again: it finishes
    _check_one_ledger(results, want)
    folder = results / "demo" / "ledger"
    assert not list(folder.glob("*.parquet"))  # every cell file merged
    parts = sorted(p.name for p in (folder / "_compacted").glob("part-*.parquet"))
    assert parts == summary.parts and summary.cells == DEMO_CELLS
    assert len(parts) == (1 if merge else 2)
    assert not [p for p in (folder / "_compacted").iterdir() if p.name.startswith(".")]  # no temporary file


def test_cells_landing_during_compaction_keep_their_files(tmp_path):
    results = _ledger(tmp_path, first=DEMO_CELLS - 1)
    last = sorted(DEMO.glob("*.parquet"))[-1]

    def land(step: str) -> None:
        if step == "read":  # a run lands a cell after compaction listed the folder
            shutil.copy2(last, results / "demo" / "ledger" / last.name)

    summary = compact.compact(str(results), "demo", on_step=land)
    assert summary.cells == DEMO_CELLS - 1 and (results / "demo" / "ledger" / last.name).exists()
    assert ledger.completed_cells(str(results), "demo") == {p.stem for p in DEMO.glob("*.parquet")}
    assert _rows(results)["cell_id"].nunique() == DEMO_CELLS
    compact.compact(str(results), "demo")
    assert not list((results / "demo" / "ledger").glob("*.parquet"))
    assert _rows(results)["cell_id"].nunique() == DEMO_CELLS


def test_tables_are_identical_before_and_after_compaction(tmp_path, capsys):
    results = tmp_path / "results"
    for name in ("demo", "table2_masking_small", "table3_small"):
        shutil.copytree(DEMO.parents[1] / name, results / name)
    argvs = [["table", str(results)], ["table", str(results), "--format", "csv"],
             ["table", str(results), "--layout", "table2"], ["table", str(results), "--layout", "table3"],
             ["ls", str(results), "--json"]]
    before = []
    for argv in argvs:
        assert smn_main(argv) == 0
        before.append(capsys.readouterr().out)
    assert smn_main(["ledger", "compact", str(results)]) == 0
    assert "table3_small: 9 cells merged" in capsys.readouterr().out
    assert not list(results.glob("*/ledger/*.parquet"))
    for argv, text in zip(argvs, before):
        assert smn_main(argv) == 0
        assert capsys.readouterr().out == text, argv


def test_unreadable_cell_files_stay_in_place_and_are_said(tmp_path):
    results = _ledger(tmp_path)
    folder = results / "demo" / "ledger"
    files = sorted(folder.glob("*.parquet"))
    t = pq.read_table(files[0])
    nan = t.set_column(t.schema.get_field_index("value"), "value", pa.array([math.nan] * t.num_rows))
    pq.write_table(nan, files[0])
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="unreadable") as caught:
        compact.compact(str(results), "demo")
    said = " ".join(str(w.message) for w in caught)
    assert files[0].name in said and "NaN" in said and files[1].name in said
    assert files[0].exists() and files[1].exists()  # left in place, not merged, not removed
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert _rows(results)["cell_id"].nunique() == DEMO_CELLS - 2
    with pytest.warns(RuntimeWarning, match="unreadable"):  # a run: both set aside, their cells run again
        assert len(ledger.completed_cells(str(results), "demo")) == DEMO_CELLS - 2
    assert len(list((results / "demo" / "quarantine").iterdir())) == 2


def test_a_ledger_that_is_a_file_and_a_missing_folder_are_refused(tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "ledger").write_text("not a folder")
    assert smn_main(["ls", str(tmp_path)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert smn_main(["ls", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert smn_main(["ledger", "compact", str(tmp_path / "nope")]) == 2


def test_compaction_on_s3_reads_the_same_rows_with_a_few_requests(tmp_path):
    pytest.importorskip("moto.server")
    with moto_s3("ledger-test") as s3:
        fs, requests = s3.fs, s3.requests
        for src in sorted(DEMO.glob("*.parquet")):
            with fs.open_output_stream(f"ledger-test/r/demo/ledger/{src.name}") as out:
                out.write(src.read_bytes())
        uri = s3.uri("r")
        want = _rows(_ledger(tmp_path))
        requests.lines.clear()
        pd.testing.assert_frame_equal(_rows(uri), want)
        before = requests.count("GET")
        assert compact.compact(uri, "demo").cells == DEMO_CELLS
        requests.lines.clear()
        pd.testing.assert_frame_equal(_rows(uri), want)
        after = requests.count("GET")
        assert ledger.completed_cells(uri, "demo") == set(want["cell_id"])
        assert before >= DEMO_CELLS and after <= 6, (before, after)  # one GET per cell before; a list, the index, a part after
        keys = [i.path for i in fs.get_file_info(pafs.FileSelector("ledger-test/r", recursive=True))
                if i.type == pafs.FileType.File]
        assert sorted(k.rsplit("/", 1)[-1].split("-")[0] for k in keys) == ["manifest.json", "part"]


def _doc_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "ledger.md").read_text()
    section = text.split("## Querying it", 1)[1]
    return [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]


def test_the_query_commands_of_docs_ledger_md_run_on_a_compacted_ledger(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    for name in ("demo", "table3_small"):
        shutil.copytree(DEMO.parents[1] / name, results / name)
    compact.compact(str(results), "demo")  # one compacted experiment, one of cell files
    # and beside the part (which has the setting_id column), a cell file written before that column: mixed schemas
    late = pq.read_table(sorted(DEMO.glob("*.parquet"))[0])
    late = late.set_column(0, "cell_id", pa.array(["f" * 16] * late.num_rows, pa.string()))
    pq.write_table(late, results / "demo" / "ledger" / f"{'f' * 16}.parquet")
    want = ledger.read_ledger(str(results))
    knn = want[want["metric"] == "knn_top1"].groupby(["experiment", "method"])["value"].agg(["mean", "count"])
    duck, polars, pandas = _doc_blocks()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(duck, scope)  # noqa: S102 - the documented commands, as a user would paste them
    shown = capsys.readouterr().out
    assert "table3_small" in shown and "pretrained_bn" in shown
    import duckdb

    got = duckdb.sql(duck.split('duckdb.sql(', 1)[1].rsplit(').show()', 1)[0].strip('"')).df()
    got = got.set_index(["experiment", "method"]).sort_index()
    assert list(got["cells"]) == list(knn["count"]) and got["knn"].round(12).tolist() == knn["mean"].round(12).tolist()
    exec(polars, scope)  # noqa: S102
    assert scope["cells"].height == DEMO_CELLS + 1 and scope["rows"].height == len(want[want["experiment"] == "demo"])
    exec(pandas, scope)  # noqa: S102
    assert len(scope["cells"]) == DEMO_CELLS + 1
