"""The mask file and the mask store on the real CIFAR-10 ResNet-20: a stored, compressed, loaded and
applied mask reproduces the trained masked model exactly; bad files and wrong backbones are refused."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from smn_core.mask_file import (
    BackboneMismatchError,
    MaskFileError,
    MaskSwitcher,
    TaskMask,
    backbone_hash,
    backbone_state,
    decode_mask_file,
    encode_mask_file,
    pack_mask,
    read_mask_header,
    task_mask_from_state,
    unpack_mask,
)
from tests.conftest import shared_path

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

CIFAR_CKPT = ("weights", "resnet_cifar10", "resnet20-12fca82f.th")


def _backbone():
    from smn_core.backbones import build_backbone

    return build_backbone("cifar_resnet20", "checkpoint", checkpoint=str(shared_path(*CIFAR_CKPT))).model


def _cell(seed: int, bn_mode: str):
    from smn_core.config import BackboneSpec, CellConfig, DataSpec
    from smn_core.training import TrainConfig

    return CellConfig(method="supervised_mask", seed=seed,
                      backbone=BackboneSpec("cifar_resnet20", "checkpoint", str(shared_path(*CIFAR_CKPT))),
                      dataset=DataSpec(source="parquet", root=str(shared_path("data", "cifar10")),
                                       max_train_samples=64, max_test_samples=16),
                      train=TrainConfig(epochs=1, batch_size=64, score_lr=2000.0, schedule="constant", bn_mode=bn_mode))


def _trained_model(cfg, state):
    """The trained masked model, rebuilt from the run's final state (scores, head, BN statistics)."""
    from smn_core.masking import attach_masks
    from smn_core.training import build_adaptation_model

    model = _backbone()
    attach_masks(model, cfg.train.mask)
    adapt = build_adaptation_model(model, 64, cfg.train, num_classes=10)
    params, buffers = dict(adapt.named_parameters()), dict(adapt.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            kind, _, name = key.partition(".")
            (params if kind == "param" else buffers)[name].copy_(value)
    return adapt.eval()


@pytest.fixture(scope="module")
def run():
    """Two real supervised-masking runs (one step each on 64 real CIFAR-10 images; BN adapted in the
    first), their trained models, and a batch of real CIFAR-10 test images."""
    from smn_core.augment import eval_transform
    from smn_core.data import load_dataset
    from smn_core.pipeline import run_cell

    out = {}
    for task, seed, bn in (("a", 0, "adapt"), ("b", 1, "frozen")):
        cfg = _cell(seed, bn)
        res = run_cell(cfg, evaluate=False)
        out[task] = (cfg, res, _trained_model(cfg, res.state))
        out[f"task-{task}"] = task_mask_from_state(res.masks, _backbone(), state=res.state, arch="cifar_resnet20",
                                                   spec=cfg.to_dict())
    test = load_dataset("parquet", "test", root=str(shared_path("data", "cifar10")), max_samples=32)
    tf = eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out["x"] = torch.stack([tf(test[i][0]) for i in range(len(test))])
    return out


def _task(run, key) -> TaskMask:
    return run[f"task-{key}"]


def _reference(run, key, x):
    _, _, trained = run[key]
    with torch.no_grad():
        feats = trained.backbone(x)
        return feats, trained.classifier(feats)


@pytest.mark.unit
def test_pack_unpack_and_hash_are_canonical():
    m = torch.rand(5, 3, 3, 3) > 0.3
    packed = pack_mask(m)
    assert packed.dtype.name == "uint8" and packed.size == (135 + 7) // 8
    assert torch.equal(unpack_mask(packed, (5, 3, 3, 3)), m)
    with pytest.raises(ValueError, match="needs 17 bytes, got 16"):
        unpack_mask(packed[:-1], (5, 3, 3, 3))
    a, b = _backbone(), _backbone()
    assert backbone_hash(a) == backbone_hash(b) == backbone_hash(dict(a.state_dict()))
    # masks attached (parametrized names, scores) do not change the hash; a changed weight does
    from smn_core.masking import attach_masks

    attach_masks(b)
    assert backbone_hash(b) == backbone_hash(a)
    with torch.no_grad():
        a.conv1.weight[0, 0, 0, 0] += 1e-3
    assert backbone_hash(a) != backbone_hash(b)


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
@pytest.mark.parametrize("codec", ["smn-ctx", "lzma"])
def test_stored_compressed_loaded_applied_mask_is_identical_to_trained_model(run, tmp_path, codec):
    from orchestrator.store.mask_store import MaskStore

    store = MaskStore.create(str(tmp_path / "store"), _backbone(), "cifar_resnet20")
    task = _task(run, "a")
    assert task.head and task.buffers, "supervised masking with BN adaptation stores a head and BN statistics"
    info = store.add("cifar10-a", task, codec=codec)
    assert info.codec == codec and info.num_weights == sum(m.numel() for m in run["a"][1].masks.values())
    model = MaskStore(str(tmp_path / "store")).apply("cifar10-a")  # a fresh process would do exactly this
    feats, logits = _reference(run, "a", run["x"])
    with torch.no_grad():
        assert torch.equal(model.features(run["x"]), feats)
        assert torch.equal(model(run["x"]), logits)


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_switching_tasks_swaps_masks_without_reloading(run, tmp_path):
    from orchestrator.store.mask_store import MaskStore

    store = MaskStore.create(f"file://{tmp_path}/s", _backbone(), "cifar_resnet20")  # a pyarrow URI
    store.add("a", _task(run, "a"))
    store.add("b", _task(run, "b"))
    ma = store.apply("a")
    weight = ma.backbone.conv1.weight
    with torch.no_grad():
        out_a = ma(run["x"])
        mb = store.apply("b")
        out_b = mb(run["x"])
        again = store.apply("a")(run["x"])
    assert mb is ma and mb.backbone.conv1.weight is weight and weight.data_ptr() == ma.backbone.conv1.weight.data_ptr()
    assert torch.equal(out_a, _reference(run, "a", run["x"])[1])
    assert torch.equal(out_b, _reference(run, "b", run["x"])[1])
    assert torch.equal(again, out_a) and ma.task == "a"
    assert not torch.equal(out_a, out_b)
    with torch.no_grad():  # reset restores the pristine backbone exactly
        assert torch.equal(store.switcher().reset().features(run["x"]), _backbone().eval()(run["x"]))
    assert [t.task for t in store.list()] == ["a", "b"]


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_wrong_backbone_hash_is_refused_before_any_change(run, tmp_path):
    from smn_core.backbones import build_backbone

    from orchestrator.store.mask_store import MaskStore

    task = _task(run, "a")
    torch.manual_seed(0)
    other = build_backbone("cifar_resnet20", "random").model.eval()  # same arch and shapes, other weights
    switcher = MaskSwitcher(other)
    with torch.no_grad():
        before = other(run["x"])
    with pytest.raises(BackboneMismatchError, match=f"mask belongs to backbone {task.backbone_hash}.*this backbone "
                       f"hashes to {backbone_hash(other)}; refusing"):
        switcher.apply(task)
    with torch.no_grad():
        assert torch.equal(other(run["x"]), before)
    store = MaskStore.create(str(tmp_path / "other"), other, "cifar_resnet20")
    with pytest.raises(BackboneMismatchError, match="refusing to add it"):
        store.add("a", task)
    assert store.list() == []


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_corrupted_or_truncated_mask_files_are_refused(run, tmp_path):
    from orchestrator.store.mask_store import MaskStore

    store = MaskStore.create(str(tmp_path / "s"), _backbone(), "cifar_resnet20")
    store.add("a", _task(run, "a"))
    path = tmp_path / "s" / "tasks" / "a.smnmask"
    good = path.read_bytes()
    weights = backbone_state(_backbone())
    assert decode_mask_file(good, weights).masks.keys() == run["a"][1].masks.keys()
    header_len = int.from_bytes(good[:8], "little")
    cases = {
        "truncated": (good[: len(good) - 100], "truncated"),
        "truncated header": (good[: 8 + header_len // 2], "truncated"),
        "four bytes": (good[:4], "too short"),
        "flipped payload byte": (good[:-50] + bytes([good[-50] ^ 0x10]) + good[-49:], "checksum mismatch"),
        "flipped header byte": (good[:30] + bytes([good[30] ^ 0x01]) + good[31:], "not valid JSON|format|malformed|checksum"),
        "trailing data": (good + b"\0" * 16, "trailing"),
        "not a mask file": (load_file.__doc__.encode()[:200], "implausible|truncated|not"),
    }
    for label, (data, message) in cases.items():
        with pytest.raises(MaskFileError, match=message):
            decode_mask_file(data, weights, source=label)
        path.write_bytes(data)
        with pytest.raises(MaskFileError):
            store.load("a")
    path.write_bytes(good)
    assert store.load("a").density == pytest.approx(run["a"][1].metrics["density"])


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_store_refuses_bad_input_and_never_overwrites(run, tmp_path):
    from orchestrator.store.mask_store import MaskStore, StoreError

    loc = str(tmp_path / "s")
    store = MaskStore.create(loc, _backbone(), "cifar_resnet20")
    with pytest.raises(StoreError, match="already exists"):
        MaskStore.create(loc, _backbone(), "cifar_resnet20")
    with pytest.raises(StoreError, match="no mask store"):
        MaskStore(str(tmp_path / "nothing"))
    store.add("a", _task(run, "a"), codec="gzip")
    before = (tmp_path / "s" / "tasks" / "a.smnmask").read_bytes()
    with pytest.raises(StoreError, match="task 'a' already exists"):
        store.add("a", _task(run, "b"))
    assert (tmp_path / "s" / "tasks" / "a.smnmask").read_bytes() == before
    for bad in ("", "../x", "a/b", "-a", "x" * 200):
        with pytest.raises(StoreError, match="is not allowed"):
            store.add(bad, _task(run, "a"))
    with pytest.raises(ValueError, match="codec 'zip' is not known"):
        store.add("c", _task(run, "a"), codec="zip")
    with pytest.raises(StoreError, match="task 'zzz' is not in .*stored tasks: a"):
        store.apply("zzz")
    bad_masks = dict(run["a"][1].masks)
    bad_masks["layer1.0.conv1.weight"] = bad_masks["layer1.0.conv1.weight"][:8]
    with pytest.raises(BackboneMismatchError, match="layer1.0.conv1.weight: mask \\(8, 16, 3, 3\\) vs backbone \\(16, 16, 3, 3\\)"):
        task_mask_from_state(bad_masks, _backbone())
    with pytest.raises(StoreError, match="exists already"):
        store.export("a", str(tmp_path / "s" / "store.json"))


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_cli_add_from_finished_cell_export_and_codec_tables(run, tmp_path, capsys):
    from orchestrator.engine.cell import CellJob, land
    from orchestrator.results.layout import ExperimentLayout
    from orchestrator.cli.app import main
    from orchestrator.cli.commands.read import table_text
    from orchestrator.spec.experiment import cell_id_of
    from smn_core.backbones import build_backbone

    cfg, res, _ = run["a"]
    results, cell_id = str(tmp_path / "results"), cell_id_of(cfg)
    land(CellJob(cfg, cell_id, cell_id, {}, ExperimentLayout.of(results, "exp")), res, time.time())  # a finished cell
    store = str(tmp_path / "store")
    ckpt = str(shared_path(*CIFAR_CKPT))
    assert main(["store", "init", store, "--arch", "cifar_resnet20", "--weights", "checkpoint", "--checkpoint", ckpt]) == 0
    assert main(["store", "add", store, "t1", "--results", results, "--experiment", "exp", "--cell", cell_id]) == 0
    assert main(["store", "add", store, "t2", "--masks", f"{results}/exp/masks/{cell_id}.safetensors"]) == 0
    assert main(["store", "add", store, "t3", "--results", results, "--experiment", "exp", "--cell", "nope"]) == 2
    assert "cell 'nope' is not in the ledger" in capsys.readouterr().err
    assert main(["store", "list", store, "--format", "csv"]) == 0
    listing = capsys.readouterr().out
    assert "t1,zstd" in listing and "t2,zstd" in listing and "t3" not in listing  # the default codec
    assert main(["store", "show", store, "t1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["spec"]["cell_id"] == cell_id and shown["has_head"] and shown["num_buffers"] > 0
    # export: plain masks round trip; baked weights load as a checkpoint and compute the trained model
    out_masks, out_w = str(tmp_path / "m.safetensors"), str(tmp_path / "w.safetensors")
    assert main(["store", "export", store, "t1", out_masks]) == 0
    exported = load_file(out_masks)
    assert exported.keys() == res.masks.keys() and all(torch.equal(exported[k], res.masks[k]) for k in res.masks)
    assert main(["store", "apply", store, "t1", "--out", out_w]) == 0
    baked = build_backbone("cifar_resnet20", "checkpoint", checkpoint=out_w)
    feats, logits = _reference(run, "a", run["x"])
    with torch.no_grad():
        assert torch.equal(baked.model.eval()(run["x"]), feats)
        assert torch.equal(baked.classifier(baked.model(run["x"])), logits)
    # codec measurements land in the ledger as cells and tables 6 and 7 come from it
    assert main(["store", "bench-codecs", store, "t1", "--results", results, "--repeats", "1"]) == 0
    capsys.readouterr()
    table6 = table_text(results, "storage", "markdown", None, layout="table6")
    table7 = table_text(results, "storage", "csv", None, layout="table7")
    for codec in ("gzip", "bz2", "lzma", "lz4", "snappy", "zstd", "smn-ctx"):
        assert f"| {codec} " in table6
    assert "H(density=" in table6 and "smn-ctx" not in table7 and ",lzma," in table7
    # a rerun is a resume: nothing measured twice
    assert main(["store", "bench-codecs", store, "t1", "--results", results, "--repeats", "1"]) == 0
    assert "0 codec cells written" in capsys.readouterr().out


@pytest.mark.unit
def test_header_is_readable_without_decoding():
    masks = {"w": torch.tensor([[True, False], [True, True]])}
    task = TaskMask(masks=masks, backbone_hash="sha256:" + "0" * 64, arch="x", spec={"k": 1})
    data = encode_mask_file(task, codec="none")
    h = read_mask_header(data[: 8 + int.from_bytes(data[:8], "little")])  # the header bytes only
    assert h["codec"] == "none" and h["entries"] == [("w", (2, 2), 3)] and h["density"] == 0.75
    assert decode_mask_file(data).masks["w"].equal(masks["w"])
    with pytest.raises(ValueError, match="backbone_hash 'abc' is not of the form"):
        TaskMask(masks=masks, backbone_hash="abc")
    with pytest.raises(ValueError, match="must be a bool tensor"):
        TaskMask(masks={"w": torch.ones(2)}, backbone_hash="sha256:" + "0" * 64)


@pytest.mark.unit
def test_fp32_weights_from_a_state_dict_file_or_a_final_state_folder(tmp_path):
    from smn_core.checkpoint import save_checkpoint, save_tensors

    from orchestrator.store.mask_store import load_fp32_weights

    w = {"conv.weight": torch.randn(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    save_tensors(tmp_path / "w.safetensors", w)
    got = load_fp32_weights(str(tmp_path / "w.safetensors"))
    assert list(got) == ["conv.weight"] and torch.equal(got["conv.weight"], w["conv.weight"])
    save_checkpoint(tmp_path / "state", {"param.backbone.conv.weight": w["conv.weight"] + 1,
                                         "param.head.weight": torch.ones(1)}, {"epoch": 1})
    got = load_fp32_weights(f"file://{tmp_path / 'state'}")
    assert torch.equal(got["conv.weight"], w["conv.weight"] + 1)  # the backbone name, from the folder's tensors
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fp32_weights(str(tmp_path / "nothing"))
