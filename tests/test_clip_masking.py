"""The CLIP ViT-B/32 path (paper Sec. 4.1, "Supervised Transformers"; Table 1): masks on the attention
projections (open_clip's fused q/k/v ``in_proj_weight`` / ``in_proj_bias`` and ``out_proj``) and the MLP
(``c_fc``, ``c_proj``) of every block, weights and biases; the head made of the class names' text
embeddings with cosine-similarity logits; cross-entropy. A randomly initialised open_clip ViT-B-32
(the OpenAI weights need the internet) stands in for the pretrained one."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.reports.baselines import fig6, sparsity_blocks
from orchestrator.spec.experiment import cell_id_of
from smn_core.backbones import build_backbone
from smn_core.checkpoint import save_tensors
from smn_core.masking import MaskConfig, attach_masks, iter_masked_tensors, score_parameters
from smn_core.pipeline import clip_text_classifier, run_cell
from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
from smn_core.training import CosineClassifier, TrainConfig

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

BLOCKS = 12
PER_BLOCK = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_backbone("clip_vit_b32", "random")


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_masks_cover_exactly_the_attention_projections_and_mlps(clip):
    visual = copy.deepcopy(clip.model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    originals = {n: p.detach().clone() for n, p in visual.named_parameters()}
    with torch.no_grad():
        before = visual(x)
    names = attach_masks(visual, MaskConfig(selector="clip_attn_mlp"))
    expected = {f"transformer.resblocks.{i}.{p}" for i in range(BLOCKS) for p in PER_BLOCK}
    assert set(names) == expected and len(names) == 96
    shapes = dict(iter_masked_tensors(visual))
    assert tuple(shapes["transformer.resblocks.0.attn.in_proj_weight"].shape) == (3 * 768, 768)  # fused q, k, v
    # nothing else is masked or trainable: patch embedding, class / position embeddings, LayerNorms, proj
    trainable = [n for n, p in visual.named_parameters() if p.requires_grad]
    assert all(n.endswith(".scores") for n in trainable) and len(trainable) == 96
    assert sum(s.numel() for s in score_parameters(visual).values()) == sum(originals[n].numel() for n in expected)
    unmasked = set(originals) - expected
    assert {"conv1.weight", "class_embedding", "positional_embedding", "proj", "ln_pre.weight"} <= unmasked
    # with every mask 1 the masked model computes exactly what the plain model computed
    with torch.no_grad():
        after = visual(x)
    assert torch.equal(before, after)


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_text_head_gives_cosine_logits(clip):
    head = clip_text_classifier(clip, ["airplane", "automobile", "bird"], "a photo of a {}")
    assert isinstance(head, CosineClassifier)
    assert head.weight.shape == (3, 512)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    assert head.logit_scale == pytest.approx(float(clip.extras["clip_model"].logit_scale.detach().exp()))
    assert not list(head.parameters())  # frozen: the mask is all a task stores
    f = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    logits = head(f)
    cos = torch.nn.functional.normalize(f, dim=1) @ head.weight.t()
    torch.testing.assert_close(logits, head.logit_scale * cos)
    assert logits.abs().max() <= head.logit_scale + 1e-4
    with pytest.raises(ValueError, match="not a CLIP backbone|needs a CLIP backbone"):
        clip_text_classifier(build_backbone("cifar_resnet8", "random"), ["a", "b"], "a photo of a {}")


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_supervised_masking_of_clip_trains_only_scores(tmp_path):
    torch.manual_seed(0)
    cfg = CellConfig(
        method="supervised_mask", backbone=BackboneSpec(arch="clip_vit_b32", weights="random"),
        dataset=DataSpec(source="digits", classes=[0, 1], max_train_samples=8, max_test_samples=6),
        train=TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, score_lr=10.0, classifier="clip_text",
                          mask=MaskConfig(selector="clip_attn_mlp")),
        eval=EvalSpec(knn_k=3, batch_size=8))
    out = run_cell(cfg)
    assert out.metrics["steps"] == 1
    assert len(out.masks) == 96
    assert out.metrics["mask_bits"] == out.metrics["storage_bits"] == sum(m.numel() for m in out.masks.values())
    assert 0.0 <= out.metrics["classifier_top1"] <= 1.0
    params = [k for k in out.state if k.startswith("param.")]
    assert params and all(k.endswith(".scores") for k in params)  # no head parameter: the text head is frozen
    assert any(k == "buffer.classifier.weight" for k in out.state)
    scores = [v for k, v in out.state.items() if k.endswith(".scores")]
    assert any(not torch.all(s == 1.0) for s in scores)  # the step moved the scores
    # Fig. 6 and the per-block table read these masks back from a ledger
    results = str(tmp_path / "results")
    cid = cell_id_of(cfg)
    save_tensors(ExperimentLayout.of(results, 'clip').mask(cid), out.masks)
    ledger.write_cell(results, "clip", cell_id=cid, method=cfg.method, backbone=cfg.backbone.arch,
                      dataset=cfg.dataset.source, seed=0, grid={}, config=cfg.to_dict(), metrics=out.metrics,
                      started_at=0.0, finished_at=1.0)
    df = ledger.read_ledger(results)
    df.attrs["results"] = results
    blocks = sparsity_blocks(df).reset_index()
    assert list(blocks["Block"]) == [f"block{i}" for i in range(BLOCKS)]
    png = tmp_path / "fig6.png"
    fig6(df, str(png))
    assert png.stat().st_size > 10_000


@pytest.mark.unit
def test_clip_text_head_needs_a_clip_backbone():
    with pytest.raises(ValueError, match="needs a CLIP backbone"):
        CellConfig(method="supervised_mask", backbone=BackboneSpec(arch="cifar_resnet20"),
                   train=TrainConfig(classifier="clip_text"))
    with pytest.raises(ValueError, match="prompt_template"):
        TrainConfig(prompt_template="a photo")
    with pytest.raises(ValueError, match="classifier 'zero_shot' is not known"):
        TrainConfig(classifier="zero_shot")
