"""Serving many tasks from one backbone (issue 29): task switch, memory, store size, throughput, latency.

All on the CPU with the real CIFAR-10 ResNet-20 (``../shared/weights``; the area is skipped without it) and
real CIFAR-10 test images. Two stores:

* **50 real tasks**: the masks of 50 short real cells run here (``smn`` and ``supervised_mask`` x CIFAR-10 and
  the Tiny ImageNet subset of ``../shared`` x seeds 0-12, the first 50 of those 52; 128 train images, one
  epoch at score lr 2000, BN statistics adapted); the supervised ones carry their trained head. Cached in
  ``results/bench_serve_masks/`` (ignored by git) so a second run skips the training.
* **1,000 tasks for the scale figures**: derived from the real masks by seeded random flips (task ``i``:
  real mask ``i % 50`` with 1 % of its kept weights dropped and as many dropped weights kept, so each task
  keeps its real mask's density exactly). Synthetic flips add entropy a real mask would not have, so the
  store's size is an upper bound for real tasks.

Each store is written with two codecs side by side: ``zstd`` (the default: bit-packed masks + Zstandard level 19,
decoded in well under a millisecond) and ``smn-ctx`` (the context coder: about 6 % smaller, slow to decode); the real
tasks also with ``none`` (1 bit/weight). The cold task switch and the store size are measured on both, and the
zstd 1,000-task store, whose size the size row gives, is also timed for its cold switch (one store, both
figures). The throughput and latency rows serve the zstd stores (every task resident: the codec plays no part).

Figures (each row says what it is set against):

* task switch: building a resident task's masked tensors (unpack + ``W * M / alpha``), and a task not yet
  resident (read, verify and decode its file, then build), against one forward of a batch of 32, and
  against loading a fine-tuned fp32 copy from disk (safetensors, into the model); the zstd cold switch also
  step by step (read, verify, decode, checks, build);
* memory per resident task (bit-packed masks, BN statistics, head) against an fp32 copy;
* the 1,000-task store on disk against 1,000 fp32 copies;
* throughput, in process (:class:`orchestrator.serve.model.TaskBank`, batches of 32 requests): a uniform
  mix over 1,000 tasks (each batch grouped by task) against one task; and over HTTP (a real Serve
  application on 127.0.0.1, the same replicas for both mixes);
* ``/embed`` latency p50 / p99 at half of the mix's peak HTTP throughput (open loop);
* ``/classify`` answers against ``smn store apply`` + a plain forward on 200 real CIFAR-10 test images.

    .venv/bin/python -m benchmarks.run_all --only serve --out /tmp/bench-serve
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import MB, Row, Settings, compared, interleave, median, note_row

AREA = "serve"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CKPT = SHARED / "weights" / "resnet_cifar10" / "resnet20-12fca82f.th"
DATASETS = {"c10": SHARED / "data" / "cifar10", "tin": SHARED / "data" / "tinyimagenet_dev10"}
CACHE = REPO / "results" / "bench_serve_masks"
FLIP = 0.01  # share of kept weights dropped (and of dropped weights kept) per derived task


def _cell(method: str, seed: int, data: str):
    from smn_core.config import BackboneSpec, CellConfig, DataSpec
    from smn_core.training import TrainConfig

    return CellConfig(method=method, seed=seed, backbone=BackboneSpec("cifar_resnet20", "checkpoint", str(CKPT)),
                      dataset=DataSpec(source="parquet", root=str(DATASETS[data]), image_size=32,
                                       max_train_samples=128, max_test_samples=16),
                      train=TrainConfig(epochs=1, batch_size=64, score_lr=2000.0, schedule="constant",
                                        bn_mode="adapt"))


def real_tasks(n: int, log) -> list[tuple[str, object]]:
    """``n`` real tasks (:class:`smn_core.mask_file.TaskMask`), trained here or read from :data:`CACHE`."""
    from safetensors.torch import load_file, save_file

    from smn_core.backbones import build_backbone
    from smn_core.pipeline import run_cell
    from smn_core.mask_file import task_mask_from_state

    backbone = build_backbone("cifar_resnet20", "checkpoint", checkpoint=str(CKPT)).model
    CACHE.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        method = "smn" if i % 2 == 0 else "supervised_mask"
        data = "c10" if (i // 2) % 2 == 0 else "tin"
        seed = i // 4
        name = f"{method}-{data}-s{seed}"
        mfile, sfile = CACHE / f"{name}.masks.safetensors", CACHE / f"{name}.state.safetensors"
        if not (mfile.is_file() and sfile.is_file()):
            t0 = time.perf_counter()
            res = run_cell(_cell(method, seed, data), evaluate=False)
            save_file({k: v.contiguous() for k, v in res.masks.items()}, str(mfile))
            save_file({k: v.detach().contiguous() for k, v in res.state.items()}, str(sfile))
            log(f"cell {name}: {time.perf_counter() - t0:.1f} s")
        task = task_mask_from_state(load_file(str(mfile)), backbone, state=load_file(str(sfile)),
                                    arch="cifar_resnet20", spec={"cell": name})
        out.append((name, task))
    return out


def flipped(task, seed: int):
    """A derived task: ``task``'s masks with :data:`FLIP` of the kept weights dropped and as many dropped
    weights kept (seeded; the density of every tensor is unchanged)."""
    from smn_core.mask_file import TaskMask

    g = np.random.default_rng(seed)
    masks = {}
    for name, m in task.masks.items():
        flat = m.numpy().reshape(-1).copy()
        ones, zeros = np.flatnonzero(flat), np.flatnonzero(~flat)
        k = min(int(round(FLIP * ones.size)), zeros.size)
        flat[g.choice(ones, k, replace=False)] = False
        flat[g.choice(zeros, k, replace=False)] = True
        masks[name] = torch.from_numpy(flat.reshape(m.shape))
    return TaskMask(masks, task.backbone_hash, task.arch, {"derived_from": task.spec, "seed": seed}, task.head,
                    task.buffers)


def _images(n: int) -> list[bytes]:
    import pyarrow.parquet as pq

    table = pq.read_table(DATASETS["c10"] / "test.parquet").slice(0, n)
    return [r["bytes"] for r in table.column("image").to_pylist()], table.column("label").to_pylist()


def build_stores(s: Settings, n_real: int, n_scale: int, log):
    """``({codec: store of the real tasks}, {codec: scale store}, real task names, fp32 bytes of one copy)``;
    codecs ``zstd`` (the default: packed bits + Zstandard, fast to decode), ``smn-ctx`` (the smallest) and, for the
    real tasks, ``none`` (1 bit/weight)."""
    from smn_core.backbones import build_backbone

    from orchestrator.store.mask_store import MaskStore

    model = build_backbone("cifar_resnet20", "checkpoint", checkpoint=str(CKPT)).model
    tasks = real_tasks(n_real, log)
    real, scale = {}, {}
    for codec in ("smn-ctx", "zstd", "none"):
        real[codec] = MaskStore.create(str(s.work / f"real_{codec}"), model, "cifar_resnet20", weights_source=str(CKPT))
        for name, t in tasks:
            real[codec].add(name, t, codec=codec)
    derived = [flipped(tasks[i % len(tasks)][1], seed=i) for i in range(n_scale)]
    for codec in ("smn-ctx", "zstd"):
        scale[codec] = MaskStore.create(str(s.work / f"scale_{codec}"), model, "cifar_resnet20",
                                        weights_source=str(CKPT))
        t0 = time.perf_counter()
        for i, t in enumerate(derived):
            scale[codec].add(f"task{i:04d}", t, codec=codec)
        log(f"{n_scale} derived tasks encoded with {codec} in {time.perf_counter() - t0:.1f} s")
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    return real, scale, [n for n, _ in tasks], fp32


def switch_rows(s: Settings, real: dict, scale: dict, names, fp32_bytes) -> list[Row]:
    """Task switch (resident, and cold from each codec's store) against a forward of 32 and against loading an
    fp32 copy."""
    from safetensors.torch import load_file

    from smn_core.backbones import build_backbone

    from orchestrator.serve.model import TaskBank

    banks = {c: TaskBank(st) for c, st in real.items()}
    scale_bank = TaskBank(scale["zstd"])
    scale_names = [i.task for i in scale["zstd"].list()]
    bank = banks["smn-ctx"]
    images, _ = _images(32)
    x = bank.preprocess(images)
    models = [bank.load(n) for n in names]
    for b in (*banks.values(), scale_bank):  # first decode of each store: backbone contexts, imports
        b.masked_state(b.load(names[0] if b is not scale_bank else scale_names[0]).task)
    copy = str(s.work / "finetuned_fp32.safetensors")
    real["smn-ctx"].export(names[0], copy, fmt="weights")
    target = build_backbone("cifar_resnet20", "checkpoint", checkpoint=str(CKPT)).model.eval()
    state = {n: v.clone() for n, v in target.state_dict().items()}
    it = iter(range(10**9))

    def cold(b, pool):
        return lambda: b.masked_state(b.load(pool[next(it) % len(pool)]).task)

    def resident():
        bank.masked_state(models[next(it) % len(models)].task)

    def forward():
        with torch.no_grad():
            target(x)

    def fp32_load():
        target.load_state_dict({k: v for k, v in load_file(copy).items() if k in state}, strict=False)

    rounds = 10 if s.quick else 60
    t = interleave({"resident": resident, "forward": forward, "fp32": fp32_load,
                    **{f"cold_{c}": cold(b, names) for c, b in banks.items()},
                    "cold_scale_zstd": cold(scale_bank, scale_names), **_cold_steps(real["zstd"], banks["zstd"], names),
                    "fp32_read": lambda: load_file(copy)}, rounds)
    m = {k: median(v) for k, v in t.items()}
    mem = statistics.mean(md.task.nbytes for md in models)
    note = f"median of {rounds} interleaved; {len(names)} real tasks; CIFAR-10 ResNet-20 on 32x32"
    fwd = "one forward, batch of 32"
    fp32 = "load a fine-tuned fp32 copy from disk (safetensors into the model)"
    return [
        compared(AREA, "task switch, resident task (unpack + W*M/alpha)", m["resident"], "s", fwd, m["forward"],
                 ideal=0.2, notes=note, settings=s, repeats=rounds),
        compared(AREA, "task switch, cold task, store coded with smn-ctx (read + verify + decode + build)",
                 m["cold_smn-ctx"], "s", fwd, m["forward"], ideal=0.2, notes=note, settings=s, repeats=rounds),
        compared(AREA, "task switch, cold task, store coded with zstd (read + verify + decode + build)",
                 m["cold_zstd"], "s", fwd, m["forward"], ideal=0.2, notes=note, settings=s, repeats=rounds),
        compared(AREA, f"task switch, cold task, the {len(scale_names):,}-task zstd store of the size row",
                 m["cold_scale_zstd"], "s", fwd, m["forward"], ideal=0.2,
                 notes=note.replace(f"{len(names)} real tasks", f"{len(scale_names):,} derived tasks"), settings=s,
                 repeats=rounds),
        compared(AREA, "task switch, cold task, store coded with none (1 bit/weight)", m["cold_none"], "s", fwd,
                 m["forward"], ideal=0.2, notes=note, settings=s, repeats=rounds),
        compared(AREA, "task switch, resident task", m["resident"], "s", fp32, m["fp32"],
                 notes=note + "; the copy is in the page cache", settings=s, repeats=rounds),
        compared(AREA, "task switch, cold task, zstd store", m["cold_zstd"], "s", fp32, m["fp32"],
                 notes=note + "; the copy is in the page cache", settings=s, repeats=rounds),
        compared(AREA, "task switch, cold task, smn-ctx store", m["cold_smn-ctx"], "s", fp32, m["fp32"],
                 notes=note + "; the copy is in the page cache", settings=s, repeats=rounds),
        compared(AREA, "memory per resident task (packed masks, BN stats, head)", mem / MB, "MB",
                 "one fp32 copy of the backbone", fp32_bytes / MB, ideal=1 / 25, notes=note, settings=s),
        *[compared(AREA, f"cold switch of a zstd task, step by step: {what}", m[key], "s", fp32, m["fp32"],
                   notes=note, settings=s, repeats=rounds) for key, what in _STEPS.items()],
        compared(AREA, "the fp32 copy's own read (safetensors load_file, no load_state_dict)", m["fp32_read"], "s",
                 fp32, m["fp32"], notes=note + "; the copy is in the page cache", settings=s, repeats=rounds),
    ]


_STEPS = {"step_read": "1 read the file", "step_verify": "2 verify (header, length, SHA-256 checksum)",
          "step_decode": "3 verify + decode to packed bits", "step_load": "4 = 1-3 + backbone checks + alpha (TaskBank.load)",
          "step_build": "5 build W*M/alpha (masked_state)"}


def _cold_steps(store, bank, names) -> dict:
    """Timed parts of a cold task switch on ``store`` (its tasks cycled): the keys of :data:`_STEPS`."""
    from smn_core.mask_file import decode_packed_mask_file, verify_mask_file

    def read(n):
        with store.fs.open_input_stream(store.files.task(n)) as f:
            return f.read()

    blobs = {n: read(n) for n in names}
    resident = {n: bank.load(n) for n in names}
    weights = store.backbone_weights()
    it = iter(range(10**9))

    def pick():
        return names[next(it) % len(names)]

    return {"step_read": lambda: read(pick()), "step_verify": lambda: verify_mask_file(blobs[pick()]),
            "step_decode": lambda: decode_packed_mask_file(blobs[pick()], weights=weights),
            "step_load": lambda: bank.load(pick()), "step_build": lambda: bank.masked_state(resident[pick()].task)}


def store_size_rows(s: Settings, scale: dict, fp32_bytes) -> list[Row]:
    """Each scale store's size on disk against as many fp32 copies."""
    rows = []
    for codec, store in scale.items():
        infos = store.list()
        total = sum(i.file_bytes for i in infos)
        bpw = statistics.mean(i.bits_per_weight for i in infos)
        rows.append(compared(AREA, f"{len(infos):,}-task store on disk ({codec})", total / MB, "MB",
                             f"{len(infos):,} fp32 copies", len(infos) * fp32_bytes / MB, ideal=1 / 40,
                             notes=f"mean {bpw:.3f} bits/weight incl. BN stats and heads; tasks derived from real "
                             f"masks by {FLIP:.0%} seeded flips each way", settings=s))
    return rows


def inprocess_throughput(s: Settings, scale, n_scale: int) -> list[Row]:
    """Batches of 32 requests through TaskBank: one task vs a uniform mix over every task (grouped)."""
    from orchestrator.serve.model import TaskBank

    bank = TaskBank(scale)
    images, _ = _images(32)
    x = bank.preprocess(images)
    names = [f"task{i:04d}" for i in range(n_scale)]
    rng = np.random.default_rng(0)
    rounds = 4 if s.quick else 10
    plans_list = [rng.choice(names, size=32) for _ in range(rounds)]  # the mixed batches, drawn up front
    plans = iter(plans_list)
    needed = sorted(set(np.concatenate(plans_list)) | set(names[:64]))
    resident = {n: bank.load(n) for n in needed}  # resident before timing (the LRU's steady state)

    def one_task():
        resident[names[0]].embed(x)

    def mix():
        tasks = next(plans)
        for t in sorted(set(tasks)):
            resident[t].embed(x[tasks == t])

    cached = {n: bank.masked_state(resident[n].task) for n in names[:64]}  # materialised fp32 weights

    def mix_cached():  # the same mix with a per-task weight cache (64 tasks, so that it fits in memory)
        tasks = rng.choice(names[:64], size=32)
        for t in sorted(set(tasks)):
            bank.forward_with(cached[t], x[tasks == t])

    def mix8():  # a mix over 8 tasks: groups of ~4 images
        tasks = rng.choice(names[:8], size=32)
        for t in sorted(set(tasks)):
            resident[t].embed(x[tasks == t])

    t = interleave({"one": one_task, "mix": mix, "mix_cached": mix_cached, "mix8": mix8}, rounds)
    one = 32 / median(t["one"])
    note = f"median of {rounds} interleaved batches of 32; every task resident"
    return [
        compared(AREA, f"in-process throughput, uniform mix over {n_scale:,} tasks (batches of 32 grouped by task)",
                 32 / median(t["mix"]), "images/s", "one task, batches of 32", one, ideal=0.8, better="higher",
                 notes=note + "; a mixed batch holds ~32 tasks: ~32 forwards of one image plus 32 mask builds",
                 settings=s, repeats=rounds),
        compared(AREA, "in-process throughput, uniform mix, per-task fp32 weight cache (no mask build)",
                 32 / median(t["mix_cached"]), "images/s", "one task, batches of 32", one, ideal=0.8, better="higher",
                 notes=note + f"; the cache costs {sum(v.numel() * 4 for v in next(iter(cached.values())).values()) / MB:.2f} "
                 "MB per task (64 tasks cached)", settings=s, repeats=rounds),
        compared(AREA, "in-process throughput, uniform mix over 8 tasks (groups of ~4)", 32 / median(t["mix8"]),
                 "images/s", "one task, batches of 32", one, ideal=0.8, better="higher", notes=note, settings=s,
                 repeats=rounds),
    ]


def _closed_loop(post, tasks, images, concurrency: int, n: int) -> float:
    """Requests per second with ``concurrency`` clients sending ``n`` requests in all."""
    def one(i):
        r = post(tasks[i % len(tasks)], images[i % len(images)])
        assert r.status_code == 200, r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


def _open_loop(post, tasks, images, rate: float, n: int) -> list[float]:
    """Latencies (s) of ``n`` requests sent at ``rate`` per second (fixed schedule, not waiting for answers)."""
    lat, lock = [], threading.Lock()
    start = time.perf_counter() + 0.2

    def one(i):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        r = post(tasks[i % len(tasks)], images[i % len(images)])
        with lock:
            lat.append(time.perf_counter() - t0 if r.status_code == 200 else float("nan"))

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(one, range(n)))
    return lat


def http_rows(s: Settings, real, scale, n_scale: int) -> list[Row]:
    """A real Serve application: throughput one task vs mix, latency at half of peak, /classify vs apply."""
    import ray
    import requests
    from ray import serve

    from orchestrator.serve.app import build_app

    images, labels = _images(200)
    local = threading.local()  # one keep-alive session per client thread: no thread waits for, or reopens, a
    # connection of a shared pool (requests' default pool holds 10; the open loop has up to 64 threads)

    def session() -> requests.Session:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s
    rows: list[Row] = []
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(s.threads)}})
    try:
        port = 18000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"

        def post_to(op):
            return lambda task, body: session().post(f"{base}/v1/tasks/{task}/{op}", data=body, timeout=120)

        serve.run(build_app(scale.location, replicas=1, max_tasks=n_scale, replica_cpus=1.0), name="smn",
                  route_prefix="/")
        names = [f"task{i:04d}" for i in range(n_scale)]
        mix = list(np.random.default_rng(1).choice(names, size=len(names)))
        embed = post_to("embed")
        n = 100 if s.quick else 400
        _closed_loop(embed, mix, images, 16, len(names))  # warm: every task resident once
        one = _closed_loop(embed, names[:1], images, 16, n)
        mixed = _closed_loop(embed, mix, images, 16, n)
        rows.append(compared(AREA, f"HTTP /embed throughput, uniform mix over {n_scale:,} tasks", mixed, "requests/s",
                             "one task, same replica", one, ideal=0.8, better="higher",
                             notes="1 model replica (1 CPU) + gateway, 16 concurrent clients, one image per request, "
                             f"{n} requests each, every task resident (M = {n_scale})", settings=s))
        load_before = os.getloadavg()[0]
        lat = _open_loop(embed, mix, images, 0.5 * mixed, n)
        load = f"machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (1 min, 2 cores)"
        ok = sorted(v for v in lat if v == v)
        p50, p99 = ok[len(ok) // 2], ok[min(len(ok) - 1, int(0.99 * len(ok)))]
        rows.append(compared(AREA, "HTTP /embed latency p99 at 50 % of the mix's peak", p99, "s", "p50", p50,
                             ideal=3.0, notes=f"open loop at {0.5 * mixed:.1f} requests/s, {len(ok)}/{n} answered; "
                             f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; {load}", settings=s))
        serve.delete("smn")
        serve.run(build_app(real.location, replicas=1, max_tasks=8, replica_cpus=1.0), name="smn", route_prefix="/")
        rows.append(_classify_row(s, real, post_to("classify"), images, labels))
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _classify_row(s: Settings, real, classify, images, labels) -> Row:
    """/classify on 200 real test images against ``smn store apply`` + a plain forward (argmax)."""
    from orchestrator.serve.model import TaskBank

    task = next(i.task for i in real.list() if i.has_head and "c10" in i.task)
    x = TaskBank(real).preprocess(images)
    model = real.apply(task)
    with torch.no_grad():
        want = model(x).argmax(1).tolist()
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda b: classify(task, b).json()["index"], images))
    same = sum(int(a == b) for a, b in zip(got, want))
    acc = float(np.mean(np.array(got) == np.array(labels)))
    return compared(AREA, f"/classify answers equal to `smn store apply` + plain forward ({task})", same, "images",
                    "test images sent", len(images), ideal=1.0, better="higher",
                    notes=f"real CIFAR-10 test images (JPEG); the served head's top-1 on them: {acc:.3f}", settings=s)


def run(s: Settings) -> list[Row]:
    if not CKPT.is_file() or not all(p.is_dir() for p in DATASETS.values()):
        return [note_row(AREA, "serve", "skipped", f"needs {CKPT} and {', '.join(map(str, DATASETS.values()))} "
                         "(the project's ../shared)", s)]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    n_real, n_scale = (10, 100) if s.quick else (50, 1000)

    def log(msg):
        print(f"[serve] {msg}", flush=True)

    real, scale, names, fp32 = build_stores(s, n_real, n_scale, log)
    rows = switch_rows(s, real, scale, names, fp32)
    rows += store_size_rows(s, scale, fp32)
    rows += inprocess_throughput(s, scale["zstd"], n_scale)
    log("in-process figures done; starting Serve")
    rows += http_rows(s, real["zstd"], scale["zstd"], n_scale)
    return rows
