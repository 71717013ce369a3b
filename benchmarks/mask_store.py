"""Mask storage benchmarks (paper App. C; issue "mask store").

Two measurements, printed as Markdown (and written as Parquet with ``--out``):

``codecs``: every codec of ``smn_core.mask_codecs`` on real learned masks: bits per weight, reduction
  against bit-packed masks, ratio against fp32 weights of the same tensors, encode/decode speed
  (MB of uncompressed payload per second, best of ``--repeats``), next to the order-0 entropy bound
  ``H(density)`` (global and per tensor); and the byte codecs on the fp32 weights. ``--train`` first
  learns the masks with short real runs of the pipeline on real CIFAR-10 (ResNet-20 checkpoint of
  ``../shared/weights``), else pass ``--masks FILE...`` (``{name: bool}`` safetensors).

``store``: a store with ``--tasks`` (default 1,000) small task masks on one backbone: time to add
  them, to list them, and to apply every one in turn on the one loaded backbone (task switching).
  The masks are Bernoulli draws at per-task densities in [0.85, 0.99] (synthetic: this measures the
  store, not the masks), on the real CIFAR ResNet-20 when ``../shared`` is there, else a random
  CIFAR ResNet-8.

    .venv/bin/python benchmarks/mask_store.py codecs --train [--work DIR]
    .venv/bin/python benchmarks/mask_store.py codecs --masks a.safetensors b.safetensors
    .venv/bin/python benchmarks/mask_store.py store --tasks 1000 [--arch cifar_resnet8]

Timings depend on the machine and its load: report them with the machine and say so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.reports.registry import render_frame  # noqa: E402
from smn_core.backbones import build_backbone  # noqa: E402
from smn_core.mask_codecs import (  # noqa: E402
    LIBRARY_CODECS,
    available_codecs,
    measure_byte_codec,
    measure_mask_codec,
    order0_entropy_bits,
)

SHARED = REPO.parent / "shared"
CKPT = SHARED / "weights" / "resnet_cifar10" / "resnet20-12fca82f.th"
CIFAR = SHARED / "data" / "cifar10"

# short real runs whose masks the codecs are measured on (method, score lr, epochs, train images, BN mode)
RUNS = {
    "smn_lr200": ("smn", 200.0, 3, 1024, "adapt"),
    "smn_lr2000": ("smn", 2000.0, 4, 1024, "adapt"),
    "supmask_lr50": ("supervised_mask", 50.0, 3, 1024, "adapt"),
    "supmask_lr200": ("supervised_mask", 200.0, 3, 1024, "frozen"),
}


def train_masks(work: Path) -> list[Path]:
    """Learn masks with the pipeline on real CIFAR-10 (a few CPU minutes each); returns the masks files."""
    from safetensors.torch import save_file

    from smn_core.augment import MultiCropConfig
    from smn_core.pipeline import run_cell
    from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
    from smn_core.swav import SwAVConfig
    from smn_core.training import TrainConfig

    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (method, lr, epochs, n, bn) in RUNS.items():
        path = work / f"{name}.safetensors"
        if not path.exists():
            tc = TrainConfig(epochs=epochs, batch_size=64, score_lr=lr, head_lr=0.6, bn_mode=bn,
                             swav=SwAVConfig(num_prototypes=100, queue_length=0, freeze_prototypes_steps=0),
                             multicrop=MultiCropConfig(n_global=2, n_local=2, global_scale=(0.5, 1.0),
                                                       local_scale=(0.2, 0.5)))
            cfg = CellConfig(method=method, backbone=BackboneSpec("cifar_resnet20", "checkpoint", str(CKPT)),
                             dataset=DataSpec(source="parquet", root=str(CIFAR), max_train_samples=n, max_test_samples=100),
                             train=tc, eval=EvalSpec(knn_k=20))
            t0 = time.perf_counter()
            res = run_cell(cfg, evaluate=False, progress=lambda s, name=name: print(f"[{name}] {s}", flush=True))
            print(f"[{name}] density {res.metrics['density']:.4f} in {time.perf_counter() - t0:.0f} s", flush=True)
            save_file(res.masks, str(path), metadata={"arch": "cifar_resnet20", "run": name})
        out.append(path)
    return out


def bench_codecs(mask_files: list[Path], repeats: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per mask file and codec: size, ratios, speeds; plus fp32 rows. Returns (masks frame, fp32 frame)."""
    from safetensors.torch import load_file

    from smn_core.backbones import load_checkpoint_state_dict

    weights = load_checkpoint_state_dict(CKPT)
    rows, fp_rows = [], []
    for f in mask_files:
        masks = load_file(str(f))
        names = list(masks)
        m = [masks[k].numpy() for k in names]
        w = [weights[k].numpy() for k in names]
        n = sum(x.size for x in m)
        density = sum(int(x.sum()) for x in m) / n
        h0, h0t = order0_entropy_bits(m) / n, order0_entropy_bits(m, per_tensor=True) / n
        label = f.stem
        rows.append({"masks": label, "density": density, "codec": "H(density) bound", "bits/weight": h0,
                     "x vs fp32": 32 / h0, "reduction %": 100 * (1 - h0)})
        rows.append({"masks": label, "density": density, "codec": "per-tensor H bound", "bits/weight": h0t,
                     "x vs fp32": 32 / h0t, "reduction %": 100 * (1 - h0t)})
        for c in available_codecs():
            r = measure_mask_codec(c, m, w if c == "smn-ctx" else None, repeats=repeats)
            rows.append({"masks": label, "density": density, "codec": c, "bytes": r.compressed_bytes,
                         "bits/weight": r.bits_per_weight, "x vs fp32": r.ratio_vs_fp32,
                         "reduction %": r.reduction_pct, "encode MB/s": r.encode_mb_s, "decode MB/s": r.decode_mb_s,
                         "encode Mweights/s": n / 1e6 / r.encode_s, "decode Mweights/s": n / 1e6 / r.decode_s})
        r = measure_mask_codec("smn-ctx", m, None, repeats=repeats)
        rows.append({"masks": label, "density": density, "codec": "smn-ctx (no weights)", "bytes": r.compressed_bytes,
                     "bits/weight": r.bits_per_weight, "x vs fp32": r.ratio_vs_fp32, "reduction %": r.reduction_pct,
                     "encode MB/s": r.encode_mb_s, "decode MB/s": r.decode_mb_s,
                     "encode Mweights/s": n / 1e6 / r.encode_s, "decode Mweights/s": n / 1e6 / r.decode_s})
    names = [k for k, v in weights.items() if v.ndim == 4]
    fp = [weights[k].numpy() for k in names]
    for c in ("none", *LIBRARY_CODECS):
        r = measure_byte_codec(c, fp, repeats=repeats)
        fp_rows.append({"payload": "fp32 conv weights (pretrained ResNet-20)", "codec": c, "bytes": r.compressed_bytes,
                        "reduction %": r.reduction_pct, "bits/weight": r.bits_per_weight,
                        "encode MB/s": r.encode_mb_s, "decode MB/s": r.decode_mb_s})
    return pd.DataFrame(rows), pd.DataFrame(fp_rows)


def bench_store(tasks: int, arch: str, codec: str) -> pd.DataFrame:
    """Add ``tasks`` synthetic masks to a fresh store, list them, apply each in turn; returns timings."""
    from orchestrator.store.mask_store import MaskStore
    from smn_core.mask_file import TaskMask, backbone_hash
    from smn_core.masking import MaskConfig, select_parameters

    if arch == "cifar_resnet20" and CKPT.exists():
        model = build_backbone(arch, "checkpoint", checkpoint=str(CKPT)).model
    else:
        torch.manual_seed(0)
        model = build_backbone(arch, "random").model
    names = select_parameters(model, MaskConfig())
    params = dict(model.named_parameters())
    h = backbone_hash(model)
    rng = np.random.default_rng(0)
    n_weights = sum(params[k].numel() for k in names)
    with tempfile.TemporaryDirectory() as tmp:
        store = MaskStore.create(f"{tmp}/store", model, arch)
        t0 = time.perf_counter()
        for i in range(tasks):
            d = rng.uniform(0.85, 0.99)
            masks = {k: torch.from_numpy(rng.random(tuple(params[k].shape)) < d) for k in names}
            store.add(f"task{i:05d}", TaskMask(masks=masks, backbone_hash=h, arch=arch), codec=codec)
        add_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(f"{tmp}/store/tasks").iterdir())
        fresh = MaskStore(f"{tmp}/store")
        t0 = time.perf_counter()
        listed = fresh.list()
        list_s = time.perf_counter() - t0
        assert len(listed) == tasks
        x = torch.randn(4, 3, 32, 32)
        t0 = time.perf_counter()
        fresh.switcher()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            for info in listed:
                fresh.apply(info.task)(x)
        apply_s = time.perf_counter() - t0
    return pd.DataFrame([{
        "arch": arch, "codec": codec, "tasks": tasks, "masked weights/task": n_weights,
        "store bytes (tasks)": size, "bytes/task": size / tasks, "add s (total)": add_s,
        "list s": list_s, "load backbone s (once)": load_s, "apply+forward s (total)": apply_s,
        "apply+forward ms/task": 1e3 * apply_s / tasks}])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("codecs")
    c.add_argument("--masks", nargs="*", default=[])
    c.add_argument("--train", action="store_true", help="learn the masks first (real CIFAR-10, a few CPU minutes)")
    c.add_argument("--work", default=str(REPO / "results" / "bench_masks"))
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--out", default=None, help="write the frames as Parquet with this prefix")
    s = sub.add_parser("store")
    s.add_argument("--tasks", type=int, default=1000)
    s.add_argument("--arch", default="cifar_resnet8")
    s.add_argument("--codec", default="smn-ctx", choices=available_codecs())
    s.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "codecs":
        files = [Path(m) for m in args.masks]
        if args.train:
            files += train_masks(Path(args.work))
        if not files:
            p.error("give --masks FILE... or --train")
        masks, fp = bench_codecs(files, args.repeats)
        fmt = lambda df: df.map(lambda v: f"{v:,.4f}" if isinstance(v, float) else v)  # noqa: E731
        print(render_frame(fmt(masks), title="learned masks per codec"))
        print()
        print(render_frame(fmt(fp), title="fp32 weights per codec"))
        if args.out:
            masks.to_parquet(f"{args.out}_masks.parquet")
            fp.to_parquet(f"{args.out}_fp32.parquet")
    else:
        df = bench_store(args.tasks, args.arch, args.codec)
        print(render_frame(df.map(lambda v: f"{v:,.3f}" if isinstance(v, float) else v),
                           title="mask store: add, list, apply"))
        if args.out:
            df.to_parquet(f"{args.out}_store.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
