"""``smn store ...``: what each subcommand of the mask store does (paper App. C); the parser is
:mod:`orchestrator.cli.store`. Exit codes: 0 done, 1 a stored task file is corrupted, 2 refused (bad input:
the message names the bad value and what is allowed; nothing was written)."""

from __future__ import annotations

import json
import sys

import pandas as pd

from smn_core.backbones import build_backbone
from smn_core.checkpoint import location_join
from smn_core.mask_file import BackboneMismatchError, MaskFileError

from orchestrator.cli.common import check_output_path
from orchestrator.reports.codec_costs import codec_table, measure_task_codecs
from orchestrator.reports.registry import render_frame
from orchestrator.results import ledger
from orchestrator.store.codec_cells import record_codec_measurements
from orchestrator.store.mask_store import (MaskStore, StoreError, load_fp32_weights, read_probe_head, task_from_cell,
                                           task_from_masks_file, validate_task_name, with_probe_head)

__all__ = ["handle"]


def _fail(msg: str) -> int:
    print(f"smn store: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _with_head(mask, args, from_cell: bool):
    """``add --head FILE``: the task gets that probe head (:func:`with_probe_head`); from a cell the head comes
    with the cell (``probes/<cell>``), so ``--head`` there is refused."""
    head = getattr(args, "head", None)
    if head is None:
        return mask
    if from_cell:
        raise ValueError("--head goes with --masks; a cell's probe head is added from the cell itself")
    return with_probe_head(mask, read_probe_head(head))


def _check_outputs(args, cmd: str) -> None:
    """Every location the subcommand writes, checked before any work
    (:func:`orchestrator.cli.common.check_output_path`): the store of ``init`` / ``add``, the ``--out`` of
    ``apply``, the ``OUT`` of ``export``, the ``--results`` of ``bench-codecs``.

    Raises:
        orchestrator.cli.common.ResultsError: naming the location and what is allowed.
    """
    if cmd in ("init", "add"):
        check_output_path(args.store, option="store", folder=True)
    if cmd == "apply" and args.out:
        check_output_path(args.out)
    if cmd == "export":
        check_output_path(args.out, option="OUT")
    if cmd == "bench-codecs":
        check_output_path(args.results, option="--results", folder=True)


def handle(args) -> int:  # noqa: C901 - one dispatch over the subcommands
    """Run one ``smn store`` subcommand; returns the exit code."""
    cmd = args.store_command
    try:
        _check_outputs(args, cmd)
        if cmd == "init":
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
            mask = _with_head(mask, args, from_cell)
            info = store.add(args.task, mask, codec=args.codec)
            print(f"added {info.task}: {info.num_weights:,} masked weights, density {info.density:.4f}, "
                  f"{info.file_bytes:,} bytes ({info.bits_per_weight:.4f} bits/weight, codec {info.codec})")
            return 0
        if cmd == "list":
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
            if args.repeats < 1:
                return _fail(f"--repeats must be >= 1, got {args.repeats}")
            mask = store.load(args.task)
            fp32 = load_fp32_weights(args.fp32) if args.fp32 else None
            rows = measure_task_codecs(mask, store.backbone_weights(), fp32=fp32, repeats=args.repeats)
            written = record_codec_measurements(args.results, args.task, mask, rows, experiment=args.experiment,
                                                fp32_source=args.fp32 or "pretrained backbone")
            print(f"{len(written)} codec cells written to {location_join(args.results, args.experiment)} "
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
    except OSError as exc:  # the disk, after the checks: name the file and the cause, never "None"
        where = exc.filename or getattr(args, "out", None) or args.store
        print(f"smn store: cannot access {str(where)!r}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 1
    return _fail(f"unknown store command {cmd!r}")
