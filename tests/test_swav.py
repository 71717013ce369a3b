"""Tests for smn_core.swav: Sinkhorn-Knopp, the SwAV loss and head, the queue, collapse detection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smn_core.swav import SwAV, SwAVConfig, SwAVHead, detect_collapse, sinkhorn_knopp

pytestmark = pytest.mark.unit


def _scores(b: int = 32, k: int = 10, seed: int = 0) -> torch.Tensor:
    """Cosine-similarity-like prototype scores in [-1, 1], unbalanced on purpose."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g) * 0.4
    s[:, 0] += 0.5  # prototype 0 is preferred by most samples
    return s.clamp(-1, 1)


def _features(n_views: int, b: int, f: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, f, generator=g) for _ in range(n_views)]


def _small_cfg(**kw) -> SwAVConfig:
    base = dict(num_prototypes=10, proj_dim=8, queue_length=0, freeze_prototypes_steps=0)
    base.update(kw)
    return SwAVConfig(**base)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def test_sinkhorn_rows_sum_to_one_and_nonnegative():
    s = _scores()
    q = sinkhorn_knopp(s, epsilon=0.05, iterations=3)
    assert q.shape == s.shape and q.dtype == s.dtype
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)


def test_sinkhorn_columns_approach_b_over_k():
    s = _scores(b=32, k=10)
    b, k = s.shape

    def col_err(iterations: int) -> float:
        q = sinkhorn_knopp(s, epsilon=0.05, iterations=iterations)
        return float(((q.sum(dim=0) - b / k).abs() / (b / k)).max())

    raw = torch.softmax(s / 0.05, dim=1)
    raw_err = float(((raw.sum(dim=0) - b / k).abs() / (b / k)).max())
    e1, e3, e50 = col_err(1), col_err(3), col_err(50)
    assert raw_err > e3  # Sinkhorn balances the prototypes compared to a plain softmax
    assert e3 > e50
    assert e1 >= e3
    assert e50 < 1e-2
    # the row constraint holds however many iterations
    torch.testing.assert_close(sinkhorn_knopp(s, 0.05, 50).sum(1), torch.ones(b), rtol=0, atol=1e-5)


def test_sinkhorn_invariant_to_constant_shift():
    # float64 input: s + c is (nearly) exact, so only Sinkhorn itself could break the invariance
    s = _scores(seed=3).double()
    q = sinkhorn_knopp(s, 0.05, 3)
    assert q.dtype == torch.float64
    for c in (-0.7, 2.0, 100.0):
        torch.testing.assert_close(sinkhorn_knopp(s + c, 0.05, 3), q, rtol=0, atol=1e-9)
    # float32 with a small shift (the rounding of s + c itself is ~1e-7)
    s32 = s.float()
    torch.testing.assert_close(sinkhorn_knopp(s32 + 0.5, 0.05, 3), sinkhorn_knopp(s32, 0.05, 3), rtol=0, atol=1e-5)


def test_sinkhorn_sharp_kernel_stays_finite():
    # cosine scores with a small epsilon: logits span 2 / 0.005 = 400 nats
    s = _scores(seed=4)
    q = sinkhorn_knopp(s, 0.005, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)


def test_sinkhorn_input_validation():
    with pytest.raises(ValueError, match="shape"):
        sinkhorn_knopp(torch.zeros(5))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(4, 3), epsilon=0.0)


# ---------------------------------------------------------------------------------------------
# head and loss


def test_head_outputs_normalised_codes_and_prototypes():
    torch.manual_seed(0)
    head = SwAVHead(16, _small_cfg())
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        head.prototypes.weight.mul_(3.0)
    head.normalize_prototypes()
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(10))
    z, scores = head(torch.randn(6, 16))
    assert z.shape == (6, 8) and scores.shape == (6, 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(scores, z @ head.prototypes.weight.t())
    assert scores.abs().max() <= 1 + 1e-6


def test_mlp_head():
    head = SwAVHead(16, _small_cfg(hidden_dim=12))
    assert isinstance(head.projection, torch.nn.Sequential)
    z, scores = head(torch.randn(4, 16))
    assert z.shape == (4, 8) and scores.shape == (4, 10)


def test_swav_forward_finite_with_gradient_to_head_and_features():
    torch.manual_seed(0)
    swav = SwAV(16, _small_cfg())
    feats = [f.requires_grad_(True) for f in _features(4, 8, 16, seed=1)]
    loss, stats = swav(feats)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # cross-entropy of a softmax over logits in [-1/T, 1/T]: between 0 and 2/T + ln K
    assert 0 < loss.item() < 2 / 0.1 + math.log(10)
    counts = stats["code_counts"]
    assert counts.shape == (10,) and float(counts.sum()) == 8 * 2  # batch x crops_for_assign
    loss.backward()
    assert swav.head.projection.weight.grad is not None and swav.head.projection.weight.grad.abs().sum() > 0
    assert swav.head.prototypes.weight.grad is not None and swav.head.prototypes.weight.grad.abs().sum() > 0
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0


def test_swav_loss_matches_manual_formula():
    torch.manual_seed(0)
    cfg = _small_cfg(temperature=0.2)
    swav = SwAV(16, cfg)
    feats = _features(3, 6, 16, seed=2)
    loss, _ = swav(feats)
    with torch.no_grad():
        _, out = swav.head(torch.cat(feats))
        chunks = out.chunk(3)
        total = 0.0
        for i in cfg.crops_for_assign:
            q = sinkhorn_knopp(chunks[i], cfg.epsilon, cfg.sinkhorn_iterations)
            sub = sum(-(q * F.log_softmax(chunks[v] / cfg.temperature, dim=1)).sum(1).mean()
                      for v in range(3) if v != i)
            total += sub / 2
        expected = total / len(cfg.crops_for_assign)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_uniform_prototype_scores_give_ln_k_and_are_flagged():
    swav = SwAV(16, _small_cfg())
    with torch.no_grad():  # zero projection: z = normalize(0) = 0, every prototype score is 0
        swav.head.projection.weight.zero_()
        swav.head.projection.bias.zero_()
    loss, stats = swav(_features(4, 8, 16, seed=3))
    assert loss.item() == pytest.approx(math.log(10), abs=1e-5)
    counts = stats["code_counts"]
    p = counts / counts.sum()
    ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(10))
    message = detect_collapse(loss.item(), 10, ent)
    assert message is not None and "ln K" in message
    # the same prediction for every image: no information about the image, still flagged with it
    assert float(stats["prediction_information"]) == pytest.approx(0.0, abs=1e-6)
    message = detect_collapse(loss.item(), 10, ent, prediction_information=float(stats["prediction_information"]))
    assert message is not None and "0.000 of ln K" in message


def test_prediction_information_is_the_mutual_information_of_image_and_prediction():
    """Checked against a direct computation; a head whose predictions differ per image carries information,
    and a loss near ln K with such predictions (a poor but working expert) is not called a collapse."""
    cfg = _small_cfg()
    swav = SwAV(16, cfg)
    feats = _features(4, 8, 16, seed=5)
    loss, stats = swav(feats)
    with torch.no_grad():
        _, out = swav.head(torch.cat(feats))
        p = F.softmax(out / cfg.temperature, dim=1)
        pbar = p.mean(0)
        expected = (-(pbar * pbar.log()).sum() + (p * p.log()).sum(1).mean()) / math.log(cfg.num_prototypes)
    got = float(stats["prediction_information"])
    assert got == pytest.approx(float(expected), abs=1e-5) and got > 0.1
    ln_k = math.log(cfg.num_prototypes)
    assert detect_collapse(ln_k, cfg.num_prototypes, 0.9, prediction_information=got) is None
    assert detect_collapse(ln_k, cfg.num_prototypes, 0.9, prediction_information=0.02) is not None
    assert detect_collapse(ln_k, cfg.num_prototypes, 0.9) is not None  # not measured: the loss alone decides


def test_detect_collapse():
    k = 500
    ln_k = math.log(k)
    assert "ln K" in detect_collapse(ln_k * 1.01, k, 0.9)
    assert "ln K" in detect_collapse(ln_k * 0.99, k, 0.9)
    low = detect_collapse(0.5 * ln_k, k, 0.05)
    assert low is not None and "entropy" in low
    assert detect_collapse(0.5 * ln_k, k, 0.8) is None
    assert detect_collapse(ln_k * 0.95, k, 0.8) is None  # outside the 2 % band
    assert detect_collapse(ln_k * 0.95, k, 0.8, loss_tol=0.1) is not None
    assert detect_collapse(0.5 * ln_k, k, 0.3, entropy_floor=0.5) is not None


def test_swav_forward_validation():
    swav = SwAV(16, _small_cfg())
    with pytest.raises(ValueError, match="at least 2 views"):
        swav([torch.randn(4, 16)])
    swav3 = SwAV(16, _small_cfg(crops_for_assign=(0, 3)))
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav3(_features(3, 4, 16, seed=0))


# ---------------------------------------------------------------------------------------------
# queue


def test_queue_fills_then_changes_the_loss():
    cfg = _small_cfg(queue_length=16)
    torch.manual_seed(0)
    with_queue = SwAV(16, cfg)
    torch.manual_seed(0)
    without = SwAV(16, cfg)
    assert torch.equal(with_queue.head.prototypes.weight, without.head.prototypes.weight)
    with_queue.start_queue()
    assert with_queue.queue_active and not without.queue_active

    bs = 8
    batches = [_features(3, bs, 16, seed=10 + i) for i in range(3)]
    losses = []
    for step, feats in enumerate(batches):
        la, _ = with_queue(feats)
        lb, _ = without(feats)
        losses.append((la.item(), lb.item()))
        if step < 2:  # queue not yet full: not used for the assignments
            assert la.item() == lb.item()
    assert int(with_queue.queue_filled) >= with_queue.queue.shape[1] == 16
    assert int(without.queue_filled) == 0
    assert losses[2][0] != pytest.approx(losses[2][1], abs=1e-6)

    # queue content: newest codes first, per crop used for assignment
    with torch.no_grad():
        for slot, i in enumerate(cfg.crops_for_assign):
            newest = F.normalize(with_queue.head.projection(batches[2][i]), dim=1)
            previous = F.normalize(with_queue.head.projection(batches[1][i]), dim=1)
            torch.testing.assert_close(with_queue.queue[slot, :bs], newest)
            torch.testing.assert_close(with_queue.queue[slot, bs:], previous)


def test_queue_of_length_zero_never_activates():
    swav = SwAV(16, _small_cfg(queue_length=0))
    swav.start_queue()
    assert not swav.queue_active
    swav(_features(2, 4, 16, seed=0))
    assert int(swav.queue_filled) == 0


# ---------------------------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1),
    dict(temperature=0.0),
    dict(epsilon=0.0),
    dict(queue_start_fraction=1.5),
    dict(queue_start_fraction=-0.1),
    dict(num_prototypes=0),
    dict(proj_dim=0),
    dict(sinkhorn_iterations=0),
    dict(queue_length=-1),
    dict(hidden_dim=-1),
    dict(freeze_prototypes_steps=-5),
    dict(crops_for_assign=()),
    dict(crops_for_assign=(0, -1)),
])
def test_swav_config_validation(kwargs):
    with pytest.raises(ValueError):
        SwAVConfig(**kwargs)


def test_swav_config_defaults_are_the_papers():
    cfg = SwAVConfig()
    assert (cfg.num_prototypes, cfg.proj_dim, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations) == (
        500, 128, 0.1, 0.05, 3)
    assert cfg.crops_for_assign == (0, 1)
    assert SwAVConfig(crops_for_assign=[0]).crops_for_assign == (0,)
