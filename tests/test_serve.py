"""Serving a mask store's tasks (issue 29): the masked forward equals ``smn store apply`` + a plain forward,
tasks interleaved on threads do not disturb each other, a cell's linear probe becomes the task's head, and one
real Ray Serve application on 127.0.0.1 answers every HTTP path and error with the real CIFAR-10 ResNet-20 on
real CIFAR-10 test images."""

from __future__ import annotations

import io
import re
import shlex
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO, shared_path

CIFAR_CKPT = ("weights", "resnet_cifar10", "resnet20-12fca82f.th")


def _backbone(weights: str = "checkpoint"):
    from smn_core.backbones import build_backbone

    ckpt = str(shared_path(*CIFAR_CKPT)) if weights == "checkpoint" else None
    return build_backbone("cifar_resnet20", weights, checkpoint=ckpt).model


def _random_task(model, seed: int, *, head: bool, bn: bool, density: float = 0.9):
    """A task of seeded random masks at ``density`` on every conv weight (the store and the server do not care
    how masks were learned), with a 10-class head and changed BN statistics when asked."""
    from smn_core.mask_file import task_mask_from_state

    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.ndim == 4}
    state = {}
    if head:
        state |= {"param.classifier.weight": torch.randn(10, 64, generator=g),
                  "param.classifier.bias": torch.randn(10, generator=g)}
    if bn:
        state |= {"buffer.backbone.layer1.0.bn1.running_mean": torch.randn(16, generator=g) * 0.1,
                  "buffer.backbone.layer2.1.bn2.running_var": torch.rand(32, generator=g) + 0.5}
    return task_mask_from_state(masks, model, state=state or None, arch="cifar_resnet20",
                                spec={"classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                  "horse", "ship", "truck"]} if head else {})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store on the real ResNet-20: ``t0`` (head, BN statistics), ``t1`` (no head), ``broken`` (a corrupted
    copy of t1's file) and ``alien`` (a task of a randomly initialised ResNet-20), plus 12 real CIFAR-10 test
    images as JPEG bytes."""
    from smn_core.mask_file import encode_mask_file

    from orchestrator.store.mask_store import MaskStore

    root = tmp_path_factory.mktemp("serve") / "store"
    model = _backbone()
    st = MaskStore.create(str(root), model, "cifar_resnet20", weights_source="resnet20-12fca82f.th")
    st.add("t0", _random_task(model, 0, head=True, bn=True))
    st.add("t1", _random_task(model, 1, head=False, bn=False, density=0.8))
    data = bytearray((root / "tasks" / "t1.smnmask").read_bytes())
    data[-10] ^= 0xFF
    (root / "tasks" / "broken.smnmask").write_bytes(bytes(data))
    with torch.random.fork_rng():
        torch.manual_seed(7)
        alien = _backbone("random")
    (root / "tasks" / "alien.smnmask").write_bytes(encode_mask_file(_random_task(alien, 2, head=True, bn=False),
                                                                    codec="none"))
    table = pq.read_table(shared_path("data", "cifar10", "test.parquet")).slice(0, 12)
    images = [row["bytes"] for row in table.column("image").to_pylist()]
    return {"root": str(root), "images": images}


def _batch(store, n=8):
    from orchestrator.serve.model import TaskBank

    return TaskBank(store["root"]).preprocess(store["images"][:n])


@pytest.mark.unit
def test_masked_forward_equals_store_apply_and_leaves_the_backbone_untouched(store):
    from orchestrator.serve.model import MaskedModel, TaskBank
    from orchestrator.store.mask_store import MaskStore

    bank = TaskBank(store["root"])
    before = {k: v.clone() for k, v in bank.backbone.state_dict().items()}
    x = bank.preprocess(store["images"][:8])
    ref = MaskStore(store["root"])
    for task in ("t0", "t1"):
        model = bank.load(task)
        applied = ref.apply(task)
        with torch.no_grad():
            assert torch.equal(model.embed(x), applied.features(x)), task
            if task == "t0":
                assert torch.equal(model.logits(x), applied(x))
    assert all(torch.equal(v, before[k]) for k, v in bank.backbone.state_dict().items())
    # the one-liner of a script gives the same answers, in class names
    alone = MaskedModel.for_task(store["root"], "t0")
    answers = alone.classify(x)
    assert [a["label"] for a in answers] == [alone.classes[int(i)] for i in ref.apply("t0")(x).argmax(1)]
    assert alone.classes[0] == "airplane"


@pytest.mark.unit
def test_two_tasks_interleaved_on_threads_get_their_single_task_answers(store):
    from orchestrator.serve.model import TaskBank

    bank = TaskBank(store["root"])
    models = {t: bank.load(t) for t in ("t0", "t1")}
    x = bank.preprocess(store["images"][:4])
    alone = {t: m.embed(x) for t, m in models.items()}
    assert not torch.equal(alone["t0"], alone["t1"])
    order = ["t0", "t1"] * 12
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda t: (t, models[t].embed(x)), order))
    assert all(torch.equal(out, alone[t]) for t, out in got)


@pytest.mark.unit
def test_resident_task_is_a_small_fraction_of_an_fp32_copy(store):
    from orchestrator.serve.model import TaskBank

    bank = TaskBank(store["root"])
    fp32 = sum(p.numel() * 4 for p in bank.backbone.parameters())
    for task in ("t0", "t1"):
        assert bank.load(task).task.nbytes <= fp32 / 25


@pytest.mark.unit
def test_bad_tasks_and_bodies_are_refused_with_the_stores_words(store):
    from PIL import Image

    from smn_core.mask_file import BackboneMismatchError, MaskFileError

    from orchestrator.serve.model import ImageError, MaskedModel, NoHeadError, TaskBank, decode_image
    from orchestrator.store.mask_store import StoreError

    bank = TaskBank(store["root"])
    with pytest.raises(StoreError, match="task 'nope' is not in"):
        bank.load("nope")
    with pytest.raises(MaskFileError, match="checksum mismatch"):
        bank.load("broken")
    with pytest.raises(BackboneMismatchError, match="mask belongs to backbone"):
        bank.load("alien")
    with pytest.raises(NoHeadError, match="has no classification head"):
        bank.load("t1").classify(_batch(store, 2))
    with pytest.raises(ImageError, match="not a readable JPEG or PNG"):
        decode_image(b"GIF89a not really")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    with pytest.raises(ImageError, match="'GIF' is not accepted"):
        decode_image(gif.getvalue())
    assert isinstance(MaskedModel.for_task(store["root"], "t1").embed(_batch(store, 2)), torch.Tensor)


@pytest.mark.unit
def test_smn_serve_refuses_bad_input_before_ray_starts(store, tmp_path, capsys):
    from orchestrator.cli.app import COMMANDS, main

    assert COMMANDS["serve"] == "orchestrator.cli.commands.serve:serve"
    empty = tmp_path / "empty_key"
    empty.write_text("\n")
    cases = [
        ([str(tmp_path / "nostore")], "no mask store at"),
        ([store["root"], "--port", "70000"], "--port must be in 1-65535, got 70000"),
        ([store["root"], "--replicas", "0"], "--replicas must be >= 1, got 0"),
        ([store["root"], "--max-tasks-per-replica", "0"], "--max-tasks-per-replica must be >= 1"),
        ([store["root"], "--host", "0.0.0.0"], "needs --api-key-file"),
        ([store["root"], "--host", "0.0.0.0", "--api-key-file", str(empty)], "is empty"),
        ([store["root"], "--api-key-file", str(tmp_path / "missing")], "is not readable"),
    ]
    for argv, words in cases:  # the unit tier's guard makes any ray.init fail: none of these starts Ray
        assert main(["serve", *argv]) == 2, argv
        assert words in capsys.readouterr().err, argv
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", store["root"], "--port", str(taken.getsockname()[1])]) == 2
    assert "is taken" in capsys.readouterr().err


@pytest.mark.unit
def test_store_add_head_file_folds_the_probe_standardisation_into_the_head(store, tmp_path, capsys):
    from smn_core.checkpoint import save_tensors

    from orchestrator.cli.app import main
    from orchestrator.serve.model import MaskedModel
    from orchestrator.store.mask_store import MaskStore

    g = torch.Generator().manual_seed(3)
    probe = {"weight": torch.randn(3, 64, generator=g, dtype=torch.float64),
             "bias": torch.randn(3, generator=g, dtype=torch.float64),
             "mean": torch.rand(64, generator=g, dtype=torch.float64),
             "scale": torch.rand(64, generator=g, dtype=torch.float64) + 0.5, "labels": torch.tensor([0, 2, 3])}
    head_file = str(tmp_path / "probe.safetensors")
    save_tensors(head_file, probe, metadata={"classes": '["koala", "goose", "snail", "slug"]'})
    masks = str(tmp_path / "t1_masks.safetensors")
    MaskStore(store["root"]).export("t1", masks)
    assert main(["store", "add", store["root"], "t1-probe", "--masks", masks, "--head", head_file]) == 0
    model = MaskedModel.for_task(store["root"], "t1-probe")
    assert model.classes == ["koala", "snail", "slug"]  # the probe's outputs are labels 0, 2 and 3
    x = _batch(store, 4)
    feats = model.embed(x).double()
    want = ((feats - probe["mean"]) / probe["scale"]) @ probe["weight"].T + probe["bias"]
    assert torch.allclose(model.logits(x).double(), want, atol=1e-4)
    capsys.readouterr()
    assert main(["store", "add", store["root"], "t1-bad", "--masks", masks, "--head", masks]) == 2
    assert "a probe head file holds" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_store_add_from_a_cell_keeps_its_linear_probe_as_the_head(tmp_path):
    """A real smn cell (one SwAV step on 32 CIFAR-10 images, then k-NN and the linear probe) lands its probe;
    ``smn store add`` makes it the task's head, and that head on the served features reproduces the cell's
    own probe accuracy on its test images, in CIFAR-10's class names."""
    from orchestrator.cli.app import main
    from orchestrator.engine.cell import CellJob, land
    from orchestrator.results.layout import ExperimentLayout
    from orchestrator.serve.model import MaskedModel
    from orchestrator.spec.experiment import cell_id_of
    from smn_core.data import load_dataset
    from smn_core.pipeline import run_cell
    from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
    from smn_core.training import TrainConfig

    root = str(shared_path("data", "cifar10"))
    cfg = CellConfig(method="smn", seed=0, backbone=BackboneSpec("cifar_resnet20", "checkpoint",
                                                                 str(shared_path(*CIFAR_CKPT))),
                     dataset=DataSpec(source="parquet", root=root, max_train_samples=32, max_test_samples=16),
                     train=TrainConfig(epochs=1, batch_size=32, score_lr=2000.0, schedule="constant"),
                     eval=EvalSpec(knn_k=2, knn_dino_k=2))
    res = run_cell(cfg)
    results, cell_id = str(tmp_path / "results"), cell_id_of(cfg)
    land(CellJob(cfg, cell_id, cell_id, {}, ExperimentLayout.of(results, "exp")), res, time.time())
    assert (tmp_path / "results" / "exp" / "probes" / f"{cell_id}.safetensors").is_file()
    store = str(tmp_path / "store")
    assert main(["store", "init", store, "--arch", "cifar_resnet20", "--weights", "checkpoint", "--checkpoint",
                 str(shared_path(*CIFAR_CKPT))]) == 0
    assert main(["store", "add", store, "c10", "--results", results, "--experiment", "exp", "--cell", cell_id]) == 0
    model = MaskedModel.for_task(store, "c10")
    assert model.has_head and model.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                "horse", "ship", "truck"]
    test = load_dataset("parquet", "test", root=root, max_samples=16)
    x = model.preprocess([test[i][0] for i in range(len(test))])
    labels = np.array([test[i][1] for i in range(len(test))])
    answers = model.classify(x)
    top1 = float(np.mean([a["index"] == y for a, y in zip(answers, labels)]))
    assert top1 == pytest.approx(res.metrics["linear_probe_top1"], abs=1.5 / len(test))
    assert all(a["label"] == model.classes[a["index"]] for a in answers)


# ---------------------------------------------------------------------------------------------- the Serve app

DOCS = REPO / "docs" / "serve.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curl_example() -> list[str]:
    """The ``curl`` line of docs/serve.md marked ``<!-- tested: tests/test_serve.py -->``, split like a shell."""
    text = DOCS.read_text()
    block = text.split("<!-- tested: tests/test_serve.py -->", 1)[1]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("curl "))
    return shlex.split(line.strip())


def _run_curl_like(argv: list[str], *, base: str, key: str, image: Path):
    """Do what the documented curl line does, with ``requests`` (same method, URL path, headers, body)."""
    import requests

    assert argv[0] == "curl"
    method, headers, body, url = "GET", {}, None, None
    it = iter(argv[1:])
    for a in it:
        if a in ("-s", "--silent", "-S", "--fail"):
            continue
        if a == "-X":
            method = next(it)
        elif a == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip().replace("$(cat api_key)", key)
        elif a == "--data-binary":
            ref = next(it)
            assert ref.startswith("@"), ref
            body, method = image.read_bytes(), "POST" if method == "GET" else method
        else:
            url = a
    path = re.sub(r"^https?://[^/]+", "", url)
    path = re.sub(r"^/v1/tasks/[^/]+/", "/v1/tasks/t0/", path)  # the docs' task name -> this store's
    return requests.request(method, base + path, headers=headers, data=body, timeout=60)


@pytest.fixture(scope="module")
def app(store, tmp_path_factory):
    """One real Serve application on 127.0.0.1 (session Ray): one model replica holding one task at a time (so
    two interleaved tasks make it evict and reload while requests are in flight), a bearer token, a 64 KiB
    body limit."""
    from ray import serve

    from orchestrator.serve.app import build_app

    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text("s3cret-token-for-tests\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(store["root"], replicas=1, max_tasks=1, api_key_file=str(key_file),
                        max_body_bytes=64 * 1024, replica_cpus=0.5), name="smn", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "key": "s3cret-token-for-tests"}
    serve.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_app_answers_every_path_error_and_interleaved_tasks(app, store, tmp_path):
    import requests

    from orchestrator.serve.model import TaskBank

    base, auth = app["base"], {"Authorization": f"Bearer {app['key']}"}

    def post(task, op, body, headers=auth):
        return requests.post(f"{base}/v1/tasks/{task}/{op}", data=body, headers=headers, timeout=60)

    # 401 without or with a wrong token, on every endpoint
    assert requests.get(f"{base}/v1/tasks", timeout=60).status_code == 401
    assert post("t0", "embed", store["images"][0], headers={"Authorization": "Bearer nope"}).status_code == 401
    listing = requests.get(f"{base}/v1/tasks", headers=auth, timeout=60)
    assert listing.status_code == 200 and listing.json()["arch"] == "cifar_resnet20"
    assert {t["task"]: t["has_head"] for t in listing.json()["tasks"]}["t0"] is True

    # the answers are the masked model's
    bank = TaskBank(store["root"])
    local = {t: bank.load(t) for t in ("t0", "t1")}
    ref = {t: m.embed(bank.preprocess(store["images"])) for t, m in local.items()}
    r = post("t0", "classify", store["images"][3])
    assert r.status_code == 200
    expected = local["t0"].answers(local["t0"].logits_of(ref["t0"][3:4]))[0]
    assert r.json()["label"] == expected["label"] and r.json()["index"] == expected["index"]

    # errors: each with the store's or the gateway's words; none takes a replica down
    errors = {
        (404, "is not in the store"): post("nope", "embed", store["images"][0]),
        (404, "no classification head"): post("t1", "classify", store["images"][0]),
        (409, "checksum mismatch"): post("broken", "embed", store["images"][0]),
        (409, "mask belongs to backbone"): post("alien", "embed", store["images"][0]),
        (400, "not a readable JPEG or PNG"): post("t0", "embed", b"definitely not an image"),
        (413, "exceeds 65536 bytes"): post("t0", "embed", b"\xff" * (65 * 1024)),
    }
    for (status, words), resp in errors.items():
        assert resp.status_code == status and words in resp.json()["error"], (status, resp.text)

    # two tasks interleaved, concurrently, on a replica that holds one task at a time: every answer is its own task's
    jobs = [("t0" if i % 2 == 0 else "t1", i % len(store["images"])) for i in range(48)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda j: (j, post(j[0], "embed", store["images"][j[1]])), jobs))
    for (task, i), resp in got:
        assert resp.status_code == 200, resp.text
        assert torch.allclose(torch.tensor(resp.json()["embedding"]), ref[task][i], atol=1e-5), (task, i)

    # the documented curl example, as written in docs/serve.md
    image = tmp_path / "cat.jpg"
    image.write_bytes(store["images"][0])
    resp = _run_curl_like(_curl_example(), base=base, key=app["key"], image=image)
    assert resp.status_code == 200 and "label" in resp.json(), resp.text


@pytest.mark.unit
def test_the_gateway_imports_nothing_that_imports_torch():
    """The gateway replica loads :mod:`orchestrator.serve.gateway` (the model side is in ``app.py``): no module of
    this repo that it imports, followed transitively (parent packages included; what runs at import: module-level
    statements, not function bodies nor ``if TYPE_CHECKING:``), imports torch, so a gateway starts without paying
    for it. The walk does see torch where it is imported."""
    import ast

    def import_time_nodes(tree):
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo.extend(node.orelse)
                continue
            yield node
            todo.extend(ast.iter_child_nodes(node))

    def third_party(start: str) -> set[str]:
        seen, todo, found = set(), [start], set()
        while todo:
            mod = todo.pop()
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # a module's parent packages run first
                name = ".".join(parts[:i])
                path = REPO / (name.replace(".", "/") + ".py")
                path = path if path.is_file() else REPO / name.replace(".", "/") / "__init__.py"
                if name in seen or not path.is_file():
                    continue
                seen.add(name)
                for node in import_time_nodes(ast.parse(path.read_text())):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                    else:
                        continue
                    for n in names:
                        if n.split(".")[0] in ("orchestrator", "smn_core"):
                            todo.append(n)
                        else:
                            found.add(n.split(".")[0])
        return found

    assert "torch" in third_party("orchestrator.serve.app") and "fastapi" in third_party("orchestrator.serve.gateway")
    assert "torch" not in third_party("orchestrator.serve.gateway")


@pytest.mark.unit
def test_serve_config_yaml_is_a_valid_serve_config_of_this_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.serve.app import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    (app_cfg,) = config.applications
    assert app_cfg.import_path == "orchestrator.serve.app:app_builder" and config.http_options.host == "127.0.0.1"
    with pytest.raises(ValueError, match="no mask store at"):
        app_builder(dict(app_cfg.args))  # the EDIT placeholder is refused before any replica starts
    with pytest.raises(ValueError, match="unknown \\['replica'\\]"):
        app_builder({"store": "x", "replica": 2})


@pytest.mark.unit
def test_every_serve_curl_line_of_readme_is_the_one_the_app_test_runs():
    """README's pointer to serving (added by the coordinator) may only quote docs/serve.md's tested curl line."""
    tested = " ".join(_curl_example())
    readme = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
              if ln.strip().startswith("curl ") and "/v1/tasks" in ln]
    assert all(" ".join(shlex.split(ln)) == tested for ln in readme), readme


@pytest.mark.cluster
@pytest.mark.slow
def test_smn_serve_subprocess_answers_then_ctrl_c_exits_cleanly_and_frees_the_port(store, tmp_path):
    """``smn serve STORE`` as a user runs it: a fresh process with a Ray of its own on 127.0.0.1; once it answers,
    ``/classify`` equals the masked model's answer, ``/embed`` its features, a non-image body gets 400, and
    Ctrl-C (SIGINT to the process group, as a terminal sends it) exits 0 without a traceback, frees the port and
    leaves no Ray process behind."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import psutil
    import requests

    from orchestrator.serve.model import TaskBank
    from tests.conftest import kill_driver_tree

    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="smnsv")  # short: Ray's socket paths live under it; marks its processes
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    base = f"http://127.0.0.1:{port}"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", store["root"], "--port", str(port),
                                 "--max-tasks-per-replica", "2", "--replica-cpus", "0.5"], cwd=REPO, env=env,
                                stdout=out, stderr=err, start_new_session=True)
        started = time.time()
        try:
            model = TaskBank(store["root"]).load("t0")  # the expected answers, while the server starts
            x = model.preprocess(store["images"][:2])
            want_feats, want = model.embed(x), model.classify(x)
            deadline = started + 240
            while True:  # the deadline covers imports, Ray's start, the deployments and the replica's backbone load
                assert proc.poll() is None, err_path.read_text()[-3000:]
                assert time.time() < deadline, "smn serve did not answer in 240 s:\n" + err_path.read_text()[-3000:]
                try:  # ready: it said so (after serve.run returned) and it answers
                    if "serving " in out_path.read_text() and requests.get(f"{base}/v1/tasks", timeout=5).ok:
                        break
                except requests.RequestException:  # not listening yet, or the application still deploying
                    pass
                time.sleep(0.5)
            print(f"smn serve answered {time.time() - started:.1f} s after its start")
            assert f"serving {store['root']} at {base}/v1/tasks" in out_path.read_text()
            r = requests.post(f"{base}/v1/tasks/t0/classify", data=store["images"][0], timeout=60)
            assert r.status_code == 200 and r.json()["label"] == want[0]["label"], r.text
            r = requests.post(f"{base}/v1/tasks/t0/embed", data=store["images"][1], timeout=60)
            assert r.status_code == 200, r.text
            assert torch.allclose(torch.tensor(r.json()["embedding"]), want_feats[1], atol=1e-5)
            r = requests.post(f"{base}/v1/tasks/t0/embed", data=b"not an image", timeout=60)
            assert r.status_code == 400 and "not a readable JPEG or PNG" in r.json()["error"], r.text
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
            rc = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                kill_driver_tree(proc, ray_tmp)
    stderr = err_path.read_text()
    assert rc == 0 and "smn serve: stopped (Ctrl-C)" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    from orchestrator.cli.commands.serve import _port_free

    left, free = [], False
    deadline = time.time() + 30  # Ray's node processes (the HTTP proxy among them) end once the driver has gone
    while time.time() < deadline:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(ray_tmp in a for a in p.info["cmdline"] or [])]
        free = _port_free("127.0.0.1", port)  # as `smn serve` checks it: a restart on the same port is accepted
        if free and not left:
            break
        time.sleep(0.5)
    print(f"port free and Ray gone {time.time() - deadline + 30:.1f} s after the exit")
    assert free, f"port {port} is still taken after smn serve exited"
    assert not left, f"Ray processes of smn serve still running: {left}"
    shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's session logs (kept when the test fails)
