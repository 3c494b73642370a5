"""Where a backbone's weights are on the Hugging Face hub, and finding them in the local cache.

The repository and the file names come from the library's own pretrained config, in the
order the library itself tries them:

- open_clip (``open_clip.pretrained.download_pretrained``): the tag's ``hf_hub`` entry is
  ``org/repo/`` (or ``org/repo/<file>``); for the default ``open_clip_pytorch_model.bin`` it
  tries ``open_clip_model.safetensors`` first;
- timm (``timm.models._hub.load_state_dict_from_hf``): the model's ``hf_hub_id`` (default file
  ``pytorch_model.bin``, or ``hf_hub_filename``), trying ``model.safetensors`` first.

The cache layout both read (``huggingface_hub``) is ``$HF_HOME/hub/models--<org>--<name>/``
with ``refs/main`` holding the commit and ``snapshots/<commit>/<file>`` the file; with
``HF_HUB_OFFLINE=1`` nothing else is consulted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from musc_pipeline.core import registry

OFFLINE_DEFAULT = "efficientnet_lite0"
_OPEN_CLIP_BIN, _OPEN_CLIP_SAFE = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"
_TIMM_BIN, _TIMM_SAFE = "pytorch_model.bin", "model.safetensors"


class WeightsUnavailableError(RuntimeError):
    """No weights could be found for the requested backbone."""


@dataclass(frozen=True)
class HubFiles:
    repo: str  # org/name
    filenames: tuple[str, ...]  # in the order the library tries them

    def describe(self) -> str:
        return f"{self.repo} ({' or '.join(self.filenames)})"


def _safe_first(filename: str, default_bin: str, default_safe: str, suffixes: tuple[str, ...]) -> tuple[str, ...]:
    if filename == default_bin:
        return default_safe, filename
    if filename.endswith(suffixes):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def hub_files(spec: registry.BackboneSpec) -> HubFiles:
    """The hub repository and candidate files of a hub backbone; raises if it has none."""
    if spec.family == "open_clip":
        from open_clip.pretrained import get_pretrained_cfg

        entry = (get_pretrained_cfg(spec.arch, spec.pretrained) or {}).get("hf_hub", "")
        if not entry:
            _no_hub(spec)
        repo, filename = os.path.split(entry)  # as open_clip splits it: "org/repo/" -> no file named
        return HubFiles(repo, _safe_first(filename or _OPEN_CLIP_BIN, _OPEN_CLIP_BIN, _OPEN_CLIP_SAFE, (".bin", ".pth")))
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch)
    if cfg is None or not cfg.hf_hub_id:
        _no_hub(spec)
    return HubFiles(cfg.hf_hub_id, _safe_first(cfg.hf_hub_filename or _TIMM_BIN, _TIMM_BIN, _TIMM_SAFE, (".bin",)))


def _no_hub(spec: registry.BackboneSpec) -> None:
    raise WeightsUnavailableError(
        f"backbone {spec.name!r} ({spec.arch}, {spec.pretrained}) has no Hugging Face hub weights in "
        f"its library's pretrained config: set backbone.weights to a checkpoint file")


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_file(files: HubFiles) -> str | None:
    """The first candidate present in the local cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in files.filenames:
        path = try_to_load_from_cache(files.repo, filename)
        if isinstance(path, str):
            return path
    return None


def fetch_file(spec: registry.BackboneSpec, files: HubFiles) -> str:
    """The cached file, downloading it when online; raises WeightsUnavailableError."""
    from huggingface_hub import hf_hub_download

    last: object = "no candidate file"
    for filename in files.filenames:
        try:
            return hf_hub_download(files.repo, filename)
        except Exception as exc:  # network, auth, missing cache entry: all mean "not available"
            last = exc
    raise WeightsUnavailableError(missing_message(spec, files, last))


def revision(path: str) -> str | None:
    """The commit of a file in the hub cache (``snapshots/<commit>/<file>``), else None."""
    p = Path(path)
    return p.parent.name if p.parent.parent.name == "snapshots" else None


def missing_message(spec: registry.BackboneSpec, files: HubFiles, exc: object) -> str:
    return (
        f"weights for backbone {spec.name!r} ({spec.arch}, {spec.pretrained}) are not available: "
        f"looked for {files.describe()} in the Hugging Face cache {cache_dir()} and could not "
        f"download it ({exc}). Provide them by running once with internet access (they are cached), "
        f"by copying that cache folder to this machine (HF_HOME), or by setting backbone.weights "
        f"to a local checkpoint file. For an offline run use backbone {OFFLINE_DEFAULT!r}, whose "
        f"weights ship in a Python package."
    )


def paper_weights_cached() -> bool:
    """Whether ViT-L-14-336/openai weights are in the local hub cache (no network access)."""
    return cached_file(hub_files(registry.get_spec(registry.PAPER_BACKBONE))) is not None


def resolve_name(name: str) -> str:
    """``auto``: the paper's backbone if its weights are cached, else the offline default."""
    if name == "auto":
        return registry.PAPER_BACKBONE if paper_weights_cached() else OFFLINE_DEFAULT
    return name
