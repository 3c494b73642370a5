"""The compute device and embedding, in plain Python (no Dagster).

:class:`ModelRuntime` is what the Dagster resource
:class:`~musc_pipeline.resources.backbone.ModelResource` runs; benchmarks and notebooks use
it directly, so they time the very code the assets run and need no Dagster installed. Which
weights a backbone gets, and the identity recorded with its features, is
:mod:`musc_pipeline.resources.weights`.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from musc_pipeline.core import backbone as bb
from musc_pipeline.core import lnamd, msm, msm_lowp
from musc_pipeline.core.preprocess import image_tensor
from musc_pipeline.resources.weights import Identity, load_extractor
from musc_pipeline.settings import BackboneSettings

CPU_BATCH = 16
MSM_PRECISIONS = ("exact_fp32", "lowp_rerank", "auto", "float32", "float16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The backbone's precision: ``auto`` is the authors' float16 autocast on CUDA, else float32."""
    if precision not in ("auto", "float32", "float16_autocast"):
        raise ValueError(f"backbone precision must be auto, float32 or float16_autocast, got {precision!r}")
    return "float16_autocast" if device.type == "cuda" and precision != "float32" else "float32"


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
    the *where/how*: device (auto|cpu|cuda|mps), precision of MSM similarities, batch size,
    and MSM memory budgets. ``msm_precision`` (:data:`MSM_PRECISIONS`): ``exact_fp32`` (float32
    products; ``float32`` is its older name), ``lowp_rerank`` (bfloat16/float16 products find
    candidates, float32 re-ranks them: the same scores, :mod:`musc_pipeline.core.msm_lowp`),
    ``auto`` (lowp_rerank where the measured low-precision matmul is fast enough to pay for
    the re-rank), or ``float16`` (float16 similarities on GPU: not exact, faster there).
    """

    device: str = "auto"
    batch_size: int = 0  # 0: auto (CPU: 16; CUDA: from free memory and a 1-image probe)
    msm_precision: str = "exact_fp32"
    msm_memory_budget_mb: int = 0  # 0: auto (CPU: MSM's measured-best 32 MB; GPU: a quarter of free memory)
    msm_result_budget_mb: int = 2048  # above it MSM scores in row chunks: memory flat in N, 2× products

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def msm_dtype(self) -> torch.dtype:
        if self.msm_precision not in MSM_PRECISIONS:
            raise ValueError(f"msm_precision must be one of {', '.join(MSM_PRECISIONS)}, got {self.msm_precision!r} "
                             "(bfloat16 similarities lose rank order; lowp_rerank uses them only to find candidates)")
        if self.msm_precision == "float16" and self.torch_device.type != "cpu":
            return torch.float16  # half matmul on CPU is slow and no more memory-efficient here
        return torch.float32

    @property
    def msm_choice(self) -> msm_lowp.PrecisionChoice:
        """The MSM precision this runtime uses; ``auto`` measures the matmul peaks (once per
        process and device) and picks by them (:func:`msm_lowp.choose_precision`)."""
        dtype = str(self.msm_dtype).removeprefix("torch.")  # validates the setting
        device = self.torch_device
        if self.msm_precision == "auto":
            strategy = msm.resolve_strategy("auto", device)
            return msm_lowp.choose_precision(msm_lowp.measured_peaks(str(device)), len(lnamd.DEGREES), strategy,
                                             device.type)
        if self.msm_precision == "lowp_rerank":
            lowp = torch.float16 if device.type == "cuda" else torch.bfloat16  # CPUs: float16 matmul is slow
            return msm_lowp.PrecisionChoice("lowp_rerank", lowp, {}, "set in the configuration")
        return msm_lowp.PrecisionChoice("exact_fp32", None, {}, f"set in the configuration ({dtype} products)")

    @property
    def msm_options(self) -> dict[str, object]:
        """The keyword options of :func:`msm.score_stages` for the MSM precision (and dtype)."""
        choice = self.msm_choice
        return {"dtype": self.msm_dtype, "precision": choice.precision,
                **({"lowp_dtype": choice.lowp_dtype} if choice.lowp_dtype is not None else {})}

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
        return msm.DEFAULT_MEMORY_BUDGET

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
