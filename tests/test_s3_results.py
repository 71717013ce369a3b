"""Results and checkpoints on S3: a real S3 server (moto's, on 127.0.0.1) behind every pyarrow.fs call.

The URIs carry the endpoint, credentials and region in themselves
(``s3://key:secret@bucket/prefix?endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1``), so
the Ray workers of the shared local Ray reach the server without any environment of their own, and the
AWS SDK never looks for credentials elsewhere (an instance-metadata lookup would leave this machine).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import pyarrow.fs as pafs
import pytest
import torch

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata endpoint

from orchestrator.results import ledger  # noqa: E402
from orchestrator.results.layout import ExperimentLayout  # noqa: E402
from orchestrator.cli.app import main as smn_main  # noqa: E402
from orchestrator.spec.experiment import expand_cells, load_spec  # noqa: E402
from orchestrator.engine.preflight import StorageUnreachable, check_results_location  # noqa: E402
from smn_core.checkpoint import (delete_checkpoint, has_checkpoint, load_checkpoint, load_tensors,  # noqa: E402
                                 local_copy, location_exists, save_checkpoint, save_tensors)

BUCKET = "smn-test"


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto) on 127.0.0.1 with one bucket; yields ``(host:port, raw pyarrow filesystem)``."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="test",
                           secret_key="test", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield endpoint, fs
    server.stop()


def _uri(endpoint: str, prefix: str, bucket: str = BUCKET) -> str:
    return f"s3://test:test@{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + len(prefix) + 2:] for i in infos if i.type == pafs.FileType.File)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"scores": torch.randn(4, 3, 3, 3, generator=g), "count": torch.tensor(17, dtype=torch.long),
            "mask": torch.rand(5, 7, generator=g) > 0.5, "t": torch.randn(3, 4, generator=g).t()}


@pytest.mark.unit
def test_artifact_location_keeps_the_uri_and_its_query(tmp_path):
    uri = "s3://b/r?endpoint_override=h:1&scheme=http"
    assert ExperimentLayout.of(uri, "exp").location("masks", "c.safetensors") == \
        "s3://b/r/exp/masks/c.safetensors?endpoint_override=h:1&scheme=http"
    assert ExperimentLayout.of("s3://b", "exp").location("states", "c") == "s3://b/exp/states/c"
    assert ExperimentLayout.of(f"file://{tmp_path}/r/", "e").location("x") == f"file://{tmp_path}/r/e/x"
    assert ExperimentLayout.of(str(tmp_path / "r"), "e").location("a", "b") == f"{tmp_path}/r/e/a/b"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        ExperimentLayout.of(uri, "exp").location("..")


@pytest.mark.unit
def test_checkpoint_round_trip_on_s3(s3):
    endpoint, fs = s3
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    tensors = _tensors()

    path = f"s3://test:test@{BUCKET}/{prefix}/sub/masks.safetensors?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    save_tensors(path, tensors, metadata={"format": "smn"})
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    assert location_exists(path)
    with local_copy(path) as local:
        assert torch.equal(load_tensors(local)["scores"], tensors["scores"])
    assert not os.path.exists(local)

    folder = ExperimentLayout.of(_uri(endpoint, prefix), "exp").location("checkpoints", "cell")
    meta = {"epoch": 3, "history": [{"epoch": 0, "loss": 1.5}]}
    assert not has_checkpoint(folder)
    assert save_checkpoint(folder, tensors, meta) == folder
    assert has_checkpoint(folder)
    back, back_meta = load_checkpoint(folder)
    assert back_meta == meta and all(torch.equal(back[k], t) for k, t in tensors.items())
    save_checkpoint(folder, {"b": torch.ones(3)}, {"epoch": 4})  # an overwrite replaces the content
    assert load_checkpoint(folder)[1] == {"epoch": 4} and list(load_checkpoint(folder)[0]) == ["b"]
    assert _keys(fs, prefix) == ["exp/checkpoints/cell/meta.json", "exp/checkpoints/cell/tensors.safetensors",
                                 "sub/masks.safetensors"]  # no temporary objects left behind

    # a half-written folder (tensors, no meta.json yet: meta.json is written last) is not a checkpoint
    half = ExperimentLayout.of(_uri(endpoint, prefix), "exp").location("checkpoints", "half")
    save_tensors(f"{half.split('?')[0]}/tensors.safetensors?{half.split('?')[1]}", tensors)
    assert not has_checkpoint(half)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(half)

    with fs.open_output_stream(f"{BUCKET}/{prefix}/bad.safetensors") as out:
        out.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_tensors(_uri(endpoint, f"{prefix}/bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="no tensor file"):
        load_tensors(_uri(endpoint, f"{prefix}/missing.safetensors"))

    delete_checkpoint(folder)
    delete_checkpoint(folder)  # a missing folder is fine
    assert not has_checkpoint(folder)
    assert not any(k.startswith("exp/checkpoints/cell/") for k in _keys(fs, prefix))


@pytest.mark.unit
def test_pipeline_weights_are_read_from_s3(s3):
    """``weights: pipeline`` with the pretraining artifact on S3 (prepare_backbone fetches it)."""
    from smn_core.backbones import build_backbone
    from smn_core.pipeline import prepare_backbone
    from smn_core.config import BackboneSpec

    endpoint, _ = s3
    torch.manual_seed(1)
    state = build_backbone("cifar_resnet8", "random").model.state_dict()
    uri = _uri(endpoint, f"pre-{uuid.uuid4().hex[:8]}/pretrain-x.safetensors")
    save_tensors(uri, state)
    backbone = prepare_backbone(BackboneSpec(arch="cifar_resnet8", weights="pipeline"), pipeline_weights=uri)
    got = backbone.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if k in got)


@pytest.mark.unit
def test_preflight_accepts_a_reachable_bucket_and_leaves_no_probe(s3):
    endpoint, fs = s3
    prefix = f"pre-{uuid.uuid4().hex[:8]}"
    check_results_location(_uri(endpoint, prefix))
    assert _keys(fs, prefix) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_preflight_refuses_an_unreachable_endpoint_before_writing_anything(tmp_path, tiny_spec, capsys):
    uri = _uri(f"127.0.0.1:{_free_port()}", "res")  # nothing listens there
    with pytest.raises(StorageUnreachable, match=r"not writable from the driver \(host .+\).*endpoint is reachable"):
        check_results_location(uri)
    t0 = time.time()
    code = smn_main(["run", str(tiny_spec("unreach")), "--results", uri])
    err = capsys.readouterr().err
    assert code == 1  # storage unreachable: a runtime failure (issue 14)
    assert uri in err and "cannot read the ledger" in err
    assert time.time() - t0 < 60


@pytest.mark.unit
def test_preflight_refuses_a_missing_bucket(s3, tiny_spec, capsys):
    endpoint, fs = s3
    uri = _uri(endpoint, "res", bucket="no-such-bucket")
    with pytest.raises(StorageUnreachable, match=r"no-such-bucket.*not writable from the driver"):
        check_results_location(uri)
    assert fs.get_file_info("no-such-bucket").type == pafs.FileType.NotFound


@pytest.mark.ray
@pytest.mark.slow
def test_smn_run_results_on_s3(ray_local, s3, tiny_spec, capsys):
    """`smn run --results s3://...` (one Ray task per cell): ledger, masks and final states land in the bucket,
    the epoch checkpoints are removed, `smn table s3://...` renders them, and a second run skips every cell."""
    endpoint, fs = s3
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    uri = _uri(endpoint, prefix)
    spec_path = tiny_spec("s3run")
    assert smn_main(["run", str(spec_path), "--results", uri]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "2 cells ran, 0 were already done, 0 failed" in out
    cells = {c.config.method: c.cell_id for c in expand_cells(load_spec(spec_path))}
    keys = _keys(fs, prefix)
    assert f"s3run/ledger/{cells['smn']}.parquet" in keys and f"s3run/ledger/{cells['pretrained']}.parquet" in keys
    assert f"s3run/masks/{cells['smn']}.safetensors" in keys
    assert f"s3run/states/{cells['smn']}/tensors.safetensors" in keys
    assert f"s3run/states/{cells['smn']}/meta.json" in keys
    assert not any(k.startswith("s3run/checkpoints/") for k in keys), keys  # spent once the cell landed
    masks = load_tensors(ExperimentLayout.of(uri, "s3run").location("masks", f"{cells['smn']}.safetensors"))
    assert masks and all(t.dtype == torch.bool for t in masks.values())
    state, meta = load_checkpoint(ExperimentLayout.of(uri, "s3run").location("states", cells["smn"]))
    assert meta["cell_id"] == cells["smn"] and state

    assert smn_main(["table", uri]) == 0
    table = capsys.readouterr().out
    assert "smn" in table and "pretrained" in table and "knn_top1" in table

    assert smn_main(["run", str(spec_path), "--results", uri]) == 0
    assert "0 cells ran, 2 were already done, 0 failed" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_tune_sweep_with_ddp_cell_on_s3(ray_local, s3, tiny_spec):
    """A grid spec runs as a Ray Tune sweep whose trial drives a 2-worker TorchTrainer: Tune's and Ray Train's
    storage take the s3:// URI as it is, the epoch checkpoints go through Ray Train to the bucket, and the
    cell's ledger rows, masks and final state land there."""
    from orchestrator.engine.plain import run_experiment

    endpoint, fs = s3
    prefix = f"sweep-{uuid.uuid4().hex[:8]}"
    uri = _uri(endpoint, prefix)
    spec = load_spec(tiny_spec("s3sweep", workers=2, extra="grid:\n  train.batch_size: [32]\n"), ["methods=[smn]"])
    lines: list[str] = []
    summary = run_experiment(spec, uri, echo=lines.append)
    assert summary["ran"] == 1 and not summary["failed"], "\n".join(lines)
    (cell,) = expand_cells(spec)
    keys = _keys(fs, prefix)
    assert f"s3sweep/ledger/{cell.cell_id}.parquet" in keys
    assert f"s3sweep/masks/{cell.cell_id}.safetensors" in keys
    assert f"s3sweep/states/{cell.cell_id}/meta.json" in keys
    assert any(k.startswith("s3sweep/tune/sweep-") for k in keys), keys
    assert any(k.startswith(f"s3sweep/ray_train/cell-{cell.cell_id}/") and k.endswith("tensors.safetensors")
               for k in keys), keys  # the epoch checkpoint Ray Train reported
    assert set(ledger.read_ledger(uri, "s3sweep")["cell_id"]) == {cell.cell_id}
    assert run_experiment(spec, uri, echo=lines.append)["ran"] == 0


@pytest.mark.ray
@pytest.mark.slow
def test_cascade_on_s3(ray_local, s3, tmp_path, capsys):
    """`smn run` of a cascade spec with results on S3: dispatcher, router, experts (actors) and combinations
    write their ledger cells, routes, embeddings, masks and states to the bucket; a rerun runs nothing."""
    from orchestrator.spec.cascade import cascade_spec
    from orchestrator.engine.cascade import plan_cascades

    from .test_cascade_ray import write_cascade_spec

    endpoint, fs = s3
    prefix = f"casc-{uuid.uuid4().hex[:8]}"
    uri = _uri(endpoint, prefix)
    path = write_cascade_spec(tmp_path, "s3casc", epochs=1)
    overrides = ["cascade.router.clusters=2", "cascade.router.components=2"]
    assert smn_main(["run", str(path), "--results", uri, *overrides]) == 0, capsys.readouterr()
    capsys.readouterr()
    spec = load_spec(path, overrides)
    (plan,) = plan_cascades(spec, cascade_spec(spec))
    keys = _keys(fs, prefix)
    for cid in (plan.dispatcher.cell_id, plan.router_id, *plan.expert_ids, *plan.combination_ids.values()):
        assert f"s3casc/ledger/{cid}.parquet" in keys, (cid, keys)
    assert f"s3casc/cascade/{plan.router_id}/routes.safetensors" in keys
    for eid in plan.expert_ids:
        assert f"s3casc/cascade/{eid}/embeddings.safetensors" in keys
        assert f"s3casc/states/{eid}/meta.json" in keys and f"s3casc/masks/{eid}.safetensors" in keys
    assert not any(k.startswith("s3casc/checkpoints/") for k in keys), keys
    assert smn_main(["run", str(path), "--results", uri, *overrides]) == 0
    out = capsys.readouterr().out
    assert (f"router: 0 ran, 1 done before; experts: 0 ran, 2 done before; combinations: 0 ran, "
            f"{len(plan.combination_ids)} done before") in out
    assert ledger.read_ledger(uri, "s3casc")["cell_id"].nunique() == 2 + 2 + len(plan.combination_ids)
    assert smn_main(["plot", uri, "--figure", "fig11"]) == 0  # the figure goes next to the ledger, in the bucket
    assert "figures/fig11.png" in _keys(fs, prefix)
