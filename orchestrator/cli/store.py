"""``smn store``: keep one backbone and many task masks, apply a task, measure the codecs (paper App. C).

    smn store init STORE --arch ARCH [--weights pretrained|checkpoint|random] [--checkpoint FILE]
    smn store add STORE TASK (--masks FILE [--state DIR] | --results DIR --experiment NAME --cell ID) [--codec C]
    smn store list STORE [--format markdown|csv]
    smn store show STORE TASK
    smn store apply STORE TASK [--out FILE]
    smn store export STORE TASK OUT [--format masks|weights|mask-file] [--codec C]
    smn store bench-codecs STORE TASK --results DIR [--experiment storage] [--fp32 FILE|DIR] [--repeats 3]

``STORE`` is a folder or a ``pyarrow.fs`` URI (``s3://bucket/prefix``). Exit codes: 0 done, 1 a stored
task file is corrupted, 2 refused (bad input: the message names the bad value and what is allowed; nothing
was written). ``add --masks`` checks the file's recorded arch and backbone hash against the store's.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "handle"]

_EPILOG = """\
examples:
  smn store init stores/c10 --arch cifar_resnet20 --weights checkpoint --checkpoint ../shared/weights/resnet_cifar10/resnet20-12fca82f.th
  smn store add stores/c10 cifar10-smn --results results --experiment demo --cell 3f2a9c0d1e2b4a56
  smn store add stores/c10 my-task --masks my_masks.safetensors
  smn store list stores/c10
  smn store apply stores/c10 cifar10-smn --out c10_model.safetensors
  smn store bench-codecs stores/c10 cifar10-smn --results results && smn table results --layout table6
"""


def add_parser(subparsers) -> None:
    """Register ``smn store`` and its subcommands on the ``smn`` parser's subparsers."""
    from smn_core.mask_codecs import DEFAULT_CODEC, available_codecs

    st = subparsers.add_parser(
        "store", help="keep one backbone and many task masks; apply, export, measure codecs",
        description="A mask store holds one frozen backbone and one compressed mask file per task. A task "
        "costs about 1 bit per masked weight before compression (32x less than an fp32 copy).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = st.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    codecs = available_codecs()

    p = sub.add_parser("init", help="create a store holding one backbone")
    p.add_argument("store", help="store folder or URI (must not hold a store yet)")
    p.add_argument("--arch", required=True, help="backbone arch, e.g. cifar_resnet20 (see smn_core.backbones)")
    p.add_argument("--weights", default="pretrained", choices=("pretrained", "checkpoint", "random"),
                   help="the backbone's weights")
    p.add_argument("--checkpoint", default=None, help="local weight file for --weights checkpoint")
    p.set_defaults(handler=handle)

    p = sub.add_parser("add", help="add a task's masks (a finished cell, or a masks .safetensors)")
    p.add_argument("store")
    p.add_argument("task", help="task name: letters, digits, '.', '_', '-'")
    p.add_argument("--masks", default=None, help="masks .safetensors ({name: bool tensor}); bound to the store's backbone")
    p.add_argument("--state", default=None, help="with --masks: the run's final state folder (head, BN statistics)")
    p.add_argument("--results", default=None, help="results folder of `smn run` (with --experiment and --cell)")
    p.add_argument("--experiment", default=None, help="experiment of the cell (with --results and --cell)")
    p.add_argument("--cell", default=None, help="cell id (see `smn table` / the ledger)")
    p.add_argument("--codec", default=DEFAULT_CODEC, choices=codecs, help="mask codec")
    p.set_defaults(handler=handle)

    p = sub.add_parser("list", help="list the tasks (name, codec, bytes, bits/weight, density)")
    p.add_argument("store")
    p.add_argument("--format", default="markdown", choices=("markdown", "csv"), help="output format")
    p.set_defaults(handler=handle)

    p = sub.add_parser("show", help="show one task (codec, sizes, per-tensor density, spec) as JSON")
    p.add_argument("store")
    p.add_argument("task")
    p.set_defaults(handler=handle)

    p = sub.add_parser("apply", help="build the ready model of a task (hash-checked); optionally save its weights")
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("--out", default=None, help="write the ready model's weights (safetensors, masks baked in)")
    p.set_defaults(handler=handle)

    p = sub.add_parser("export", help="write a task out: plain masks, baked weights, or the mask file")
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("out", help="output file (must not exist)")
    p.add_argument("--format", default="masks", choices=("masks", "weights", "mask-file"),
                   help="masks: {name: bool tensor}; weights: masks baked in; mask-file: the smn-mask/1 file")
    p.add_argument("--codec", default=None, choices=codecs, help="for --format mask-file: re-encode with this codec")
    p.set_defaults(handler=handle)

    p = sub.add_parser("bench-codecs", help="measure every codec on a task (App. C) and write the ledger cells",
                       description="Measure size, reduction and encode/decode speed of every codec on the task's "
                       "masks and on fp32 weights of the same tensors; write one ledger cell per (payload, codec) "
                       "with method codec:<name>; print tables 6 and 7.")
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("--results", required=True, help="results folder or URI of the ledger")
    p.add_argument("--experiment", default="storage", help="experiment of the codec cells in the ledger")
    p.add_argument("--fp32", default=None, help="fine-tuned fp32 weights: a safetensors state_dict or a cell's "
                   "final state folder (default: the store's pretrained backbone weights, as a stand-in)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs (>= 1)")
    p.set_defaults(handler=handle)


def _fail(msg: str) -> int:
    print(f"smn store: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _fp32_tensors(path: str):
    from safetensors.torch import load as st_load

    from orchestrator.results import ledger

    fs, p = ledger.resolve(path)
    info = fs.get_file_info(p)
    import pyarrow.fs as pafs

    if info.type == pafs.FileType.Directory:
        p = f"{p.rstrip('/')}/tensors.safetensors"
    elif info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--fp32 {path!r} does not exist")
    with fs.open_input_stream(p) as f:
        state = st_load(f.read())
    out = {}
    for k, v in state.items():
        for prefix in ("param.backbone.", ""):
            if k.startswith(prefix) and v.is_floating_point():
                out.setdefault(k[len(prefix):], v)
    return out


def handle(args) -> int:  # noqa: C901 - one dispatch over the subcommands
    """Run one ``smn store`` subcommand; returns the exit code."""
    from smn_core.mask_file import BackboneMismatchError, MaskFileError

    from orchestrator.reports.registry import render_frame
    from orchestrator.store.mask_store import (MaskStore, StoreError, task_from_cell, task_from_masks_file, validate_task_name)

    cmd = args.store_command
    try:
        if cmd == "init":
            from smn_core.backbones import build_backbone

            if args.weights == "checkpoint" and not args.checkpoint:
                return _fail("--weights checkpoint needs --checkpoint FILE")
            bb = build_backbone(args.arch, args.weights, checkpoint=args.checkpoint)
            store = MaskStore.create(args.store, bb.model, args.arch, weights_source=bb.weights_source)
            print(f"created store {args.store}: {args.arch}, backbone {store.backbone_hash}")
            return 0
        store = MaskStore(args.store)
        if cmd == "add":
            validate_task_name(args.task)
            from_cell = any(x is not None for x in (args.results, args.experiment, args.cell))
            if bool(args.masks) == from_cell:
                return _fail("give either --masks FILE or all of --results DIR --experiment NAME --cell ID")
            if from_cell and not all((args.results, args.experiment, args.cell)):
                return _fail("--results, --experiment and --cell go together")
            if store.has(args.task):
                return _fail(f"task {args.task!r} already exists in {args.store!r}; nothing was changed")
            if from_cell:
                mask = task_from_cell(args.results, args.experiment, args.cell, store)
            else:
                mask = task_from_masks_file(args.masks, store.switcher().reset().backbone, arch=store.arch,
                                            state_dir=args.state, spec={"source": args.masks})
            info = store.add(args.task, mask, codec=args.codec)
            print(f"added {info.task}: {info.num_weights:,} masked weights, density {info.density:.4f}, "
                  f"{info.file_bytes:,} bytes ({info.bits_per_weight:.4f} bits/weight, codec {info.codec})")
            return 0
        if cmd == "list":
            import pandas as pd

            infos = store.list()
            frame = pd.DataFrame([{"task": i.task, "codec": i.codec, "bytes": f"{i.file_bytes:,}",
                                   "bits/weight": f"{i.bits_per_weight:.4f}", "density": f"{i.density:.4f}",
                                   "head": "yes" if i.has_head else "no", "BN stats": i.num_buffers}
                                  for i in infos])
            print(render_frame(frame, args.format, title=f"{args.store}: {store.arch}, {len(infos)} tasks"))
            return 0
        if cmd == "show":
            print(json.dumps(store.show(args.task), indent=1, default=str))
            return 0
        if cmd == "apply":
            model = store.apply(args.task)
            n = sum(p.numel() for p in model.parameters())
            print(f"ready: task {args.task} on {store.arch} ({n:,} parameters, backbone {store.backbone_hash[:19]}..., "
                  f"head {'yes' if model.head is not None else 'no'})")
            if args.out:
                path = store.export(args.task, args.out, fmt="weights")
                print(f"wrote {path}")
            return 0
        if cmd == "export":
            path = store.export(args.task, args.out, fmt=args.format, codec=args.codec)
            print(f"wrote {path}")
            return 0
        if cmd == "bench-codecs":
            from orchestrator.results import ledger
            from orchestrator.reports.codec_costs import codec_table, measure_task_codecs
            from orchestrator.store.codec_cells import record_codec_measurements

            if args.repeats < 1:
                return _fail(f"--repeats must be >= 1, got {args.repeats}")
            mask = store.load(args.task)
            fp32 = _fp32_tensors(args.fp32) if args.fp32 else None
            rows = measure_task_codecs(mask, store.backbone_weights(), fp32=fp32, repeats=args.repeats)
            written = record_codec_measurements(args.results, args.task, mask, rows, experiment=args.experiment,
                                                fp32_source=args.fp32 or "pretrained backbone")
            print(f"{len(written)} codec cells written to {args.results}/{args.experiment} "
                  f"({len(rows) - len(written)} already there)")
            df = ledger.read_ledger(args.results, args.experiment)
            print(render_frame(codec_table(df, "mask"), title="masks per codec (table6)"))
            print()
            print(render_frame(codec_table(df, "fp32"), title="fp32 weights per codec (table7)"))
            return 0
    except MaskFileError as exc:
        if cmd == "add":
            return _fail(str(exc))
        print(f"smn store: {' '.join(str(exc).split())} (a stored task file is corrupted; remove it with its "
              "task, or restore it)", file=sys.stderr)
        return 1
    except (StoreError, BackboneMismatchError, ValueError, FileNotFoundError, ImportError) as exc:
        return _fail(str(exc))
    return _fail(f"unknown store command {cmd!r}")
