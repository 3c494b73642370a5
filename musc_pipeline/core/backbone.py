"""Feature extraction from a backbone (SPEC §1); which backbones exist: :mod:`.registry`.

:func:`build` makes a spec's network with *random* weights; loading real weights into it (hub
cache, a file, a weights package) is the job of :mod:`musc_pipeline.resources.weights`, which
keeps this module free of I/O. :func:`wrap` makes the extractor of a network built elsewhere
(timm reading its own pretrained weights).

A :class:`FeatureExtractor` maps a batch B×3×S×S to

- ``taps``: B×h×w×C_l maps, the raw residual stream after each tap block (class and register
  tokens dropped; DINOv2 taps pass through the final norm, as the authors do), and
- ``embedding``: B×D L2-normalised image embedding (CLIP: the projected image embedding;
  timm: the model's pooled pre-logits feature — the class token for DINO, global average
  pooling for a CNN; EfficientNet-Lite: global average pool of the head conv). RsCIN only.

Position embeddings *(impl)*: at a size other than the native one the ViT's grid of position
embeddings is resized as the authors' loader does it (:func:`resize_position_embedding`:
bicubic, ``align_corners=False``, no antialiasing); open_clip 3.3's own loader antialiases,
which moves patch tokens by about 1 % at 518 px.

Activation *(impl)*: at S = 518 the authors rebuild ViT-L-14-336 from its config without
QuickGELU, so the published numbers use exact GELU with OpenAI weights; at the native 336
they keep QuickGELU. ``activation="auto"`` reproduces that; ``gelu``/``quick_gelu`` force one.

CNN backbones (EfficientNet-Lite, the offline default, and ``timm:`` CNNs): the taps are
stage outputs of increasing depth (EfficientNet-Lite: strides 4, 8, 16, 32), each resized to
the grid of ``grid_stride`` 16 (average pooling down, bilinear up) — at 448 px a 28×28 grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from musc_pipeline.core.registry import BackboneSpec

ACTIVATIONS = ("auto", "gelu", "quick_gelu")


def resolve_activation(spec: BackboneSpec, image_size: int, activation: str) -> str:
    """The activation that reproduces the authors' numbers for this size (see module doc)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if spec.family != "open_clip":
        return "gelu"
    if activation != "auto":
        return activation
    return "quick_gelu" if spec.quick_gelu and image_size == spec.native_size else "gelu"


@dataclass
class BackboneOutput:
    taps: list[torch.Tensor]  # 4 × (B×h×w×C_l)
    embedding: torch.Tensor  # B×D, L2-normalised


@dataclass
class FeatureExtractor:
    """A backbone network with its spec; call it on a B×3×S×S batch."""

    spec: BackboneSpec
    network: nn.Module  # open_clip visual tower, timm model or timm EfficientNet
    image_size: int
    activation: str
    grid: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.network.eval()
        if self.spec.family == "open_clip":
            self.grid = tuple(self.network.grid_size)  # type: ignore[assignment]
        elif self.spec.family == "timm_vit":
            self.grid = tuple(self.network.patch_embed.grid_size)  # type: ignore[assignment]
        else:
            self.grid = (self.image_size // self.spec.grid_stride,) * 2

    def to(self, device: torch.device | str) -> FeatureExtractor:
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> BackboneOutput:
        if self.spec.family == "open_clip":
            return self._open_clip(images)
        if self.spec.family == "efficientnet_lite":
            return self._efficientnet(images)
        return self._timm(images)

    def _open_clip(self, images: torch.Tensor) -> BackboneOutput:
        out = self.network.forward_intermediates(
            images, indices=list(self.spec.taps), output_fmt="NLC",
            normalize_intermediates=self.spec.tap_final_norm,
        )
        return BackboneOutput(
            [_tokens_to_map(t) for t in out["image_intermediates"]],  # B×P×C -> B×h×w×C
            F.normalize(out["image_features"].float(), dim=-1),
        )

    def _timm(self, images: torch.Tensor) -> BackboneOutput:
        """timm ViT (prefix tokens dropped by timm) or CNN (stages resized to the grid)."""
        if self.spec.family == "timm_vit":  # B×C×h×w on the patch grid
            final, maps = self.network.forward_intermediates(
                images, indices=list(self.spec.taps), norm=self.spec.tap_final_norm, output_fmt="NCHW")
        else:  # stages of strides 2..32, resized to the grid
            final, maps = self.network.forward_intermediates(images, indices=list(self.spec.taps))
            maps = [_resize_map(t, self.grid[0]) for t in maps]
        taps = [t.permute(0, 2, 3, 1) for t in maps]  # B×h×w×C
        embedding = self.network.forward_head(final, pre_logits=True)  # final: after the final norm
        return BackboneOutput(list(taps), F.normalize(embedding.float(), dim=-1))

    def _efficientnet(self, images: torch.Tensor) -> BackboneOutput:
        net = self.network
        x = net.bn1(net.conv_stem(images))
        taps = []
        for i, block in enumerate(net.blocks):
            x = block(x)
            if i in self.spec.taps:
                taps.append(x)
        embedding = net.bn2(net.conv_head(x)).mean(dim=(2, 3))  # B×1280
        taps = [_resize_map(t, self.grid[0]).permute(0, 2, 3, 1) for t in taps]  # B×h×w×C
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


def timm_options(spec: BackboneSpec, image_size: int) -> dict:
    """``timm.create_model`` arguments for the spec: pooled features, no classifier; ViTs at the size."""
    if spec.family == "efficientnet_lite":
        return {}
    return {"num_classes": 0} | ({"img_size": image_size} if spec.family == "timm_vit" else {})


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

        model = timm.create_model(spec.arch, pretrained=False, **timm_options(spec, size))
    if load_weights is not None:
        load_weights(model)
    return wrap(spec, model, size, act)


def wrap(spec: BackboneSpec, model: nn.Module, image_size: int, activation: str) -> FeatureExtractor:
    """The extractor of a built model (open_clip: its visual tower)."""
    return FeatureExtractor(spec, model.visual if spec.family == "open_clip" else model, image_size, activation)


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
