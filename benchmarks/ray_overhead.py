"""Ray's fixed cost for one cell: in-process vs a Ray task vs a 1-worker Ray Train TorchTrainer.

Runs the same tiny real cell (ResNet-8, digits 5-9 at 16 px, 1 epoch) three ways, side by side in one
process, and prints the wall times and their ratios to the in-process time.

    .venv/bin/python benchmarks/ray_overhead.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from orchestrator.runner import _cell_task, ensure_ray  # noqa: E402
from orchestrator.spec import expand_cells, load_spec  # noqa: E402
from smn_core.pipeline import run_cell  # noqa: E402

SPEC = """\
name: overhead
methods: [smn]
backbone: {arch: cifar_resnet8, weights: random}
dataset: {source: digits, classes: [5, 6, 7, 8, 9], image_size: 16, max_train_samples: 128, max_test_samples: 64}
train: {epochs: 1, batch_size: 32, swav: {num_prototypes: 20, queue_length: 0}, multicrop: {n_global: 2, n_local: 2, local_size: 8}}
eval: {knn_k: 20}
"""


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "s.yaml").write_text(SPEC)
    spec = load_spec(tmp / "s.yaml")
    (cell,) = expand_cells(spec)
    t = time.perf_counter()
    run_cell(cell.config)
    in_process = time.perf_counter() - t

    t = time.perf_counter()
    ensure_ray()
    init = time.perf_counter() - t
    from orchestrator.runner import _dump

    t = time.perf_counter()
    ray.get(_cell_task.remote(_dump(cell), cell.cell_id, "bench", {}, "overhead", str(tmp / "r1"), None))
    as_task = time.perf_counter() - t
    t = time.perf_counter()
    ray.get(_cell_task.remote(_dump(cell), cell.cell_id + "x", "bench", {}, "overhead", str(tmp / "r2"), None))
    as_task_warm = time.perf_counter() - t

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        run_cell(cell.config)

    t = time.perf_counter()
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="bench", storage_path=str(tmp / "train"))).fit()
    trainer = time.perf_counter() - t
    print(f"ray.init (local, 127.0.0.1):            {init:6.1f} s")
    print(f"cell in-process:                         {in_process:6.1f} s  (1.00x)")
    print(f"cell as a Ray task (first, cold worker): {as_task:6.1f} s  ({as_task / in_process:.2f}x)")
    print(f"cell as a Ray task (warm worker):        {as_task_warm:6.1f} s  ({as_task_warm / in_process:.2f}x)")
    print(f"cell in a 1-worker TorchTrainer:         {trainer:6.1f} s  ({trainer / in_process:.2f}x)")


if __name__ == "__main__":
    main()
