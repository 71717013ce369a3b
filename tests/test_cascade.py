"""Unit tests of the cascade's maths (smn_core.cascade) and of the spec's cascade section, on real data
(scikit-learn digits as embeddings; a real CIFAR ResNet-8 for the model round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from smn_core.cascade import (
    Router,
    cascade_embedding,
    cascade_storage_bits,
    cluster_homogeneity,
    cluster_sizes,
    combine_cascade,
    embed_dataset,
    expert_epochs,
    fit_projection,
    fit_router,
    forward_passes,
    restore_adapted_backbone,
)

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast


@pytest.fixture(scope="module")
def digits():
    """Real 64-d feature vectors (8x8 pixel intensities) of the 1,797 sklearn digits, and their labels."""
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)


# ------------------------------------------------------------------------------------------ router


@pytest.mark.unit
def test_router_is_reproducible_with_one_seed(digits):
    x, _ = digits
    a = fit_router(x, components=20, clusters=5, seed=3)
    b = fit_router(x.clone(), components=20, clusters=5, seed=3)
    assert np.array_equal(a.route(x), b.route(x))
    assert np.array_equal(a.gmm.means_, b.gmm.means_)
    assert a.components.shape == (20, 64) and a.clusters == 5


@pytest.mark.unit
def test_router_seed_changes_the_mixture(digits):
    x, _ = digits
    fits = [fit_router(x, components=10, clusters=5, seed=s).gmm.means_ for s in range(3)]
    assert any(not np.allclose(fits[0], f) for f in fits[1:]), "the seed must reach the mixture's initialisation"


@pytest.mark.unit
def test_router_round_trips_through_tensors(digits):
    x, _ = digits
    router = fit_router(x[:1200], components=10, clusters=4, seed=0)
    restored = Router.from_tensors(router.to_tensors())
    held_out = x[1200:]
    assert np.array_equal(router.route(held_out), restored.route(held_out))
    assert restored.seed == 0 and restored.clusters == 4


@pytest.mark.unit
def test_router_routes_on_l2_normalised_embeddings(digits):
    x, _ = digits
    router = fit_router(x, components=8, clusters=3, seed=0)
    assert np.array_equal(router.route(x), router.route(x * 7.5)), "routing must ignore the embedding's scale"


@pytest.mark.unit
def test_router_clusters_are_more_homogeneous_than_chance(digits):
    x, y = digits
    router = fit_router(x, components=20, clusters=5, seed=0)
    routes = router.route(x)
    h = cluster_homogeneity(routes, y, 5, num_classes=10)
    sizes = cluster_sizes(routes, 5)
    assert sizes.sum() == len(x) and (sizes > 0).all()
    # five clusters of ten classes: at random, the two most common classes hold about 20 % of a cluster
    top2 = np.nansum(h[:, 1] * sizes) / sizes.sum()
    assert top2 > 0.5, f"the two most common classes hold only {top2:.2f} of the clusters"


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, message", [
    ({"components": 65}, "components=65 exceeds"),
    ({"components": 0}, "components must be an integer >= 1"),
    ({"clusters": 1}, "clusters=1 must be in 2.."),
    ({"covariance_type": "banana"}, "allowed: full, tied, diag, spherical"),
    ({"reg_covar": 0.0}, "reg_covar must be > 0"),
])
def test_router_rejects_bad_settings(digits, kwargs, message):
    x, _ = digits
    with pytest.raises(ValueError, match=message):
        fit_router(x, **kwargs)


@pytest.mark.unit
def test_router_rejects_bad_embeddings(digits):
    x, _ = digits
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_router(bad)
    with pytest.raises(ValueError, match="2-D"):
        fit_router(x[0])
    router = fit_router(x, components=5, clusters=2)
    with pytest.raises(ValueError, match="fitted on 64"):
        router.route(x[:, :10])


# ------------------------------------------------------------------------------------------ budget


@pytest.mark.unit
def test_expert_epochs_matches_the_paper_formula():
    # paper Sec. 4.1: E = 50000 / D * 150, rounded to the nearest integer
    assert expert_epochs(50_000, 10_000, 150) == 750
    assert expert_epochs(50_000, 7_000, 150) == round(50_000 / 7_000 * 150)
    assert expert_epochs(10, 4, 1) == 3, "2.5 rounds half up, not to the even 2"
    assert expert_epochs(100, 100, 1) == 1


@pytest.mark.unit
def test_expert_epochs_match_the_dispatchers_step_budget(digits):
    _, y = digits
    batch, epochs = 64, 150
    routes = fit_router(digits[0], components=20, clusters=5, seed=0).route(digits[0])
    disp_steps = (len(y) // batch) * epochs
    for size in cluster_sizes(routes, 5):
        e = expert_epochs(len(y), int(size), epochs)
        steps = (int(size) // batch) * e
        # drop_last loses under one batch per epoch: the budget matches up to that
        assert abs(steps - disp_steps) <= e + (len(y) / size) * epochs, (size, steps, disp_steps)


@pytest.mark.unit
def test_expert_epochs_rejects_bad_input():
    with pytest.raises(ValueError, match="cluster_size=11 exceeds num_train=10"):
        expert_epochs(10, 11, 5)
    with pytest.raises(ValueError, match="dispatcher_epochs must be an integer >= 1"):
        expert_epochs(10, 5, 0)


# ------------------------------------------------------------------------------------------ combination


def _blocks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dispatcher and k expert 'embeddings' from real digits: distinct real projections of the pixels."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(64, 16, generator=gen) for _ in range(k + 1)]
    return x @ mats[0], [x @ m for m in mats[1:]]


@pytest.mark.unit
def test_unconditional_embedding_concatenates_every_block(digits):
    x, _ = digits
    d, experts = _blocks(x, 3)
    e = cascade_embedding(d, experts, "unconditional")
    assert e.shape == (len(x), 4 * 16)
    assert torch.equal(e[:, :16], d)
    for k in range(3):
        assert torch.equal(e[:, 16 * (k + 1):16 * (k + 2)], experts[k])


@pytest.mark.unit
def test_conditional_embedding_is_zero_outside_the_routed_block(digits):
    x, _ = digits
    d, experts = _blocks(x, 5)
    routes = fit_router(d, components=10, clusters=5, seed=0).route(d)
    e = cascade_embedding(d, experts, "conditional", routes)
    assert e.shape == (len(x), 6 * 16)
    assert torch.equal(e[:, :16], d), "the dispatcher block is always there"
    for k in range(5):
        block = e[:, 16 * (k + 1):16 * (k + 2)]
        routed = torch.as_tensor(routes == k)
        assert routed.any()
        assert torch.equal(block[routed], experts[k][routed])
        assert (block[~routed] == 0).all()
    assert ((e[:, 16:] != 0).any(1)).all(), "every image keeps its routed expert's (non-zero) block"


@pytest.mark.unit
@pytest.mark.parametrize("mode, routes, message", [
    ("gated", None, "allowed: conditional, unconditional"),
    ("conditional", None, "needs routes"),
    ("conditional", "out_of_range", r"routes must lie in 0..1"),
])
def test_cascade_embedding_rejects_bad_input(digits, mode, routes, message):
    x, _ = digits
    d, experts = _blocks(x[:50], 2)
    if routes == "out_of_range":
        routes = np.full(50, 2)
    with pytest.raises(ValueError, match=message):
        cascade_embedding(d, experts, mode, routes)
    with pytest.raises(ValueError, match="dispatcher's is"):
        cascade_embedding(d, [experts[0][:, :8]], "unconditional")


@pytest.mark.unit
def test_whitening_gives_unit_variance_and_eigenvalue_division_the_papers_text(digits):
    x, _ = digits
    d, experts = _blocks(x, 2)
    concat = cascade_embedding(d, experts, "unconditional")
    white = fit_projection(concat, 16, "whiten")
    z = white.transform(concat).double()
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(z.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-3), "centred with the train mean"
    eig = fit_projection(concat, 16, "eigenvalue")
    var = torch.var(eig.transform(concat).double(), 0)
    ev = torch.as_tensor(eig.eigenvalues)
    assert torch.allclose(var, 1.0 / ev, rtol=1e-3), "dividing by the eigenvalue leaves variance 1 / eigenvalue"
    plain = fit_projection(concat, 16, "none")
    assert torch.allclose(torch.var(plain.transform(concat).double(), 0), ev, rtol=1e-3)
    assert (np.diff(white.eigenvalues) <= 0).all(), "top components first"


@pytest.mark.unit
def test_projection_guards_zero_variance_components(digits):
    x, _ = digits
    d, _ = _blocks(x[:40], 1)
    concat = cascade_embedding(d, [torch.zeros_like(d)], "unconditional")  # an all-zero expert block
    proj = fit_projection(concat, 32, "whiten")  # rank <= 16: half the components carry no variance
    z = proj.transform(concat)
    assert torch.isfinite(z).all()
    assert (proj.scale[proj.eigenvalues <= 1e-10 * proj.eigenvalues.max()] == 0).all()


@pytest.mark.unit
def test_projection_rejects_bad_settings(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="allowed: whiten, eigenvalue, none"):
        fit_projection(x, 8, "sqrt")
    with pytest.raises(ValueError, match="dim=65 exceeds"):
        fit_projection(x, 65)
    with pytest.raises(ValueError, match="fitted on 64"):
        fit_projection(x, 8).transform(x[:, :8])


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["conditional", "unconditional"])
def test_combined_embedding_has_the_dispatchers_dimension(digits, mode):
    x, _ = digits
    d, experts = _blocks(x, 5)
    router = fit_router(d[:1200], components=10, clusters=5, seed=0)
    tr, te, proj = combine_cascade(d[:1200], [e[:1200] for e in experts], d[1200:], [e[1200:] for e in experts],
                                   mode=mode, routes_train=router.route(d[:1200]), routes_test=router.route(d[1200:]))
    assert tr.shape == (1200, 16) and te.shape == (len(x) - 1200, 16)
    assert proj.mean.shape == (6 * 16,)
    assert proj.scaling == "whiten"


# ------------------------------------------------------------------------------------------ analysis, cost


@pytest.mark.unit
def test_cluster_homogeneity_counts_the_most_common_classes():
    routes = np.array([0, 0, 0, 1, 1, 1, 1])
    labels = np.array([2, 2, 1, 0, 0, 0, 1])
    h = cluster_homogeneity(routes, labels, clusters=3, num_classes=3)
    assert np.allclose(h[0], [2 / 3, 1.0, 1.0])
    assert np.allclose(h[1], [3 / 4, 1.0, 1.0])
    assert np.isnan(h[2]).all(), "an empty cluster has no class shares"
    with pytest.raises(ValueError, match=r"routes must lie in 0..0"):
        cluster_homogeneity(routes, labels, clusters=1)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        cluster_homogeneity(routes, labels, clusters=2, num_classes=2)


@pytest.mark.unit
def test_forward_passes_and_storage_follow_table3():
    assert [forward_passes(m, 5) for m in ("dispatcher", "conditional", "unconditional")] == [1, 2, 6]
    bits = 11_000.0
    assert cascade_storage_bits(bits, 5, "dispatcher") == bits
    assert cascade_storage_bits(bits, 5, "conditional") == 6 * bits == cascade_storage_bits(bits, 5, "unconditional")
    with pytest.raises(ValueError, match="allowed: dispatcher, conditional, unconditional"):
        forward_passes("experts", 5)


# ------------------------------------------------------------------------------------------ models


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_restored_dispatcher_reproduces_its_evaluation_and_subset_training():
    """A real 1-epoch self-masking run on digits; the backbone rebuilt from its final trainable state
    embeds exactly as the trained model did (same k-NN accuracy), and ``train_subset`` trains on the
    subset only (its number of steps)."""
    from smn_core.augment import MultiCropConfig
    from smn_core.evaluation import knn_top1
    from smn_core.pipeline import load_cell_data, run_cell
    from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
    from smn_core.swav import SwAVConfig
    from smn_core.training import TrainConfig

    cfg = CellConfig(method="smn", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"),
                     dataset=DataSpec(source="digits", classes=[5, 6, 7, 8, 9], image_size=16, max_train_samples=64,
                                      max_test_samples=40),
                     train=TrainConfig(epochs=1, batch_size=16, score_lr=200.0, bn_mode="adapt",
                                       swav=SwAVConfig(num_prototypes=10, queue_length=0, freeze_prototypes_steps=0),
                                       multicrop=MultiCropConfig(n_global=2, n_local=1, local_size=8)),
                     eval=EvalSpec(knn_k=10, probe_max_iter=100))
    out = run_cell(cfg)
    model, bb = restore_adapted_backbone(cfg, out.state)
    train_ds, test_ds = load_cell_data(cfg.dataset)
    xtr, ytr = embed_dataset(model, train_ds, image_size=16, mean=bb.mean, std=bb.std)
    xte, yte = embed_dataset(model, test_ds, image_size=16, mean=bb.mean, std=bb.std)
    assert xtr.shape == (64, bb.feature_dim)
    knn = knn_top1(xtr, ytr, xte, yte, k=10, temperature=cfg.eval.knn_temperature, num_classes=5)
    assert knn == pytest.approx(out.metrics["knn_top1"], abs=1e-12)
    flipped = sum(int((~m).sum()) for m in out.masks.values())
    assert flipped > 0, "the restored model must carry a mask that differs from all-ones"

    sub = run_cell(cfg, evaluate=False, train_subset=np.arange(40), init_state=out.state)
    assert sub.metrics["steps"] == 40 // 16
    with pytest.raises(ValueError, match="does not match the cell's model"):
        restore_adapted_backbone(cfg, {k: v for k, v in out.state.items() if "scores" not in k and "mask" not in k})


# ------------------------------------------------------------------------------------------ spec section


def _spec(tmp_path, cascade: str, methods: str = "[smn]"):
    from orchestrator.spec.experiment import load_spec

    p = tmp_path / "c.yaml"
    p.write_text(f"name: c\nmethods: {methods}\nbackbone: {{arch: cifar_resnet8, weights: random}}\n"
                 f"dataset: {{source: digits}}\n{cascade}")
    return load_spec(p)


@pytest.mark.unit
def test_cascade_section_defaults_are_the_papers(tmp_path):
    from orchestrator.spec.cascade import cascade_spec

    cs = cascade_spec(_spec(tmp_path, ""))
    assert (cs.router.components, cs.router.clusters, cs.experts.queue_start_fraction) == (20, 5, 0.2)
    assert cs.combination.scaling == "whiten" and cs.combination.modes == ["conditional", "unconditional"]
    assert cs.experts.epochs is None and cs.experts.max_restarts == -1


@pytest.mark.unit
@pytest.mark.parametrize("section, message", [
    ("cascade: {router: {clusterz: 5}}", "cascade.router.clusterz: unknown key"),
    ("cascade: {router: {clusters: 1}}", "cascade.router.clusters"),
    ("cascade: {combination: {scaling: sqrt}}", "cascade.combination.scaling"),
    ("cascade: {combination: {modes: [conditional, conditional]}}", "modes must be unique"),
    ("cascade: {experts: {epochs: 0}}", "cascade.experts.epochs"),
])
def test_cascade_section_errors_name_the_key(tmp_path, section, message):
    from orchestrator.spec.cascade import cascade_spec
    from orchestrator.spec.experiment import SpecError

    with pytest.raises(SpecError, match=message):
        cascade_spec(_spec(tmp_path, section))


@pytest.mark.unit
def test_cascade_needs_a_self_masking_dispatcher(tmp_path):
    from orchestrator.spec.cascade import cascade_spec
    from orchestrator.spec.experiment import SpecError

    with pytest.raises(SpecError, match="add 'smn'"):
        cascade_spec(_spec(tmp_path, "", methods="[pretrained]"))


@pytest.mark.unit
def test_cascade_ids_are_stable_and_depend_on_the_settings(tmp_path):
    from orchestrator.spec.cascade import cascade_spec
    from orchestrator.engine.cascade import plan_cascades

    spec = _spec(tmp_path, "")
    a = plan_cascades(spec, cascade_spec(spec))[0]
    b = plan_cascades(spec, cascade_spec(spec))[0]
    assert a == b and len(set(a.expert_ids)) == 5
    other = _spec(tmp_path, "cascade: {router: {seed: 1}}")
    c = plan_cascades(other, cascade_spec(other))[0]
    assert c.dispatcher.cell_id == a.dispatcher.cell_id and c.router_id != a.router_id
    assert not set(c.expert_ids) & set(a.expert_ids)
