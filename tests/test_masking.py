"""Tests for smn_core.masking: straight-through scores, alpha rescaling, selectors, export/apply,
top-k masks, frozen pretrained weights and the hyperparameter invariances of the paper (Theorems 1, 2).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

from smn_core.masking import (
    MaskConfig,
    ScoreMask,
    apply_masks,
    attach_masks,
    export_masks,
    iter_masked_tensors,
    mask_density,
    mask_modules,
    score_parameters,
    select_parameters,
    set_topk_density,
)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# helpers


def small_cnn(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU x2 -> pool -> Linear; 8 px inputs keep it fast."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def randomize_bn_stats(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def randomize_scores(model: nn.Module, seed: int = 2) -> None:
    """Scores ~ N(0, 1): about half the entries of every mask are dropped."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in score_parameters(model).values():
            s.copy_(torch.randn(s.shape, generator=g, dtype=s.dtype))


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(iter_masked_tensors(model))


def conv_weight_names(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------
# straight-through gradient and alpha


def _hand_gradient(plain: nn.Module, masked: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   detach_alpha: bool) -> dict[str, torch.Tensor]:
    """dL/dM for L(W * M / alpha) computed with M as an explicit leaf tensor."""
    mods = mask_modules(masked)
    orig = originals(masked)
    leaves = {n: (m.scores.detach() > m.config.threshold).to(orig[n].dtype).requires_grad_(True)
              for n, m in mods.items()}
    weights = {}
    for n, M in leaves.items():
        density = M.detach().mean() if detach_alpha else M.mean()
        weights[n] = orig[n] * M / torch.sqrt(density)
    out = functional_call(plain, weights, (x,))
    loss = ((out - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("alpha_grad", [False, True])
def test_straight_through_gradient_equals_dl_dmask(alpha_grad):
    plain = small_cnn(bias=True).eval()
    masked = copy.deepcopy(plain)
    attach_masks(masked, MaskConfig(selector="conv+linear", alpha_grad=alpha_grad))
    randomize_scores(masked)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))

    loss = ((masked(x) - target) ** 2).sum()
    loss.backward()
    expected = _hand_gradient(plain, masked, x, target, detach_alpha=not alpha_grad)
    scores = score_parameters(masked)
    assert set(scores) == set(expected) == {"0.weight", "3.weight", "8.weight"}
    for name, s in scores.items():
        assert s.grad is not None
        assert s.grad.abs().sum() > 0
        torch.testing.assert_close(s.grad, expected[name], rtol=1e-5, atol=1e-6)


def test_alpha_grad_changes_the_score_gradient():
    grads = {}
    for alpha_grad in (False, True):
        model = small_cnn(bias=False).eval()
        attach_masks(model, MaskConfig(alpha_grad=alpha_grad))
        randomize_scores(model)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        model(x).pow(2).sum().backward()
        grads[alpha_grad] = {n: s.grad.clone() for n, s in score_parameters(model).items()}
    for name in grads[False]:
        assert not torch.allclose(grads[False][name], grads[True][name], rtol=1e-4, atol=1e-6), name


def test_effective_weight_is_w_times_m_over_sqrt_density():
    model = small_cnn(bias=False)
    attach_masks(model, MaskConfig())
    conv = model[3]
    scores = score_parameters(model)["3.weight"]
    with torch.no_grad():
        scores.view(-1)[::3] = -0.5  # drop every third weight
        scores.view(-1)[1] = 0.0  # exactly at the threshold: dropped (M = 1[S > mu])
    W = conv.parametrizations.weight.original
    M = (scores.detach() > 0).float()
    density = M.mean().item()
    assert 0.5 < density < 0.7
    expected = W * M / math.sqrt(density)
    torch.testing.assert_close(conv.weight, expected, rtol=1e-6, atol=0)
    # the untouched layer keeps its pretrained weights exactly (all ones, alpha = 1)
    assert torch.equal(model[0].weight, model[0].parametrizations.weight.original)
    # per-tensor alpha: the other tensor's density does not enter
    assert mask_density(model)[1] == {"0.weight": 1.0, "3.weight": pytest.approx(density)}


@pytest.mark.parametrize("alpha_grad", [False, True])
def test_all_zero_mask_gives_finite_zero_output(alpha_grad):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 3, bias=False))
    attach_masks(model, MaskConfig(selector="conv+linear", alpha_grad=alpha_grad))
    with torch.no_grad():
        for s in score_parameters(model).values():
            s.fill_(-1.0)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(model[0].weight, torch.zeros_like(model[0].weight))
    (out - 1.0).pow(2).sum().backward()
    for s in score_parameters(model).values():
        assert s.grad is not None and torch.isfinite(s.grad).all()
    assert mask_density(model)[0] == 0.0


def test_pretrained_weights_frozen_and_unchanged_after_large_sgd_step():
    model = small_cnn(bias=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = attach_masks(model, MaskConfig(selector="conv+linear", include_bias=True))
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "8.weight", "8.bias"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    scores = score_parameters(model)
    assert {id(p) for p in trainable} == {id(s) for s in scores.values()}
    opt = torch.optim.SGD(trainable, lr=50.0)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    # the scores did move and some masks flipped
    assert any(not torch.all(s == 1.0) for s in scores.values())
    assert mask_density(model)[0] < 1.0
    for name, W in originals(model).items():
        assert not W.requires_grad
        assert torch.equal(W, before[name]), name
    # unmasked parameters (BN affine) are frozen and untouched as well
    for name, p in model.named_parameters():
        if name.endswith(".scores"):
            continue
        assert not p.requires_grad, name
        key = name.replace("parametrizations.", "").replace(".original", "")
        assert torch.equal(p, before[key]), name


def test_scoremask_identity_at_init_keeps_weight_dtype():
    m = ScoreMask(torch.Size([3, 2]), MaskConfig(init_score=1.0), dtype=torch.float64)
    assert m.scores.dtype == torch.float64
    w = torch.randn(3, 2, dtype=torch.float32)
    out = m(w)
    assert out.dtype == torch.float32
    assert torch.equal(out, w)


def test_float64_scores_on_float32_weights():
    model = small_cnn(bias=False)
    attach_masks(model, MaskConfig(), dtype=torch.float64)
    randomize_scores(model)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.float32 and model[0].weight.dtype == torch.float32
    out.pow(2).sum().backward()
    for s in score_parameters(model).values():
        assert s.dtype == torch.float64 and s.grad is not None and s.grad.dtype == torch.float64
        assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# export / apply


def _check_export_apply(plain: nn.Module, config: MaskConfig, x: torch.Tensor) -> None:
    masked = copy.deepcopy(plain)
    attach_masks(masked, config)
    randomize_scores(masked)
    masked.eval()
    with torch.no_grad():
        expected = masked(x)
    masks = export_masks(masked)
    assert all(m.dtype == torch.bool for m in masks.values())
    density, _ = mask_density(masks)
    assert 0.2 < density < 0.8
    baked = apply_masks(copy.deepcopy(plain), masks).eval()
    assert not mask_modules(baked)
    with torch.no_grad():
        got = baked(x)
        unmasked = plain.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked, expected, atol=1e-3)  # the masks do something


def test_export_apply_reproduces_small_cnn_with_bn_eval():
    plain = small_cnn(bias=True)
    randomize_bn_stats(plain)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    _check_export_apply(plain, MaskConfig(selector="conv+linear", include_bias=True), x)


def test_export_apply_reproduces_resnet18():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    randomize_bn_stats(plain)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    _check_export_apply(plain, MaskConfig(), x)


def test_apply_masks_errors():
    plain = small_cnn()
    masked = copy.deepcopy(plain)
    attach_masks(masked, MaskConfig())
    masks = export_masks(masked)
    with pytest.raises(ValueError, match="without attached masks"):
        apply_masks(masked, masks)
    with pytest.raises(ValueError, match="no parameter"):
        apply_masks(copy.deepcopy(plain), {"nope.weight": masks["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(copy.deepcopy(plain), {"0.weight": masks["3.weight"]})


# ---------------------------------------------------------------------------------------------
# selectors


def test_conv_selector_on_resnet18_includes_downsample_and_no_bn():
    model = torchvision.models.resnet18(num_classes=10)
    names = select_parameters(model, MaskConfig())
    assert set(names) == conv_weight_names(model)
    assert len(names) == len(set(names)) == 20
    assert "layer2.0.downsample.0.weight" in names
    assert not any("bn" in n or "downsample.1" in n or n.startswith("fc") for n in names)


def test_include_bn_adds_bn_weight_and_bias():
    model = torchvision.models.resnet18(num_classes=10)
    names = set(select_parameters(model, MaskConfig(include_bn=True)))
    bn = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert "layer3.0.downsample.1.weight" in bn
    assert names == conv_weight_names(model) | bn


def test_include_bias_adds_conv_and_linear_biases():
    model = small_cnn(bias=True)
    assert select_parameters(model, MaskConfig(selector="conv+linear")) == ["0.weight", "3.weight", "8.weight"]
    assert select_parameters(model, MaskConfig(selector="conv+linear", include_bias=True)) == [
        "0.weight", "0.bias", "3.weight", "3.bias", "8.weight", "8.bias"]
    assert select_parameters(model, MaskConfig(selector="linear", include_bias=True)) == ["8.weight", "8.bias"]
    # biases absent from a module (bias=False) are skipped silently
    assert select_parameters(small_cnn(bias=False), MaskConfig(include_bias=True)) == ["0.weight", "3.weight"]


def test_regex_selector():
    model = torchvision.models.resnet18(num_classes=10)
    names = select_parameters(model, MaskConfig(selector=r"re:^layer1\.\d+\.conv1\.weight$"))
    assert names == ["layer1.0.conv1.weight", "layer1.1.conv1.weight"]
    names = select_parameters(model, MaskConfig(selector=r"re:^fc\."))
    assert names == ["fc.weight", "fc.bias"]


def test_selector_selecting_nothing_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(model, MaskConfig(selector="linear"))
    with pytest.raises(ValueError, match="selects no parameter"):
        attach_masks(model, MaskConfig(selector="re:does_not_exist"))
    # nothing was frozen by the failed attach
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("selector", ["convs", "Conv", "", "re:(unclosed"])
def test_bad_selector_string_raises(selector):
    with pytest.raises(ValueError, match="selector"):
        MaskConfig(selector=selector)


@pytest.mark.parametrize("kwargs", [
    dict(mode="random"),
    dict(mode="topk"),
    dict(mode="topk", topk_density=0.0),
    dict(mode="topk", topk_density=1.5),
    dict(init_score=0.0, threshold=0.0),
    dict(init_score=float("nan")),
    dict(threshold=float("inf")),
])
def test_mask_config_validation(kwargs):
    with pytest.raises(ValueError):
        MaskConfig(**kwargs)


def test_attaching_twice_raises():
    model = small_cnn()
    attach_masks(model, MaskConfig())
    with pytest.raises(ValueError, match="already has masks"):
        attach_masks(model, MaskConfig())
    with pytest.raises(ValueError, match="already has masks"):
        attach_masks(model, MaskConfig(selector="linear"))
    assert set(mask_modules(model)) == {"0.weight", "3.weight"}


# ---------------------------------------------------------------------------------------------
# top-k


@pytest.mark.parametrize("density", [0.3, 0.07, 0.9])
def test_topk_keeps_exactly_round_k_n_largest_scores(density):
    model = small_cnn(bias=True)
    attach_masks(model, MaskConfig(selector="conv+linear", mode="topk", topk_density=density))
    # with all scores tied at S0 the count is still exact
    for name, m in mask_modules(model).items():
        assert int(m.hard_mask().sum()) == max(1, round(density * m.scores.numel())), name
    randomize_scores(model)
    for d in (density, 0.5 * density):
        set_topk_density(model, d)
        for name, m in mask_modules(model).items():
            mask = m.hard_mask()
            n = m.scores.numel()
            assert int(mask.sum()) == max(1, round(d * n)), (name, d)
            kept, dropped = m.scores.detach()[mask], m.scores.detach()[~mask]
            if dropped.numel():
                assert kept.min() >= dropped.max()
    with pytest.raises(ValueError):
        set_topk_density(model, 0.0)
    with pytest.raises(ValueError):
        set_topk_density(model, 1.01)


def test_topk_density_one_keeps_everything():
    model = small_cnn()
    attach_masks(model, MaskConfig(mode="topk", topk_density=1.0))
    randomize_scores(model)
    assert mask_density(model)[0] == 1.0


# ---------------------------------------------------------------------------------------------
# CLIP-like transformer blocks


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 2 * d), gelu=nn.GELU(), c_proj=nn.Linear(2 * d, d)))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(d) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _TinyClip(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)  # outside the blocks: not selected
        self.transformer = _Transformer(d, 2)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, 3)

    def forward(self, x):
        return self.proj(self.ln_post(self.transformer(self.embed(x))))


def test_clip_attn_mlp_selector_and_identity_with_full_masks():
    torch.manual_seed(0)
    plain = _TinyClip()
    with torch.no_grad():  # MultiheadAttention zero-initialises its biases; dL/dM = dL/dW * W would be 0
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    masked = copy.deepcopy(plain)
    names = attach_masks(masked, MaskConfig(selector="clip_attn_mlp"))
    expected = set()
    for i in range(2):
        p = f"transformer.resblocks.{i}"
        expected |= {f"{p}.attn.in_proj_weight", f"{p}.attn.in_proj_bias", f"{p}.attn.out_proj.weight",
                     f"{p}.attn.out_proj.bias", f"{p}.mlp.c_fc.weight", f"{p}.mlp.c_fc.bias",
                     f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias"}
    assert set(names) == expected and len(names) == len(expected)

    x = torch.randn(5, 2, 4)  # (sequence, batch, features)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(masked, mode)()
        out_masked = masked(x)
        with torch.no_grad():
            out_plain = plain(x)
        torch.testing.assert_close(out_masked, out_plain, rtol=0, atol=1e-6)
    # all masks are 1 and alpha = 1: the effective tensors are the pretrained ones exactly
    attn = masked.transformer.resblocks[0].attn
    assert torch.equal(attn.in_proj_weight, plain.transformer.resblocks[0].attn.in_proj_weight)
    # the gradient reaches every score, including the fused q/k/v projection
    out_masked.pow(2).sum().backward()
    for name, s in score_parameters(masked).items():
        assert s.grad is not None and s.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# hyperparameter invariance (paper Theorems 1 and 2, App. A)


def _tiny_double() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()


def _mask_trajectory(init_score: float, threshold: float, lr: float, momentum: float, steps: int = 20):
    model = _tiny_double()
    attach_masks(model, MaskConfig(selector="conv+linear", init_score=init_score, threshold=threshold))
    scores = score_parameters(model)
    assert all(s.dtype == torch.float64 for s in scores.values())
    opt = torch.optim.SGD(list(scores.values()), lr=lr, momentum=momentum, weight_decay=0.0)
    g = torch.Generator().manual_seed(123)
    xs = torch.randn(steps, 8, 3, 8, 8, generator=g, dtype=torch.float64)
    ts = torch.randn(steps, 8, 3, generator=g, dtype=torch.float64)
    masks, score_hist = [], []
    for x, t in zip(xs, ts):
        opt.zero_grad()
        ((model(x) - t) ** 2).sum().backward()
        opt.step()
        masks.append(export_masks(model))
        score_hist.append({n: s.detach().clone() for n, s in scores.items()})
    return masks, score_hist


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_hyperparameter_invariance_theorems_1_and_2(momentum):
    base_masks, base_scores = _mask_trajectory(1.0, 0.0, 50.0, momentum)
    scaled_masks, scaled_scores = _mask_trajectory(2.0, 0.0, 100.0, momentum)
    shifted_masks, _ = _mask_trajectory(2.5, 0.5, 100.0, momentum)

    # the runs are not trivial: masks change over the 20 steps and differ between steps
    final_density = mask_density(base_masks[-1])[0]
    assert 0.05 < final_density < 0.98
    assert mask_density(base_masks[0])[0] != final_density

    agree = total = 0
    for step, (a, b, c) in enumerate(zip(base_masks, scaled_masks, shifted_masks)):
        for name in a:
            # Theorem 2 (scale S0 and lr by 2): exact in floating point, scores are exactly doubled
            assert torch.equal(a[name], b[name]), (step, name)
            assert torch.equal(base_scores[step][name] * 2, scaled_scores[step][name]), (step, name)
            agree += int((a[name] == c[name]).sum())
            total += a[name].numel()
    share = agree / total
    print(f"momentum {momentum}: (1, 0, 50) vs (2.5, 0.5, 100) mask agreement {share:.6f} over 20 steps")
    # Theorem 1 (shift S0 and mu together): identical up to float rounding of S - mu near 0
    assert share == 1.0, f"share of agreeing mask entries {share}"
