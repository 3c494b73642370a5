"""A Hugging Face hub cache written by hand, as open_clip and timm would have downloaded it.

``huggingface_hub`` keeps a downloaded file as ``<cache>/models--<org>--<name>/blobs/<sha256>``,
with ``snapshots/<commit>/<filename>`` a relative link to the blob and ``refs/main`` holding
the commit (the blob's name is the file's SHA-256, as for LFS files). :func:`write_file`
writes exactly that; the repositories and file names come from
the libraries' own pretrained configs (``musc_pipeline.resources.hub.hub_files``), so a test
fails if either library stops finding what a download would have left there.

The weights are seeded random values in float16 (the dtype of the published open_clip
checkpoints; timm casts on load), every tensor of the model's state dict at its pretrained
configuration (open_clip: the architecture's native size, timm: the tag's), shapes read from
a model built on the ``meta`` device (:func:`seeded_state`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from musc_pipeline.core import registry
from musc_pipeline.resources import hub

#: Registry backbones written in the fallback (.bin) format, so both libraries' second choice is exercised.
AS_BIN = {"ViT-B-16-plus-240", "dino_vitb8"}
_POOL = 1 << 24  # random values drawn per file


def revision_of(repo: str) -> str:
    """A fixed 40-hex commit per repository."""
    return hashlib.sha1(repo.encode()).hexdigest()


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def seeded_state(spec: registry.BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float16 tensors with the names and shapes of the spec's pretrained checkpoint.

    Each tensor is a window of one seeded pool of N(0, 1) values (drawing 0.4 G values anew per
    ViT-L file took 3–7 s here), scaled to N(0, 0.02²); norm scales (1-D ``weight``) are 1 + that, batch-norm variances 1 + |that|.
    """
    if spec.family == "open_clip":
        import open_clip

        shapes = open_clip.create_model(spec.arch, device="meta").state_dict()
    else:
        import timm

        shapes = timm.create_model(spec.arch, pretrained=False, device="meta").state_dict()
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=g).mul_(0.02).half()
    state, offset = {}, 0
    for name, t in shapes.items():
        n = t.numel()
        if not t.is_floating_point():
            state[name] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        if n > _POOL:
            x = torch.empty(t.shape, dtype=torch.float16).normal_(0.0, 0.02, generator=g)
        else:
            offset = (offset + 7919) % (_POOL - n + 1)
            x = pool[offset:offset + n].reshape(t.shape).clone()
        if name.endswith("running_var"):  # batch-norm variances must be positive
            x = x.abs() + 1
        state[name] = x + 1 if t.ndim == 1 and name.endswith("weight") else x
    return state


def write_file(cache: Path, repo: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as ``filename`` of ``repo`` (safetensors or a torch pickle by suffix)."""
    folder = repo_folder(cache, repo)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    part = folder / "blobs" / f"{filename}.incomplete"
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(part))
    else:
        torch.save(state, part)
    h = hashlib.sha256()
    with open(part, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    blob = folder / "blobs" / h.hexdigest()
    part.rename(blob)
    return link_file(cache, repo, filename, blob)


def link_file(cache: Path, repo: str, filename: str, blob: Path) -> Path:
    """Make ``filename`` of ``repo`` at its fixed revision point at ``blob`` (refs/main set)."""
    folder = repo_folder(cache, repo)
    rev = revision_of(repo)
    snapshot = folder / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    target = snapshot / filename
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(os.path.relpath(blob, snapshot))
    return target


def write_registry(cache: Path) -> dict[str, Path]:
    """Every registry backbone with hub weights: name -> the snapshot file written."""
    files = {}
    for name, spec in registry.BACKBONES.items():
        if spec.weights_package:
            continue
        where = hub.hub_files(spec)
        filename = where.filenames[-1] if name in AS_BIN else where.filenames[0]
        files[name] = write_file(cache, where.repo, filename, seeded_state(spec))
    return files


def point_hub_at(cache: Path, monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 and the hub cache at ``cache`` (its parent as HF_HOME), for this process:
    the environment for subprocesses, ``huggingface_hub.constants`` for this one (read at import)."""
    from huggingface_hub import constants

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
