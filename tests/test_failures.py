"""What clusters do to a run, injected for real on a local Ray: a ledger file truncated or corrupted on disk,
a spec asking for GPUs on a cluster without any.

(A killed driver and a killed DDP worker are in test_kill_resume.py, a stopped and resubmitted `ray job` in test_job_submit.py, the
ledger's own quarantine of unreadable files in test_ledger.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from orchestrator.results import ledger
from orchestrator.cli.app import main as smn_main
from orchestrator.engine.plain import run_experiment
from orchestrator.spec.experiment import expand_cells, load_spec


pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _bytes_and_mtime(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_corrupted_ledger_files_are_set_aside_and_only_their_cells_run_again(ray_local, tiny_spec, tmp_path):
    spec = load_spec(tiny_spec("corrupt"), ["seeds=[0,1]"])
    results = str(tmp_path / "results")
    first = run_experiment(spec, results, echo=lambda s: None)
    assert first["ran"] == 4 and not first["failed"]
    exp = tmp_path / "results" / "corrupt"
    cells = {(c.config.method, c.config.seed): c.cell_id for c in expand_cells(spec)}
    truncated, corrupted = cells[("smn", 0)], cells[("pretrained", 1)]
    kept = [cells[("smn", 1)], cells[("pretrained", 0)]]
    before = {cid: _bytes_and_mtime(exp / "ledger" / f"{cid}.parquet") for cid in kept}
    kept_mask = _bytes_and_mtime(exp / "masks" / f"{cells[('smn', 1)]}.safetensors")

    data = (exp / "ledger" / f"{truncated}.parquet").read_bytes()
    bad = {truncated: data[: len(data) // 2]}  # a write cut short
    data = (exp / "ledger" / f"{corrupted}.parquet").read_bytes()
    bad[corrupted] = data[:-8] + b"\x00" * 8  # footer length and magic overwritten
    for cid, blob in bad.items():
        (exp / "ledger" / f"{cid}.parquet").write_bytes(blob)
    broken_at = time.time()

    lines = []
    with pytest.warns(RuntimeWarning, match="unreadable") as caught:
        second = run_experiment(spec, results, echo=lines.append)
    assert second["ran"] == 2 and second["skipped"] == 2 and not second["failed"], lines
    warned = " ".join(str(w.message) for w in caught)
    assert truncated in warned and corrupted in warned and "will run again" in warned

    # the other cells are not touched: same bytes, same modification time (ledger rows and mask)
    assert {cid: _bytes_and_mtime(exp / "ledger" / f"{cid}.parquet") for cid in kept} == before
    assert _bytes_and_mtime(exp / "masks" / f"{cells[('smn', 1)]}.safetensors") == kept_mask
    # nothing is lost: the broken files are kept, byte for byte, in quarantine/
    quarantined = {p.name.split(".")[0]: p.read_bytes() for p in (exp / "quarantine").iterdir()}
    assert quarantined == bad
    # and the two cells are back, once each, written after the damage
    df = ledger.read_ledger(results, "corrupt")
    assert set(df["cell_id"]) == set(cells.values()) and not df.duplicated(["cell_id", "metric"]).any()
    for cid in bad:
        assert df.loc[df["cell_id"] == cid, "finished_at"].iloc[0].timestamp() > broken_at


def test_gpu_request_without_gpus_fails_at_once_with_a_clear_message(ray_local, tiny_spec, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.delenv("SMN_ALLOW_AUTOSCALE_GPUS", raising=False)
    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine's Ray has GPUs")
    results = str(tmp_path / "results")
    specs = {"one task per cell": tiny_spec("gpu1"), "DDP": tiny_spec("gpu2", workers=2),
             "Tune sweep": tiny_spec("gpusweep", extra="grid: {train.swav.num_prototypes: [10, 20]}\n")}
    for what, path in specs.items():
        t0 = time.time()
        with pytest.raises(RuntimeError, match=r"asks for 1\.0 GPU\(s\) per worker but the Ray cluster has 0; "
                                               r"set resources\.gpus_per_worker=0"):
            run_experiment(load_spec(path, ["resources.gpus_per_worker=1"]), results, echo=lambda s: None)
        assert time.time() - t0 < 60, f"{what}: took {time.time() - t0:.0f}s"
        assert not (tmp_path / "results" / path.stem).exists(), what  # nothing written

    assert smn_main(["run", str(specs["DDP"]), "--results", results, "resources.gpus_per_worker=2"]) == 1
    err = capsys.readouterr().err
    assert "asks for 2.0 GPU(s) per worker but the Ray cluster has 0" in err
    assert not (tmp_path / "results" / "gpu2").exists()
