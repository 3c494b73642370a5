"""The Dagster model resource: backbones and the compute device, configurable per deployment.

All the work is :class:`~musc_pipeline.resources.model.ModelRuntime` (plain Python); this
resource is its face in Dagster: the same options as resource config (plus CPU threads),
exactly the methods the assets call, and one backbone load per process per configuration.

Every run that uses the model (each run with a ``musc_model`` pool step) sets it up first, so
its setup is where a run without a daemon recovers from runs killed before it
(:mod:`musc_pipeline.recovery`) and makes its pool-slot wait sleep and answer signals
(:mod:`musc_pipeline.slot_wait`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from dagster import ConfigurableResource, InitResourceContext

from musc_pipeline import slot_wait
from musc_pipeline.core import backbone as bb
from musc_pipeline.recovery import recover_runs
from musc_pipeline.resources.model import Embedded, ModelRuntime
from musc_pipeline.resources.weights import Identity
from musc_pipeline.settings import BackboneSettings


class ModelResource(ConfigurableResource):
    """Owns the backbones (loaded once per process per configuration) and the compute device.

    Options and their defaults: :class:`~musc_pipeline.resources.model.ModelRuntime`.
    """

    device: str = ModelRuntime.device
    batch_size: int = ModelRuntime.batch_size
    msm_precision: str = ModelRuntime.msm_precision
    msm_memory_budget_mb: int = ModelRuntime.msm_memory_budget_mb
    msm_result_budget_mb: int = ModelRuntime.msm_result_budget_mb
    threads: int = 0  # 0: torch's default

    def setup_for_execution(self, context: InitResourceContext) -> None:  # noqa: D102
        if context.instance is not None and context.run is not None:
            recover_runs(context.instance, context.run, context.log.warning)
            slot_wait.install()
        if self.threads:
            torch.set_num_threads(self.threads)

    @property
    def runtime(self) -> ModelRuntime:
        return ModelRuntime(self.device, self.batch_size, self.msm_precision, self.msm_memory_budget_mb,
                            self.msm_result_budget_mb)

    @property
    def torch_device(self) -> torch.device:
        return self.runtime.torch_device

    @property
    def msm_dtype(self) -> torch.dtype:
        return self.runtime.msm_dtype

    @property
    def msm_options(self) -> dict[str, object]:
        return self.runtime.msm_options

    @property
    def msm_choice(self):
        return self.runtime.msm_choice

    @property
    def msm_memory_budget(self) -> int:
        return self.runtime.msm_memory_budget

    def extractor(self, settings: BackboneSettings) -> tuple[bb.FeatureExtractor, Identity]:
        return self.runtime.extractor(settings)

    def embed(self, settings: BackboneSettings, images: Iterable[np.ndarray], count: int,
              progress: Callable[[int, int], None] | None = None) -> Embedded:
        return self.runtime.embed(settings, images, count, progress)
