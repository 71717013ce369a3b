"""``smn store``: keep one backbone and many task masks, apply a task, measure the codecs (paper App. C).

    smn store init STORE --arch ARCH [--weights pretrained|checkpoint|random] [--checkpoint FILE]
    smn store add STORE TASK (--masks FILE [--state DIR] [--head FILE] | --results DIR --experiment NAME --cell ID) [--codec C]
    smn store list STORE [--format markdown|csv]
    smn store show STORE TASK
    smn store apply STORE TASK [--out FILE]
    smn store export STORE TASK OUT [--format masks|weights|mask-file] [--codec C]
    smn store bench-codecs STORE TASK --results DIR [--experiment storage] [--fp32 FILE|DIR] [--repeats 3]

``STORE`` is a folder or a ``pyarrow.fs`` URI (``s3://bucket/prefix``). ``add --masks`` checks the file's
recorded arch and backbone hash against the store's. This module is the parser only;
:mod:`orchestrator.cli.commands.store` does the work (exit codes there).
"""

from __future__ import annotations

import argparse

from smn_core.mask_codecs import DEFAULT_CODEC, available_codecs

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  smn store init stores/c10 --arch cifar_resnet20 --weights checkpoint --checkpoint ../shared/weights/resnet_cifar10/resnet20-12fca82f.th
  smn store add stores/c10 cifar10-smn --results results --experiment demo --cell 3f2a9c0d1e2b4a56
  smn store add stores/c10 my-task --masks my_masks.safetensors
  smn store list stores/c10
  smn store apply stores/c10 cifar10-smn --out c10_model.safetensors
  smn store bench-codecs stores/c10 cifar10-smn --results results && smn table results --layout table6
"""


def _add_head_option(p) -> None:
    """``smn store add --head FILE``: the classification head ``/classify`` (``smn serve``) answers with."""
    p.add_argument("--head", default=None,
                   help="with --masks: a cell's linear-probe head file (<results>/<experiment>/probes/<cell>.safetensors); "
                   "from a cell (--results ...) its probe head is added by itself")


def add_parser(subparsers) -> None:
    """Register ``smn store`` and its subcommands on the ``smn`` parser's subparsers."""
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

    p = sub.add_parser("add", help="add a task's masks (a finished cell, or a masks .safetensors)")
    p.add_argument("store")
    p.add_argument("task", help="task name: letters, digits, '.', '_', '-'")
    p.add_argument("--masks", default=None, help="masks .safetensors ({name: bool tensor}); bound to the store's backbone")
    p.add_argument("--state", default=None, help="with --masks: the run's final state folder (head, BN statistics)")
    p.add_argument("--results", default=None, help="results folder of `smn run` (with --experiment and --cell)")
    p.add_argument("--experiment", default=None, help="experiment of the cell (with --results and --cell)")
    p.add_argument("--cell", default=None, help="cell id (see `smn table` / the ledger)")
    p.add_argument("--codec", default=DEFAULT_CODEC, choices=codecs,
                   help="mask codec (zstd decodes in well under a millisecond on a serving replica's cold task switch; "
                   "smn-ctx makes files about 6%% smaller and decodes 10-20x slower: for archives; docs/serve.md)")
    _add_head_option(p)

    p = sub.add_parser("list", help="list the tasks (name, codec, bytes, bits/weight, density)")
    p.add_argument("store")
    p.add_argument("--format", default="markdown", choices=("markdown", "csv"), help="output format")

    p = sub.add_parser("show", help="show one task (codec, sizes, per-tensor density, spec) as JSON")
    p.add_argument("store")
    p.add_argument("task")

    p = sub.add_parser("apply", help="build the ready model of a task (hash-checked); optionally save its weights")
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("--out", default=None, help="write the ready model's weights (safetensors, masks baked in)")

    p = sub.add_parser("export", help="write a task out: plain masks, baked weights, or the mask file")
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("out", help="output file (must not exist)")
    p.add_argument("--format", default="masks", choices=("masks", "weights", "mask-file"),
                   help="masks: {name: bool tensor}; weights: masks baked in; mask-file: the smn-mask/1 file")
    p.add_argument("--codec", default=None, choices=codecs, help="for --format mask-file: re-encode with this codec")

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
