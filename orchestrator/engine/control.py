"""The random-mask control cells (issue 25): a :class:`orchestrator.engine.cell.Stage` that evaluates a random
mask of its SMN cell's size in place of training.

A ``random_mask`` / ``random_mask_magnitude`` cell is a *dependent* cell, like a top-k cell at the density SMN
found: its reference is the SMN cell of the same config (:func:`orchestrator.spec.experiment.control_reference`),
which the spec's expansion adds when the spec does not run it, and the control is ready once that cell has
landed (the driver's rounds: :func:`orchestrator.engine.plain.run_experiment`,
:func:`orchestrator.engine.sweep.run_sweep`). :class:`RandomMaskStage` reads the reference's masks
(``masks/<smn cell_id>``), draws the random mask and evaluates it
(:func:`smn_core.random_mask.evaluate_random_mask`); :func:`orchestrator.engine.cell.land` lands it like a trained
cell (masks, probe head, per-image correctness, ledger file), so it resumes as any cell does: a rerun skips it
when its ledger file is there.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.engine.cell import CellJob, Stage, log

__all__ = ["RandomMaskStage"]


@dataclass(frozen=True)
class RandomMaskStage(Stage):
    """Evaluate a random mask drawn from the trained mask of SMN cell ``reference`` (``match``: ``count`` or
    ``magnitude``, :data:`smn_core.random_mask.MATCHES`)."""

    reference: str
    match: str

    def run(self, job: CellJob, device: str):
        """Draw and evaluate the control; returns a :class:`smn_core.pipeline.CellOutcome` (landed like a trained
        cell's).

        Raises:
            FileNotFoundError: the SMN cell's masks are not in the results (it failed or was removed): one line
                naming the cell and the file; the control's failure record says it.
        """
        from smn_core.checkpoint import load_tensors, location_exists
        from smn_core.random_mask import evaluate_random_mask  # torch loads in the worker, not the driver

        where = job.layout.mask(self.reference)
        if not location_exists(where):
            raise FileNotFoundError(f"{job.config.method} cell {job.cell_id} needs the masks of its SMN cell "
                                    f"{self.reference}, which are not at {where} (the SMN cell has not landed); "
                                    "run the spec again to compute it")
        return evaluate_random_mask(job.config, load_tensors(where), self.match, pipeline_weights=job.pipeline_weights,
                                    device=device, progress=log(job.prefix))
