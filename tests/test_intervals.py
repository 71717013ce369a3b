"""Intervals and paired differences (issue 25): the interval code against a direct computation, the per-image
correctness a cell stores, and ``vs_frozen`` pairing over images when it is there, over seeds when not."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from orchestrator.reports import intervals, registry
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.results.per_image import load_correctness, write_correctness

from .conftest import REPO

DEMO = REPO / "docs" / "results" / "demo" / "ledger"
T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}  # Student-t 0.975 quantiles (printed tables)


@pytest.mark.unit
def test_t_interval_is_the_textbook_formula():
    values = [0.662, 0.647, 0.677]
    got = intervals.t_interval(values)
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T_975[2] * s / math.sqrt(3)
    assert (got.mean, got.lo, got.hi, got.n) == pytest.approx((mean, mean - half, mean + half, 3), abs=1e-9)
    assert intervals.t_quantile(1) == pytest.approx(T_975[1]) and intervals.t_quantile(4) == pytest.approx(T_975[4])
    one = intervals.t_interval([0.5])
    assert one.mean == 0.5 and not one.known and intervals.verdict(one) == intervals.UNCLEAR
    assert intervals.t_interval([float("nan"), 0.4, 0.6]).n == 2
    with pytest.raises(ValueError, match="degrees of freedom 0"):
        intervals.t_quantile(0)


@pytest.mark.unit
def test_paired_seed_interval_pairs_by_seed_and_leaves_unmatched_seeds_out():
    a = {0: 0.70, 1: 0.72, 2: 0.71, 5: 0.99}
    b = {0: 0.65, 1: 0.69, 2: 0.66, 7: 0.10}
    got = intervals.paired_seed_interval(a, b)
    direct = intervals.t_interval([0.05, 0.03, 0.05])
    assert (got.mean, got.lo, got.hi, got.n) == pytest.approx((direct.mean, direct.lo, direct.hi, 3))
    assert got.lo > 0 and intervals.verdict(got) == intervals.GAIN
    assert intervals.verdict(intervals.paired_seed_interval(b, a)) == intervals.LOSS


@pytest.mark.unit
def test_paired_bootstrap_matches_the_normal_approximation_and_is_paired():
    rng = np.random.default_rng(1)
    base = rng.random((3, 4000)) < 0.7
    flips = rng.random((3, 4000)) < 0.05
    better = base | flips  # a adds ~1.5 points on the same images
    got = intervals.paired_bootstrap(better, base, resamples=4000, seed=0)
    d = (better.astype(float) - base.astype(float)).mean(axis=0)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert got.mean == pytest.approx(d.mean(), abs=1e-12)
    assert got.lo == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * 1.96 * se)
    assert got.hi == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * 1.96 * se)
    assert intervals.verdict(got) == intervals.GAIN
    same = intervals.paired_bootstrap(base, base)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same"):
        intervals.paired_bootstrap(base, base[:, :10])


@pytest.mark.unit
def test_interval_text_marks_and_signs():
    d = intervals.Interval(0.012, -0.003, 0.027, 3, "paired t over seeds")
    assert d.text(scale=100, digits=1, signed=True) == "+1.2 [-0.3, +2.7]"
    assert intervals.verdict(d) == intervals.UNCLEAR


def _demo_copy(root, controls: bool = False):
    """The committed demo ledger under ``root``; without its random-mask cells unless ``controls``."""
    import pyarrow.parquet as pq

    dst = root / "demo" / "ledger"
    dst.mkdir(parents=True)
    for f in DEMO.glob("*.parquet"):
        if controls or not pq.read_table(f, columns=["method"])["method"][0].as_py().startswith("random_mask"):
            shutil.copyfile(f, dst / f.name)
    return root


@pytest.mark.unit
def test_vs_frozen_pairs_over_images_when_every_cell_stored_them(tmp_path):
    """Per-image files written beside the committed demo ledger: vs_frozen's difference is then the paired
    bootstrap over those images and seeds, the same numbers as a direct call; without them, over seeds."""
    results = _demo_copy(tmp_path)
    rows = ledger.read_ledger(str(results), "demo")
    vs_seed = registry.tables()["vs_frozen"].build(rows).reset_index()
    assert set(vs_seed["paired over"]) == {"", "seeds"}
    cells = rows.drop_duplicates("cell_id")
    lay = ExperimentLayout.of(str(results), "demo")
    rng = np.random.default_rng(0)
    arrays = {}
    for cid, method, seed in zip(cells["cell_id"], cells["method"], cells["seed"]):
        p = 0.9 if method == "smn" else 0.8
        arrays[(method, int(seed))] = rng.random(269) < p
        write_correctness(lay, cid, {m: arrays[(method, int(seed))]
                                     for m in ("knn_top1", "knn_dino_top1", "linear_probe_top1")})
    assert load_correctness(str(results), "demo", cells["cell_id"].iloc[0], "knn_top1").shape == (269,)
    assert load_correctness(str(results), "demo", "nocell", "knn_top1") is None
    by_image = registry.tables()["vs_frozen"].build(ledger.read_ledger(str(results), "demo")).reset_index()
    smn = by_image[by_image["Method"] == "smn"].iloc[0]
    assert smn["paired over"] == "images x seeds"
    direct = intervals.paired_bootstrap(np.stack([arrays[("smn", s)] for s in (0, 1, 2)]),
                                        np.stack([arrays[("pretrained", s)] for s in (0, 1, 2)]))
    assert smn["k-NN (k=20) vs frozen"] == (f"{100 * direct.mean:+.1f} [{100 * direct.lo:+.1f}, "
                                            f"{100 * direct.hi:+.1f}] gain")
    # over seeds: the t-interval of the per-seed differences, computed here from the ledger rows
    k200 = rows[rows["metric"] == "knn_top1"].set_index(["method", "seed"])["value"]
    by_seed = intervals.t_interval([k200[("smn", s)] - k200[("pretrained", s)] for s in (0, 1, 2)])
    assert vs_seed[vs_seed["Method"] == "smn"].iloc[0]["k-NN (k=200) vs frozen"] == (
        f"{100 * by_seed.mean:+.1f} [{100 * by_seed.lo:+.1f}, {100 * by_seed.hi:+.1f}]")


@pytest.mark.unit
def test_layout_header_says_when_a_difference_is_a_gain():
    desc = registry.tables()["vs_frozen"].description
    assert "gain" in desc and "excludes 0" in desc


@pytest.mark.ray
def test_a_landed_cell_stores_its_per_image_correctness(landed):
    """The tiny plain run (frozen + SMN, seed 0): each cell's per-image file holds as many images as the
    test split, and its mean is the ledger's accuracy."""
    results = landed["plain"]["results"]
    rows = ledger.read_ledger(results, "tiny")
    cells = ledger.wide(rows)
    for _, c in cells.iterrows():
        for metric in ("knn_top1", "knn_dino_top1", "linear_probe_top1"):
            correct = load_correctness(results, "tiny", c["cell_id"], metric)
            assert correct is not None and correct.dtype == bool and correct.size == int(c["num_test"])
            assert correct.mean() == pytest.approx(c[metric], abs=1e-12)
    vs = registry.tables()["vs_frozen"].build(rows).reset_index()
    assert set(vs["paired over"]) == {"", "images x seeds"}, json.dumps(vs.to_dict(orient="records"))


def _cfg(method: str, seed: int, *, mode="threshold", topk=None, prototypes=10, include_bn=False) -> dict:
    train = None if method == "pretrained" else {
        "seed": seed, "progressive_topk": False,
        "mask": {"mode": mode, "topk_density": topk, "selective": "none", "stages": None, "selector": "conv",
                 "include_bn": include_bn},
        "swav": {"num_prototypes": prototypes}}
    return {"method": method, "seed": seed, "backbone": {"arch": "cifar_resnet8", "weights": "pipeline"},
            "dataset": {"source": "digits", "classes": [5, 6, 7, 8, 9]}, "eval": {"knn_k": 200}, "train": train}


def _synthetic(root) -> str:
    """Ledgers whose claims have known verdicts: SMN clearly above frozen on 3 seeds (claim 1 holds), the
    threshold mask clearly below top-k 50 % (claim 2 does not), masking the BNs below the same cells without
    (claims 3 and 5 hold: a top-k cell beside them, lower still, takes no part), prototypes mixed (claim 4 inconclusive), a
    one-seed cascade (claim 7 inconclusive: no interval), densities near 0.9 (claim 9 holds)."""
    import time

    now, n = time.time(), 0

    def cell(exp, method, seed, grid, metrics, **cfg):
        nonlocal n
        n += 1
        ledger.write_cell(str(root), exp, cell_id=f"c{n:03d}", method=method, backbone="cifar_resnet8",
                          dataset="digits", seed=seed, grid=grid, config=_cfg(method, seed, **cfg), metrics=metrics,
                          started_at=now, finished_at=now)

    for s, (a, b) in enumerate(((0.70, 0.60), (0.72, 0.61), (0.71, 0.63))):
        cell("t1", "pretrained", s, {}, {"knn_top1": b, "knn_dino_top1": b + 0.1})
        cell("t1", "smn", s, {}, {"knn_top1": a, "knn_dino_top1": a + 0.1, "density": 0.9 + s / 1000})
    for s, gap in enumerate((0.10, 0.12, 0.11)):
        cell("t2", "smn", s, {"train.mask": {"mode": "threshold"}},
             {"knn_top1": 0.6, "linear_probe_top1": 0.8, "density": 0.9 + s / 1000})
        cell("t2", "smn", s, {"train.mask": {"mode": "topk", "topk_density": 0.5}},
             {"knn_top1": 0.6 + gap, "linear_probe_top1": 0.8 + gap, "density": 0.5}, mode="topk", topk=0.5)
    for s, gap in enumerate((0.05, 0.06, 0.04)):  # BNs masked: below the same cells with the BNs kept
        cell("t2bn", "smn", s, {"train.mask.include_bn": False}, {"knn_top1": 0.7, "density": 0.9})
        cell("t2bn", "smn", s, {"train.mask.include_bn": True}, {"knn_top1": 0.7 - gap, "density": 0.9},
             include_bn=True)
        cell("t2bn", "smn", s, {"train.mask.mode": "topk"}, {"knn_top1": 0.5, "density": 0.5}, mode="topk", topk=0.5)
    for s, gap in enumerate((0.05, -0.04, 0.01)):
        cell("t5a", "smn", s, {"train.swav.num_prototypes": 2}, {"knn_top1": 0.6, "density": 0.9 + s / 1000},
             prototypes=2)
        cell("t5a", "smn", s, {"train.swav.num_prototypes": 100}, {"knn_top1": 0.6 + gap, "density": 0.9},
             prototypes=100)
    for method, knn in (("smn", 0.80), ("cascade_conditional", 0.85), ("cascade_unconditional", 0.90)):
        cell("t3", method, 0, {}, {"knn_top1": knn, "density": 0.9} if method == "smn" else {"knn_top1": knn})
    return str(root)


@pytest.mark.unit
def test_scorecard_gives_the_known_verdicts_of_a_synthetic_ledger(tmp_path):
    from orchestrator.reports import scorecard

    card = scorecard.scorecard(ledger.read_ledger(_synthetic(tmp_path))).set_index("#")
    assert len(card) == len(scorecard.CLAIMS) >= 10
    verdicts = dict(zip(card.index, card["Verdict"]))
    assert verdicts == {1: "holds", 2: "does not", 3: "holds", 4: "inconclusive", 5: "holds",
                        6: "inconclusive", 7: "inconclusive", 8: "inconclusive", 9: "holds", 10: "inconclusive"}
    direct = intervals.paired_seed_interval({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.60, 1: 0.61, 2: 0.63})
    assert f"t1: SMN - frozen, k-NN (k=200): {100 * direct.mean:+.1f} [{100 * direct.lo:+.1f}, " \
           f"{100 * direct.hi:+.1f}] points (3 seeds paired)" in card.at[1, "Evidence"]
    assert "one seed: no interval" in card.at[7, "Evidence"] and "unconditional - conditional" in card.at[7, "Evidence"]
    bn = intervals.paired_seed_interval({0: 0.7, 1: 0.7, 2: 0.7}, {0: 0.65, 1: 0.64, 2: 0.66})
    assert card.at[3, "Evidence"] == f"t2bn: BN kept - BN masked, k-NN (k=200): {100 * bn.mean:+.1f} " \
                                     f"[{100 * bn.lo:+.1f}, {100 * bn.hi:+.1f}] points (3 seeds paired)"
    assert "t5a: 100 - 2 prototypes" in card.at[4, "Evidence"]
    assert card.at[5, "Evidence"].startswith(f"t2bn: BNs frozen - conv +BN frozen, k-NN (k=200): {100 * bn.mean:+.1f}")


def _invariance_ledger(root, flip: int) -> str:
    """One experiment of three SMN cells differing only in (S0, mu, lr): the reference (1, 0, 50), an
    equivalent (2, 0, 100) whose masks differ from the reference's in ``flip`` of 1000 bits, and a
    non-equivalent (1, 0, 100)."""
    import time

    import torch

    from smn_core.checkpoint import save_tensors

    now = time.time()
    ref = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.9
    for n, (s0, lr) in enumerate(((1.0, 50.0), (2.0, 100.0), (1.0, 100.0))):
        config = {"method": "smn", "seed": 0, "backbone": {"arch": "cifar_resnet8", "weights": "pipeline"},
                  "dataset": {"source": "digits"},
                  "train": {"seed": 0, "adaptation": "mask", "score_lr": lr, "momentum": 0.9, "dtype": "float32",
                            "mask": {"mode": "threshold", "init_score": s0, "threshold": 0.0}}}
        ledger.write_cell(str(root), "inv", cell_id=f"i{n}", method="smn", backbone="cifar_resnet8", dataset="digits",
                          seed=0, grid={"train.score_lr": lr}, config=config,
                          metrics={"knn_top1": 0.6, "train_loss@1": 1.0}, started_at=now, finished_at=now)
        masks = ref.clone()
        if n == 1:
            masks[:flip] = ~masks[:flip]
        elif n == 2:
            masks = ~masks
        save_tensors(ExperimentLayout.of(str(root), "inv").mask(f"i{n}"), {"layer3.0.conv1.weight": masks})
    return str(root)


@pytest.mark.unit
@pytest.mark.parametrize("flip, expected", [(0, "holds"), (50, "does not")])
def test_scorecard_judges_equivalent_masks_from_the_exported_masks(tmp_path, flip, expected):
    from orchestrator.reports import scorecard

    rows = ledger.read_ledger(_invariance_ledger(tmp_path, flip))
    card = scorecard.scorecard(rows).set_index("#")
    assert card.at[8, "Verdict"] == expected
    assert f"(2, 0, 100) vs the reference: {100 - flip / 10:.4f}%" in card.at[8, "Evidence"]
    rows.attrs.pop("results")  # the docs pages: the ledger files alone, no masks
    assert scorecard.scorecard(rows).set_index("#").at[8, "Verdict"] == "inconclusive"


@pytest.mark.unit
def test_vs_frozen_compares_smn_with_the_strongest_random_mask(tmp_path):
    """Random-mask control cells beside the committed demo (as the random_mask method lands them): two
    settings, about 2 points and about 1 point below SMN's k = 20 (a little more each seed); SMN's row is paired
    with the stronger one."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    results = _demo_copy(tmp_path)
    dst = results / "demo" / "ledger"
    for f in sorted(DEMO.glob("*.parquet")):
        rows = pq.read_table(f).to_pandas()
        if rows["method"].iloc[0] != "smn":
            continue
        for match, gap in (("count", 0.02), ("magnitude", 0.01)):
            r = rows.copy()
            config = json.loads(r["config_json"].iloc[0])
            config["method"] = r["method"] = "random_mask" + ("_magnitude" if match == "magnitude" else "")
            r["config_json"], r["cell_id"] = json.dumps(config), f"{match}{int(r['seed'].iloc[0])}"
            r.loc[r["metric"] == "knn_dino_top1", "value"] -= gap + 0.002 * int(r["seed"].iloc[0])
            pq.write_table(pa.Table.from_pandas(r, preserve_index=False), dst / f"{r['cell_id'].iloc[0]}.parquet")
    vs = registry.tables()["vs_frozen"].build(ledger.read_ledger(str(results), "demo")).reset_index()
    smn = vs[vs["Method"] == "smn"].iloc[0]
    d = intervals.t_interval([0.010, 0.012, 0.014])  # magnitude: the stronger control
    assert smn["k-NN (k=20) vs random mask"] == f"+1.2 [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] gain"
    count = vs[vs["Method"] == "random_mask"].iloc[0]  # a control's row: what SMN gains over it
    d = intervals.t_interval([0.020, 0.022, 0.024])
    assert count["k-NN (k=20) vs random mask"] == f"smn +2.2 [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] gain"
    assert count["k-NN (k=200) vs random mask"].startswith("smn +0.0")  # k = 200 left equal to SMN's
    assert set(vs["Method"]) >= {"random_mask", "random_mask_magnitude"}
    assert "vs random mask" in registry.tables()["vs_frozen"].description and pd.notna(smn["paired over"])


@pytest.mark.unit
def test_mcnemar_per_seed_and_combined_against_a_direct_count():
    """Two seeds of 40 images: seed 0 has 7 images only A got right and 0 only B; seed 1 has 5 and 2. The exact
    two-sided binomial tail, counted by hand from the binomial pmf, against intervals.mcnemar."""
    from math import comb

    def two_sided(x: int, n: int) -> float:  # sum of the pmf values not above the observed one's
        pmf = [comb(n, k) / 2 ** n for k in range(n + 1)]
        return min(1.0, sum(p for p in pmf if p <= pmf[x] * (1 + 1e-7)))

    a = np.ones((2, 40), dtype=bool)
    b = np.ones((2, 40), dtype=bool)
    b[0, :7] = False
    b[1, 10:15] = False
    a[1, 20:22] = False
    a[1, 30:35] = b[1, 30:35] = False  # wrong for both: not discordant
    res = intervals.mcnemar(a, b)
    assert (res.only_a, res.only_b) == (12, 2)
    assert res.per_seed == pytest.approx((two_sided(7, 7), two_sided(5, 7)))
    assert res.p == pytest.approx(two_sided(12, 14)) and res.p < 0.05 < res.per_seed[1]
    assert intervals.mcnemar(a, a).p == 1.0
    with pytest.raises(ValueError, match="same"):
        intervals.mcnemar(a, b[:, :10])


@pytest.mark.unit
def test_the_stored_t_quantiles_are_scipys():
    """The 95 % quantiles a table uses without importing scipy: stored for df 1-99, Cornish-Fisher beyond."""
    from scipy.special import stdtrit

    from orchestrator.reports.intervals import t_quantile

    for df in [*range(1, 300), 500, 1000, 3333, 10_000, 10**6]:
        assert t_quantile(df) == pytest.approx(float(stdtrit(df, 0.975)), abs=1e-9, rel=0), df
    for df in range(1, 100):
        assert t_quantile(df) == float(stdtrit(df, 0.975))  # bit for bit: the tables print the same digits
    assert t_quantile(4, 0.9) == pytest.approx(float(stdtrit(4, 0.95)))  # other levels: scipy itself


@pytest.mark.unit
def test_vs_frozen_mcnemar_column_is_binomtest_on_the_discordant_images(tmp_path):
    """Per-image files with designed disagreements beside the committed demo (its controls included): each
    ``McNemar p`` entry is scipy's exact binomial test on the images only one side got right, summed over the
    seeds (SMN vs frozen on SMN's row; SMN vs that control on a control's row); without the files, no column."""
    from scipy.stats import binomtest

    results = _demo_copy(tmp_path, controls=True)
    rows = ledger.read_ledger(str(results), "demo")
    assert not any("McNemar" in c for c in registry.tables()["vs_frozen"].build(rows).columns)
    idx = np.arange(269)
    wrong = {"pretrained": idx < 8, "pretrained_bn": idx < 8, "smn": (idx >= 20) & (idx < 26),
             "random_mask": idx < 10, "random_mask_magnitude": (idx >= 40) & (idx < 45)}
    lay = ExperimentLayout.of(str(results), "demo")
    arrays = {}
    for cid, method, seed in zip(*(rows.drop_duplicates("cell_id")[k] for k in ("cell_id", "method", "seed"))):
        correct = ~(wrong[method] | ((idx >= 100) & (idx < 100 + int(seed)) if method == "smn" else wrong[method]))
        arrays[(method, int(seed))] = correct
        write_correctness(lay, cid, {m: correct for m in ("knn_top1", "knn_dino_top1", "linear_probe_top1")})

    def p_of(a: str, b: str) -> str:
        x = np.stack([arrays[(a, s)] for s in (0, 1, 2)])
        y = np.stack([arrays[(b, s)] for s in (0, 1, 2)])
        only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
        return intervals.p_text(binomtest(only_a, only_a + only_b, 0.5).pvalue)

    vs = registry.tables()["vs_frozen"].build(ledger.read_ledger(str(results), "demo")).reset_index().set_index("Method")
    col = "k-NN (k=20) vs frozen: McNemar p"
    assert vs.at["smn", col] == p_of("smn", "pretrained") and 0.001 < float(vs.at["smn", col]) < 1
    for control in ("random_mask", "random_mask_magnitude"):
        assert vs.at[control, "k-NN (k=20) vs random mask: McNemar p"] == p_of("smn", control)
    assert vs.at["frozen (pretrained)", col] == ""
    assert "McNemar" in registry.tables()["vs_frozen"].description


def _build(root, experiment: str, layout: str):
    rows = ledger.read_ledger(str(root), experiment)
    return registry.tables()[layout].build(rows)


@pytest.mark.unit
def test_ablation_layouts_show_intervals_and_the_difference_from_their_reference(tmp_path):
    """The synthetic ledgers (:func:`_synthetic`): every entry is mean ± std [95 % interval]; Table 2 pairs top-k
    with the threshold mask of the same setting, 5a with the most prototypes, 5b with the BNs frozen, 5c with the
    frozen backbone, each difference the paired t-interval over seeds computed directly; settings that share a
    row label (threshold with and without the BNs masked) get rows of their own."""
    root = _synthetic(tmp_path)
    t2 = _build(root, "t2", "table2")
    gap = intervals.paired_seed_interval({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.6, 1: 0.6, 2: 0.6})
    assert t2.at["k-NN: top-k 50%", "digits vs SMN (threshold)"] == intervals.difference_text(gap)
    assert t2.at["k-NN: top-k 50%", "digits"] == intervals.stat_text([0.70, 0.72, 0.71])
    assert t2.at["k-NN: SMN (threshold)", "digits vs SMN (threshold)"] == "reference"
    assert intervals.difference_text(gap).endswith(" gain") and "±" in t2.at["k-NN: top-k 50%", "digits"]
    bn = _build(root, "t2bn", "table2")
    assert {"k-NN: SMN (threshold) (include_bn=false)", "k-NN: SMN (threshold) (include_bn=true)"} <= set(bn.index)
    assert bn.at["k-NN: top-k 50%", "digits vs SMN (threshold)"] == "-20.0 (same every seed)"  # vs BNs kept
    t5a = _build(root, "t5a", "table5a")
    fewer = intervals.paired_seed_interval({0: 0.6, 1: 0.6, 2: 0.6}, {0: 0.65, 1: 0.56, 2: 0.61})
    assert list(t5a.index) == ["2", "100"] and t5a.at["2", "digits vs most"] == intervals.difference_text(fewer)
    t5b = _build(root, "t2bn", "table5b")
    masked = intervals.paired_seed_interval({0: 0.65, 1: 0.64, 2: 0.66}, {0: 0.7, 1: 0.7, 2: 0.7})
    assert t5b.at["conv +BN", "digits vs BNs"] == intervals.difference_text(masked)
    t5c = _build(root, "t1", "table5c")
    smn = intervals.paired_seed_interval({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.60, 1: 0.61, 2: 0.63})
    assert t5c.at["cifar_resnet8 (pipeline)", "digits vs frozen"] == intervals.difference_text(smn)
    assert t5c.at["cifar_resnet8 (pipeline), frozen", "digits"] == intervals.stat_text([0.60, 0.61, 0.63])
    t8 = _build(root, "t1", "table8").reset_index().set_index("Method")
    assert t8.at["smn", "digits[5-9]"] == intervals.stat_text([0.9, 0.901, 0.902], digits=1, scale=100, unit="%")
    t10 = _build(root, "t1", "table10").reset_index()
    ci = intervals.t_interval([0.70, 0.72, 0.71])
    assert f"[{ci.lo:.3f}, {ci.hi:.3f}]" in set(t10["95 % interval"])
