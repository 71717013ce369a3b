"""Backbone registry: frozen pretrained feature extractors that Self-Masking Networks mask.

``build_backbone(arch, weights)`` returns a :class:`Backbone`: a feature extractor whose forward maps a
normalised image batch ``(B, 3, H, W)`` to pooled features ``(B, feature_dim)`` (no classification
head), plus the facts a pipeline needs around it (native input size, normalisation, which parameters
the masking module should mask by default, the pretrained head if the checkpoint has one).

Architectures (``available_backbones()``):

========================  ===========  ====  ======================================================
arch                      feature_dim  size  pretrained weights ("pretrained")
========================  ===========  ====  ======================================================
``cifar_resnet{20..56}``  64           32    CIFAR-10 supervised, Idelbayev 2018 (local file first,
                                             else download from GitHub)
``resnet18``              512          224   timm ImageNet-1k supervised (Hugging Face hub)
``resnet50``              2048         224   timm ImageNet-1k supervised (Hugging Face hub)
``resnet50_swav``         2048         224   SwAV 800 ep, Caron et al. 2020 (dl.fbaipublicfiles.com)
``resnet50_dino``         2048         224   DINO, Caron et al. 2021 (dl.fbaipublicfiles.com)
``clip_vit_b32``          512          224   OpenAI CLIP ViT-B/32 via open_clip (Hugging Face hub)
========================  ===========  ====  ======================================================

Beyond the registry, ``"timm/<name>"`` builds any model timm knows (headless, ``timm.create_model``) and
``"open_clip/<name>:<pretrained tag>"`` the image tower of any open_clip model; their pretrained weights come
from the local Hugging Face cache or a local file only, never a download (:func:`check_arch` says, before any
work, whether the name exists and the weights are there).

Every arch except the CIFAR ResNets with a local weight file is *hub-dependent*: "pretrained"
downloads weights. On an offline machine pass ``checkpoint=<local file>`` (with ``weights="pretrained"``
or ``weights="checkpoint"``). All pickle files are loaded with ``torch.load(..., weights_only=True)``;
no remote code is executed (the SwAV and DINO ``torch.hub`` entry points are reproduced here: same
torchvision ResNet-50, same weight URLs, but safe loading and strict key checks).

Plain PyTorch; never imports ray.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import IMAGENET_MEAN, IMAGENET_STD  # one definition of the ImageNet statistics
from .model_names import check_timm_name, save_timm_names
from .registry import Registry

__all__ = [
    "Backbone",
    "BasicBlock",
    "CifarResNet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHTS_CHOICES",
    "available_backbones",
    "build_backbone",
    "build_clip_text_head",
    "check_arch",
    "cifar_resnet",
    "cifar_weights_url",
    "load_checkpoint_state_dict",
    "register_backbone",
]

WEIGHTS_CHOICES: tuple[str, ...] = ("pretrained", "random", "checkpoint")

#: Environment variable naming a folder that holds ``resnet{depth}-*.th`` CIFAR-10 checkpoints.
CIFAR_WEIGHTS_ENV = "SMN_CIFAR_WEIGHTS_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_CIFAR_WEIGHTS_DIR = _REPO_ROOT.parent / "shared" / "weights" / "resnet_cifar10"
# Original public release (akamaster/pytorch_resnet_cifar10, BSD-2-Clause, (c) 2018 Yerlan Idelbayev).
# The 8 hex digits are the first 8 of the file's SHA-256, so torch.hub can verify them (check_hash).
_CIFAR_BASE_URL = "https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/pretrained_models/"
_CIFAR_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
# The URLs the facebookresearch/{swav,dino} hubconf.py entry points download.
_SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
_DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"


# --------------------------------------------------------------------------------------------------
# Backbone container
# --------------------------------------------------------------------------------------------------


@dataclass
class Backbone:
    """A feature extractor plus the facts needed to feed, mask and evaluate it.

    Attributes:
        model: feature extractor, returned in eval mode. ``model(x)`` with ``x`` a float tensor
            ``(B, 3, input_size, input_size)`` normalised with ``mean``/``std`` returns pooled features
            ``(B, feature_dim)``. It has no classification head (the head, if any, is ``classifier``).
        feature_dim: size of the feature vector.
        input_size: native square input resolution in pixels (32 for CIFAR ResNets, 224 otherwise).
        mean: per-channel RGB mean of the input normalisation (inputs scaled to [0, 1] first).
        std: per-channel RGB std of the input normalisation.
        arch: registry name (see :func:`available_backbones`).
        default_mask_selector: parameter selector the masking module should use by default:
            ``"conv"`` for ResNets, ``"clip_attn_mlp"`` for the CLIP ViT.
        classifier: the checkpoint's classification head (``nn.Linear(feature_dim, num_classes)``)
            when the weights carry one, so ``classifier(model(x))`` gives the original logits
            (CIFAR ResNets: ``Linear(64, 10)``; timm ResNets: ImageNet ``Linear(., 1000)``); for
            ``weights="random"`` the randomly initialised head of CIFAR/timm ResNets; else ``None``.
        extras: arch-specific objects. ``clip_vit_b32``: ``"clip_model"`` (the full open_clip CLIP
            model whose ``.visual`` is ``model``), ``"tokenizer"`` (open_clip tokenizer),
            ``"text_tower_loaded"`` (bool: whether the text tower holds real weights).
        weights_source: where the weights came from (``"random"``, a file path or a URL/hub id).
    """

    model: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str
    default_mask_selector: str
    classifier: nn.Module | None = None
    extras: dict = field(default_factory=dict)
    weights_source: str = ""


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, Sec. 4.2; layout and names of akamaster/pytorch_resnet_cifar10)
# --------------------------------------------------------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut of He et al. 2016: parameter-free subsample + zero channel padding.

    ``(B, C, H, W) -> (B, C + 2 * pad, ceil(H/2), ceil(W/2))`` with ``pad = planes // 4``: takes every
    second pixel and zero-pads the channel dimension on both sides. A module (not a lambda) so the
    network can be pickled and deep-copied.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus option-A shortcut, then ReLU.

    Input ``(B, in_planes, H, W)``, output ``(B, planes, H/stride, W/stride)``. Convolutions have no
    bias. Parameter names ``conv1, bn1, conv2, bn2`` (the shortcut has no parameters).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016 with option-A shortcuts.

    3x3 stem conv (16 channels, no bias) + BN + ReLU; three stages ``layer1..3`` of ``n`` basic
    blocks with 16/32/64 channels and strides 1/2/2; global average pool; ``linear`` 64 -> num_classes.
    Parameter names match the akamaster/pytorch_resnet_cifar10 checkpoints (after stripping
    ``module.``). Conv and linear weights are initialised with ``kaiming_normal_`` as in that code.

    ``features(x)``: ``(B, 3, H, W)`` -> ``(B, 64)``; ``forward(x)`` = ``linear(features(x))``:
    ``(B, num_classes)`` logits. Replacing ``linear`` by ``nn.Identity()`` turns ``forward`` into a
    feature extractor (this is what :func:`build_backbone` returns).
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear: nn.Module = nn.Linear(64, num_classes)
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features: ``(B, 3, H, W)`` normalised images -> ``(B, 64)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """``linear(features(x))``: ``(B, 3, H, W)`` -> ``(B, num_classes)`` (or ``(B, 64)`` headless)."""
        return self.linear(self.features(x))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a randomly initialised CIFAR ResNet classifier of the given depth.

    Args:
        depth: total weighted depth, ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, ...).
        num_classes: output size of the ``linear`` head (>= 1).

    Returns:
        :class:`CifarResNet` with ``features(x)``: ``(B, 3, H, W) -> (B, 64)`` and
        ``forward(x)``: ``(B, 3, H, W) -> (B, num_classes)``.

    Raises:
        ValueError: if ``depth`` is not of the form 6n+2 (n >= 1) or ``num_classes`` < 1.

    Source: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth {depth!r} is invalid; allowed: 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes {num_classes!r} is invalid; allowed: an integer >= 1")
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes=num_classes)


def cifar_weights_url(depth: int) -> str:
    """Public download URL of the original CIFAR-10 checkpoint for a CIFAR ResNet depth.

    Raises:
        ValueError: for a depth without a published checkpoint here (allowed: 20, 32, 44, 56).

    Source: github.com/akamaster/pytorch_resnet_cifar10, folder ``pretrained_models``.
    """
    if depth not in _CIFAR_FILES:
        raise ValueError(f"no CIFAR-10 checkpoint known for depth {depth!r}; allowed: {sorted(_CIFAR_FILES)}")
    return _CIFAR_BASE_URL + _CIFAR_FILES[depth]


# --------------------------------------------------------------------------------------------------
# Checkpoint files and strict loading
# --------------------------------------------------------------------------------------------------


def _clean_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": ...}``, check every value is a tensor, strip ``module.`` prefixes."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {source} holds a {type(obj).__name__}; allowed: a state dict (mapping of "
                         f"parameter name -> tensor), optionally wrapped as {{'state_dict': ...}}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"checkpoint {source} is not a state dict: entries {bad[:5]} are not tensors "
                         f"(a full training checkpoint should keep the weights under a 'state_dict' key)")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        name = str(key)
        if name.startswith("module."):
            name = name[len("module."):]
        out[name] = value
    return out


def _load_problem(exc: BaseException) -> str:
    """What a failed ``torch.load(weights_only=True)`` means, in a few words (torch's own text is pages long
    and suggests ``weights_only=False``, which smn never does)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        start = text.find("Unsupported global")
        return text[start:].splitlines()[0][:160]
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return "not a torch file, or a truncated one"
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local weight file into a flat ``{name: tensor}`` dict on the CPU, safely.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)`` (never an unrestricted unpickle). A
    ``{"state_dict": ...}`` wrapper (as in the CIFAR ResNet checkpoints) is unwrapped and a
    ``module.`` prefix (``nn.DataParallel``/DDP) is stripped from every key.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file cannot be read as weights only (e.g. a TorchScript archive such as
            OpenAI's original ``ViT-B-32.pt``, or a pickle of arbitrary objects), or holds something
            other than a mapping of tensors.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "is not a regular file" if p.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint file {str(p)!r} {what}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"checkpoint {str(p)!r} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"checkpoint {str(p)!r} cannot be loaded with torch.load(weights_only=True) "
                f"({_load_problem(exc)}); allowed: a .safetensors file or a torch file holding only "
                "tensors/containers (re-save its state_dict())"
            ) from exc
        except Exception:  # noqa: BLE001 - random bytes make the unpickler raise anything (IndexError, ...)
            raise ValueError(f"checkpoint {str(p)!r} is not a weight file: its bytes are neither a torch file nor "
                             "safetensors; allowed: a .safetensors file or a torch file holding only tensors") from None
    return _clean_state_dict(obj, repr(str(p)))


def _is_optional_buffer(name: str) -> bool:
    # Checkpoints from old PyTorch (e.g. the CIFAR ResNets) lack BatchNorm's num_batches_tracked;
    # BatchNorm fills it in on load.
    return name.endswith("num_batches_tracked")


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load ``state`` into ``module`` demanding exactly its keys and shapes, else a clear ValueError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not _is_optional_buffer(k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:8]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:8]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) {mismatched[:5]}")
        raise ValueError(f"{what} does not match the architecture: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def _split_head(state: Mapping[str, Tensor], head_prefix: str | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if head_prefix is None:
        return dict(state), {}
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    head = {k[len(head_prefix):]: v for k, v in state.items() if k.startswith(head_prefix)}
    return body, head


def _head_from_state(head: Mapping[str, Tensor], feature_dim: int, what: str) -> nn.Linear | None:
    """A Linear head rebuilt from ``{"weight": (C, D), "bias": (C,)}``; None when there is no weight."""
    weight = head.get("weight")
    if weight is None:
        return None
    if weight.ndim != 2 or weight.shape[1] != feature_dim:
        raise ValueError(f"{what}: classifier weight has shape {tuple(weight.shape)}; allowed: (num_classes, {feature_dim})")
    bias = head.get("bias")
    linear = nn.Linear(feature_dim, weight.shape[0], bias=bias is not None)
    _load_strict(linear, {k: v for k, v in head.items() if k in ("weight", "bias")}, f"{what} (classifier)")
    return linear


def _load_headed(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    head_prefix: str | None,
    feature_dim: int,
    what: str,
    ignore_prefixes: Sequence[str] = (),
) -> nn.Linear | None:
    """Strictly load the backbone part of ``state`` into the headless ``model``; return the head."""
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    body, head = _split_head(state, head_prefix)
    _load_strict(model, body, what)
    return _head_from_state(head, feature_dim, what)


def _hub_error(arch: str, source: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not fetch the pretrained weights of {arch!r} from {source} ({type(exc).__name__}: {exc}); "
        f"on a machine without internet pass checkpoint=<local weight file> (weights='pretrained' or 'checkpoint')"
    )


# --------------------------------------------------------------------------------------------------
# Builders, one per family, registered under each arch they build
# --------------------------------------------------------------------------------------------------

#: A builder: ``fn(arch, weights, checkpoint or None) -> Backbone`` (arguments already checked).
BuildFn = Callable[[str, str, "str | None"], Backbone]
_BACKBONES: Registry[BuildFn] = Registry("backbone")


def register_backbone(arch: str, *, description: str, hub_dependent: bool) -> Callable[[BuildFn], BuildFn]:
    """Decorator registering a backbone builder under ``arch`` (for :func:`build_backbone`).

    The builder is called as ``fn(arch, weights, checkpoint)`` with ``weights`` one of
    :data:`WEIGHTS_CHOICES` and ``checkpoint`` an existing local file or None, and returns a
    :class:`Backbone`; one builder may be registered under several archs (stack the decorator).
    ``description`` says what the weights are; ``hub_dependent``: "pretrained" needs a download.

    Raises:
        ValueError: ``arch`` is not a non-empty str or is already registered.
    """
    return _BACKBONES.register(arch, description=description, hub_dependent=hub_dependent)



def _find_local_cifar(depth: int) -> Path | None:
    folder = Path(os.environ[CIFAR_WEIGHTS_ENV]) if os.environ.get(CIFAR_WEIGHTS_ENV) else _DEFAULT_CIFAR_WEIGHTS_DIR
    matches = sorted(folder.glob(f"resnet{depth}-*.th")) if folder.is_dir() else []
    return matches[0] if matches else None


_CIFAR_DESCRIPTION = "CIFAR ResNet-{}, CIFAR-10 supervised (local file, else GitHub download)"


# the smallest CIFAR ResNet (one block per stage): no published weights, for the pipeline's own
# pretraining (the embedded demo) and quick tests; "pretrained" raises a clear error
@register_backbone("cifar_resnet8", hub_dependent=False,
                   description="CIFAR ResNet-8 (no published weights: use weights random, checkpoint or pipeline)")
@register_backbone("cifar_resnet20", hub_dependent=False, description=_CIFAR_DESCRIPTION.format(20))
@register_backbone("cifar_resnet32", hub_dependent=False, description=_CIFAR_DESCRIPTION.format(32))
@register_backbone("cifar_resnet44", hub_dependent=False, description=_CIFAR_DESCRIPTION.format(44))
@register_backbone("cifar_resnet56", hub_dependent=False, description=_CIFAR_DESCRIPTION.format(56))
def _build_cifar(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    depth = int(arch[len("cifar_resnet"):])
    net = cifar_resnet(depth)
    classifier: nn.Module | None = net.linear
    net.linear = nn.Identity()
    source = "random"
    if weights != "random":
        if checkpoint is not None:
            state, source = load_checkpoint_state_dict(checkpoint), str(checkpoint)
        else:  # weights == "pretrained"
            local = _find_local_cifar(depth)
            if local is not None:
                state, source = load_checkpoint_state_dict(local), str(local)
            else:
                url = cifar_weights_url(depth)
                try:
                    obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
                except Exception as exc:
                    raise _hub_error(arch, url, exc) from exc
                state, source = _clean_state_dict(obj, url), url
        classifier = _load_headed(net, state, head_prefix="linear.", feature_dim=64, what=f"{arch} checkpoint {source}")
    return Backbone(model=net.eval(), feature_dim=64, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, arch=arch,
                    default_mask_selector="conv", classifier=classifier, weights_source=source)


@register_backbone("resnet18", hub_dependent=True, description="timm ResNet-18, ImageNet-1k")
@register_backbone("resnet50", hub_dependent=True, description="timm ResNet-50, ImageNet-1k")
def _build_timm_resnet(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    import timm

    source = "random"
    if weights == "pretrained" and checkpoint is None:
        try:
            net = timm.create_model(arch, pretrained=True)
        except Exception as exc:
            raise _hub_error(arch, f"timm/Hugging Face hub ({arch})", exc) from exc
        source = f"timm:{net.pretrained_cfg.get('hf_hub_id') or arch}"
    else:
        net = timm.create_model(arch, pretrained=False)
    return _timm_backbone(net, arch, checkpoint, source, head_name="fc", default_mask_selector="conv")


def _timm_backbone(net: nn.Module, arch: str, checkpoint: str | None, source: str, *, head_name: str,
                   default_mask_selector: str) -> Backbone:
    """A built timm model as a headless :class:`Backbone`: its linear classifier kept aside (``classifier``),
    ``forward`` giving the pooled ``(B, num_features)``, then the weights of ``checkpoint`` (when given) loaded,
    with the classifier's keys under ``head_name + "."``; input size, mean and std from its pretrained config.

    Raises:
        ValueError: a checkpoint that does not match the model (names the offending keys).
    """
    feature_dim = int(net.num_features)
    head = net.get_classifier()
    classifier: nn.Module | None = None
    if isinstance(head, nn.Linear):
        classifier = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        classifier.load_state_dict(head.state_dict())
    net.reset_classifier(0)  # forward -> pooled (B, num_features)
    if checkpoint is not None:
        source = str(checkpoint)
        classifier = _load_headed(net, load_checkpoint_state_dict(checkpoint), head_prefix=head_name + ".",
                                  feature_dim=feature_dim, what=f"{arch} checkpoint {source}")
    cfg = net.pretrained_cfg
    return Backbone(model=net.eval(), feature_dim=feature_dim, input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                    mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
                    std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)), arch=arch,
                    default_mask_selector=default_mask_selector, classifier=classifier, weights_source=source)


_SSL_RESNET50_URLS = {"resnet50_swav": _SWAV_URL, "resnet50_dino": _DINO_RESNET50_URL}


@register_backbone("resnet50_swav", hub_dependent=True, description="torchvision ResNet-50, SwAV self-supervised")
@register_backbone("resnet50_dino", hub_dependent=True, description="torchvision ResNet-50, DINO self-supervised")
def _build_ssl_resnet50(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    import torchvision

    url = _SSL_RESNET50_URLS[arch]
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()  # as in the SwAV / DINO hub entry points
    source = "random"
    classifier: nn.Module | None = None
    if weights != "random":
        if checkpoint is not None:
            state, source = load_checkpoint_state_dict(checkpoint), str(checkpoint)
        else:
            try:
                obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise _hub_error(arch, url, exc) from exc
            state, source = _clean_state_dict(obj, url), url
        # SwAV pretraining checkpoints also hold the projection head and prototypes: not backbone.
        classifier = _load_headed(net, state, head_prefix="fc.", feature_dim=2048, what=f"{arch} checkpoint {source}",
                                  ignore_prefixes=("projection_head.", "prototypes."))
    return Backbone(model=net.eval(), feature_dim=2048, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, arch=arch,
                    default_mask_selector="conv", classifier=classifier, weights_source=source)


_CLIP_NAME = "ViT-B-32"


def _load_clip_checkpoint(clip: nn.Module, state: Mapping[str, Tensor], what: str) -> bool:
    """Load a full-CLIP (``visual.*`` + text keys) or visual-only checkpoint; return text_tower_loaded."""
    if not any(k.startswith("visual.") for k in state):  # visual tower only
        _load_strict(clip.visual, state, what)
        return False
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    _load_strict(clip.visual, visual, what)
    expected_text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.")}
    extra = [k for k in text if k not in expected_text]
    if extra:
        warnings.warn(f"{what}: ignoring {len(extra)} non-visual key(s) unknown to the CLIP text tower: {extra[:8]}",
                      stacklevel=3)
    known = {k: v for k, v in text.items() if k in expected_text}
    mismatched = [k for k in known if tuple(known[k].shape) != tuple(expected_text[k].shape)]
    if mismatched:
        raise ValueError(f"{what}: text-tower shape mismatch for {mismatched[:5]}")
    missing = [k for k in expected_text if k not in known]
    if missing and known:
        warnings.warn(f"{what}: text tower partly loaded, {len(missing)} key(s) missing: {missing[:8]}", stacklevel=3)
    clip.load_state_dict(known, strict=False)
    return not missing


@register_backbone("clip_vit_b32", hub_dependent=True, description="open_clip ViT-B-32, OpenAI CLIP image tower")
def _build_clip(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    # OpenAI weights were trained with QuickGELU; always build that variant so random / checkpoint
    # builds have exactly the architecture of the "openai" pretrained model.
    if weights == "pretrained" and checkpoint is None:
        try:
            clip = open_clip.create_model(_CLIP_NAME, pretrained="openai", force_quick_gelu=True, weights_only=True)
        except Exception as exc:
            raise _hub_error(arch, f"open_clip {_CLIP_NAME} pretrained='openai'", exc) from exc
        source, text_loaded = f"open_clip:{_CLIP_NAME}:openai", True
    else:
        clip, source, text_loaded = _unpretrained_clip(arch, _CLIP_NAME, True, checkpoint)
    clip.eval()
    visual = clip.visual
    return Backbone(model=visual, feature_dim=int(visual.output_dim), input_size=int(visual.image_size[0]),
                    mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD), arch=arch,
                    default_mask_selector="clip_attn_mlp", classifier=None,
                    extras={"clip_model": clip, "tokenizer": open_clip.get_tokenizer(_CLIP_NAME),
                            "text_tower_loaded": text_loaded},
                    weights_source=source)


# --------------------------------------------------------------------------------------------------
# Any timm / open_clip model: "timm/<name>", "open_clip/<name>:<pretrained tag>"
# --------------------------------------------------------------------------------------------------

TIMM_PREFIX = "timm/"
OPEN_CLIP_PREFIX = "open_clip/"
# the weight files timm and open_clip publish on the Hugging Face hub, safest first
_TIMM_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hf_cached_file(repo_id: str, filenames: Sequence[str]) -> str | None:
    """Path of the first of ``filenames`` of hub repo ``repo_id`` in the local Hugging Face cache, or None.

    Reads the cache only (``huggingface_hub.try_to_load_from_cache``): never touches the network.
    """
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and Path(path).is_file():
            return path
    return None


def _timm_weights_file(name: str) -> tuple[str, str]:
    """``(local file, hub id)`` of the pretrained weights of timm model ``name`` (tag allowed), from the cache.

    Raises:
        ValueError: an unknown pretrained tag, a model without published weights, or weights absent from the
            local Hugging Face cache (names the hub id and the offline remedy).
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:
        raise ValueError(f"backbone.arch 'timm/{name}': {exc}") from None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise ValueError(f"backbone.arch 'timm/{name}' has no weights on the Hugging Face hub; "
                         f"allowed: weights random, or checkpoint with a local file")
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _TIMM_HF_FILES
    path = _hf_cached_file(hub_id, files)
    if path is None:
        raise ValueError(f"backbone.arch 'timm/{name}': pretrained weights {hub_id} are not in the local Hugging Face "
                         f"cache (no download here); fetch them once with `hf download {hub_id}` on a machine with "
                         f"internet, or use weights checkpoint with a local file")
    return path, hub_id


def _open_clip_weights_file(name: str, tag: str) -> str:
    """Local file of open_clip ``name`` pretrained ``tag``, from the Hugging Face cache.

    Raises:
        ValueError: an unknown tag, or weights absent from the local cache.
    """
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ValueError(f"backbone.arch 'open_clip/{name}:{tag}': pretrained tag {tag!r} is not known; "
                         f"allowed: {', '.join(tags) or 'none (use weights random or checkpoint)'}")
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    parts = hub.strip("/").split("/")  # "org/repo/" or "org/repo/file"
    repo_id, filename = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) >= 2 else ("", "")
    path = _hf_cached_file(repo_id, (filename,) if filename else _OPEN_CLIP_HF_FILES) if repo_id else None
    if path is None:
        raise ValueError(f"backbone.arch 'open_clip/{name}:{tag}': pretrained weights "
                         f"{repo_id or '(no Hugging Face copy)'} are not in the local Hugging Face cache (no download "
                         f"here); fetch them once on a machine with internet, or use weights checkpoint with a local file")
    return path


def _split_open_clip(arch: str) -> tuple[str, str]:
    name, _, tag = arch[len(OPEN_CLIP_PREFIX):].partition(":")
    return name, tag


def check_arch(arch: str, weights: str = "pretrained", checkpoint: str | os.PathLike | None = None) -> None:
    """Check, without building anything, that :func:`build_backbone` knows ``arch`` and can find its weights.

    Registered archs need only be known. ``timm/<name>`` needs ``timm.is_model(name)`` (read from the names
    cached per timm version, :mod:`smn_core.model_names`, without importing timm; the first check caches them);
    ``open_clip/<name>:<tag>`` needs ``name`` in ``open_clip.list_models()``. With ``weights="pretrained"`` and
    no ``checkpoint``, their weights must be in the local Hugging Face cache (nothing is downloaded); the
    registered hub-dependent archs download as before and are not checked here.

    Raises:
        ValueError: one line naming the unknown name or the absent weights and what is allowed.
    """
    if not isinstance(arch, str):
        arch = repr(arch)  # named in the not-known error below
    pretrained = weights == "pretrained" and checkpoint is None
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        if check_timm_name(name) is None:  # no cached names for this timm: ask timm, and cache its names
            import timm

            with contextlib.suppress(OSError):  # a read-only home: the next check asks timm again
                save_timm_names(timm.list_models(), timm.__version__)
            if not name or not timm.is_model(name):
                raise ValueError(f"backbone.arch {arch!r}: timm has no model {name!r}; allowed: a name from "
                                 f"timm.list_models() (e.g. timm/resnet18, timm/convnext_tiny, "
                                 f"timm/vit_small_patch16_224)")
        if pretrained:
            _timm_weights_file(name)
    elif arch.startswith(OPEN_CLIP_PREFIX):
        import open_clip

        name, tag = _split_open_clip(arch)
        if name not in open_clip.list_models():
            raise ValueError(f"backbone.arch {arch!r}: open_clip has no model {name!r}; allowed: a name from "
                             f"open_clip.list_models() (e.g. open_clip/ViT-B-32:openai)")
        if pretrained:
            if not tag:
                raise ValueError(f"backbone.arch {arch!r} needs a pretrained tag for weights pretrained; allowed: "
                                 f"open_clip/{name}:<tag> with a tag from open_clip.list_pretrained_tags_by_model")
            _open_clip_weights_file(name, tag)
    elif arch not in _BACKBONES:
        raise ValueError(f"backbone.arch {arch!r} is not known; allowed: {', '.join(available_backbones())}, "
                         f"timm/<name> or open_clip/<name>:<tag>")


def _default_selector(model: nn.Module) -> str:
    """``"conv"`` for a network of convolutions; ``"attn_mlp"`` for a transformer (at most a patch-embedding conv)."""
    convs = sum(1 for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    return "conv" if convs > 1 else "attn_mlp"


def _build_timm_any(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    """``timm/<name>``: any timm model, headless; weights random, from a local file or from the HF cache."""
    import timm

    name = arch[len(TIMM_PREFIX):]
    source = "random"
    if weights == "pretrained" and checkpoint is None:
        path, hub_id = _timm_weights_file(name)
        # timm's own loader (head filtering, key remapping) reads the cached file: nothing downloads
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})
        source = f"timm:{hub_id}"
    else:
        net = timm.create_model(name, pretrained=False)
    return _timm_backbone(net, arch, checkpoint, source, head_name=str(net.pretrained_cfg.get("classifier") or "fc"),
                          default_mask_selector=_default_selector(net))


def _unpretrained_clip(arch: str, name: str, quick_gelu: bool, checkpoint: str | None):
    """open_clip model ``name`` with random weights, then ``checkpoint``'s when given: ``(model, weights source,
    whether the text tower was loaded)``.

    Raises:
        ValueError: a checkpoint that does not match the model (names the offending keys).
    """
    import open_clip

    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    if checkpoint is None:
        return clip, "random", False
    source = str(checkpoint)
    return clip, source, _load_clip_checkpoint(clip, load_checkpoint_state_dict(checkpoint), f"{arch} checkpoint {source}")


def _build_open_clip_any(arch: str, weights: str, checkpoint: str | None) -> Backbone:
    """``open_clip/<name>:<tag>``: the image tower of any open_clip model; weights as in :func:`_build_timm_any`."""
    import open_clip

    name, tag = _split_open_clip(arch)
    quick_gelu = bool(tag and (open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu", False))
    if weights == "pretrained" and checkpoint is None:
        path = _open_clip_weights_file(name, tag)
        clip = open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu, weights_only=True)
        source, text_loaded = f"open_clip:{name}:{tag}", True
    else:
        clip, source, text_loaded = _unpretrained_clip(arch, name, quick_gelu, checkpoint)
    clip.eval()
    visual = clip.visual
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,)
    mean = getattr(visual, "image_mean", None) or open_clip.constants.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.constants.OPENAI_DATASET_STD
    return Backbone(model=visual, feature_dim=int(visual.output_dim), input_size=int(size[0]),
                    mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), arch=arch,
                    default_mask_selector=_default_selector(visual), classifier=None,
                    extras={"clip_model": clip, "tokenizer": open_clip.get_tokenizer(name), "text_tower_loaded": text_loaded},
                    weights_source=source)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def available_backbones() -> list[str]:
    """Sorted names accepted by :func:`build_backbone`.

    ``cifar_resnet20/32/44/56`` (local-first, download fallback), and the hub-dependent ``resnet18``,
    ``resnet50`` (timm), ``resnet50_swav``, ``resnet50_dino`` (fbaipublicfiles) and ``clip_vit_b32``
    (open_clip).
    """
    return sorted(_BACKBONES)


def build_backbone(arch: str, weights: str = "pretrained", *, checkpoint: str | os.PathLike | None = None) -> Backbone:
    """Build a feature-extractor backbone.

    Args:
        arch: one of :func:`available_backbones`.
        weights: ``"pretrained"``: the real pretrained weights. CIFAR ResNets first look for
            ``resnet{depth}-*.th`` in ``$SMN_CIFAR_WEIGHTS_DIR`` (or, when unset, in
            ``<repo>/../shared/weights/resnet_cifar10``) and otherwise download the original release
            (github.com/akamaster/pytorch_resnet_cifar10, SHA-256 checked); ``resnet18``/``resnet50``
            come from timm (Hugging Face hub); ``resnet50_swav``/``resnet50_dino`` from the URLs of the
            facebookresearch/swav and /dino ``torch.hub`` entry points; ``clip_vit_b32`` from open_clip
            (``"ViT-B-32"``, ``pretrained="openai"``). Passing ``checkpoint`` makes it load that local file
            instead (offline clusters).
            ``"random"``: random initialisation (seed torch yourself for reproducibility).
            ``"checkpoint"``: the local file ``checkpoint`` (required).
        checkpoint: local weight file (``.safetensors``, or a torch file loadable with
            ``weights_only=True``; ``{"state_dict": ...}`` wrappers and ``module.`` prefixes accepted).
            The backbone keys must match exactly (unexpected, missing or mis-shaped backbone keys are an
            error); head keys (``linear.*`` for CIFAR ResNets, ``fc.*`` for the other ResNets) are optional
            and, when present, become ``Backbone.classifier``. SwAV ``projection_head.*``/``prototypes.*``
            keys are ignored. For ``clip_vit_b32`` either a full open_clip CLIP state dict (``visual.*`` keys
            plus the text tower, which is loaded into ``extras["clip_model"]``) or a visual-tower-only one.

    Returns:
        :class:`Backbone` whose ``model`` (eval mode, CPU, float32) maps ``(B, 3, input_size, input_size)``
        normalised images to ``(B, feature_dim)`` features.

    ``arch`` may also name any model of timm, ``"timm/<name>"`` (e.g. ``"timm/convnext_tiny"``, a pretrained
    tag allowed: ``"timm/resnet18.a1_in1k"``), or the image tower of any open_clip model,
    ``"open_clip/<name>:<pretrained tag>"`` (e.g. ``"open_clip/ViT-B-32:openai"``). Their ``"pretrained"``
    weights come from the local Hugging Face cache only (never downloaded; see :func:`check_arch`), or from
    ``checkpoint``; the head keys of a timm checkpoint are those of the model's ``pretrained_cfg["classifier"]``.
    Their ``default_mask_selector`` is ``"conv"`` for convolutional networks, ``"attn_mlp"`` for transformers.

    Raises:
        ValueError: unknown ``arch`` (lists the available ones), an unknown timm / open_clip name or tag, or
            their pretrained weights absent from the local cache; ``weights`` not in
            ``("pretrained", "random", "checkpoint")``; ``weights="checkpoint"`` without ``checkpoint``;
            ``checkpoint`` given with ``weights="random"``; a checkpoint that cannot be read safely or
            does not match the architecture (names the offending keys).
        FileNotFoundError: ``checkpoint`` does not exist.
        RuntimeError: pretrained weights could not be downloaded (hub-dependent archs offline).
    """
    family = arch.startswith(TIMM_PREFIX) or arch.startswith(OPEN_CLIP_PREFIX) if isinstance(arch, str) else False
    if not family and arch not in _BACKBONES:
        raise ValueError(f"unknown backbone arch {arch!r}; available: {', '.join(available_backbones())}, "
                         f"timm/<name> or open_clip/<name>:<tag>")
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS_CHOICES)}")
    if weights == "checkpoint" and checkpoint is None:
        raise ValueError("weights='checkpoint' needs checkpoint=<path to a local weight file>")
    if weights == "random" and checkpoint is not None:
        raise ValueError(f"checkpoint={str(checkpoint)!r} conflicts with weights='random'; "
                         f"use weights='checkpoint' (or 'pretrained') to load it")
    if checkpoint is not None and not Path(checkpoint).is_file():
        c = Path(checkpoint)
        what = "is a folder, not a file" if c.is_dir() else "is not a regular file" if c.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint file {str(checkpoint)!r} {what}")
    ck = None if checkpoint is None else str(checkpoint)
    if family:
        check_arch(arch, weights, ck)
        build = _build_timm_any if arch.startswith(TIMM_PREFIX) else _build_open_clip_any
        return build(arch, weights, ck)
    return _BACKBONES[arch](arch, weights, ck)


def build_clip_text_head(
    class_names: Sequence[str],
    template: str = "a photo of a {}.",
    weights: str = "pretrained",
    *,
    checkpoint: str | os.PathLike | None = None,
    backbone: Backbone | None = None,
    batch_size: int = 256,
) -> Tensor:
    """L2-normalised CLIP text embeddings of prompts built from class names (zero-shot head).

    Each class name ``c`` becomes the prompt ``template.format(c)``, is tokenised with the open_clip
    ViT-B-32 tokenizer (77 tokens) and encoded by the CLIP text tower; rows are divided by their L2 norm.
    Image features ``f`` of the same CLIP model (also L2-normalised) give zero-shot logits ``f @ W.T``.

    Args:
        class_names: the C class names, in label order (non-empty strings).
        template: prompt with exactly one ``{}`` placeholder.
        weights, checkpoint: as in :func:`build_backbone` for ``"clip_vit_b32"`` (ignored when
            ``backbone`` is given).
        backbone: a ``clip_vit_b32`` :class:`Backbone` to reuse (avoids building CLIP again).
        batch_size: prompts encoded per forward pass.

    Returns:
        float tensor ``(C, 512)`` with unit-norm rows, on the CLIP model's device, no grad.

    Raises:
        ValueError: empty or non-string class names, a template without exactly one ``{}``, a
            ``backbone`` that is not a CLIP backbone, or any ``build_backbone`` error.

    Source: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
    ICML 2021 (prompt template "a photo of a {}."); open_clip.
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of strings, got {class_names!r}")
    bad = [c for c in class_names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"class_names must be non-empty strings; bad entries: {bad[:5]!r}")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template {template!r} is invalid; allowed: a string with exactly one '{{}}', e.g. 'a photo of a {{}}.'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} is invalid; allowed: an integer >= 1")
    if backbone is None:
        backbone = build_backbone("clip_vit_b32", weights, checkpoint=checkpoint)
    if "clip_model" not in backbone.extras or "tokenizer" not in backbone.extras:
        raise ValueError(f"backbone {backbone.arch!r} is not a CLIP backbone (extras lack 'clip_model'/'tokenizer'); "
                         f"allowed: a Backbone from build_backbone('clip_vit_b32', ...)")
    clip, tokenizer = backbone.extras["clip_model"], backbone.extras["tokenizer"]
    prompts = [template.format(c) for c in class_names]
    device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    try:
        chunks = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                tokens = tokenizer(prompts[i:i + batch_size]).to(device)
                chunks.append(clip.encode_text(tokens).float())
        emb = torch.cat(chunks)
    finally:
        clip.train(was_training)
    return F.normalize(emb, dim=-1)
