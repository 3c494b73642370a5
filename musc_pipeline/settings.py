"""Project settings: datasets, profiles (backbone + method), storage. Read from ``musc.yaml``.

The file named by ``$MUSC_CONFIG`` (default: ``musc.yaml`` in the working directory, else the
packaged defaults) is read when the Dagster code location loads. Dataset roots can also be
set with environment variables (``MUSC_MVTEC_AD_ROOT``, ``MUSC_VISA_ROOT``,
``MUSC_BTAD_ROOT``), so enabling a dataset needs no file edit.

Paths: a relative path in the file is relative to the file's folder; ``repo:<path>`` is
relative to the musc-pipeline checkout (``repo:data/demo`` = the shipped demo images), so a
copy of ``musc.yaml`` placed anywhere still finds them; ``~`` is expanded. Roots from the
environment variables are relative to the working directory, like any shell path.

A *profile* is one way of running MuSc (backbone + method settings). Each profile is its own
asset group with its own code versions: changing a profile's backbone marks that profile's
features and everything downstream stale; changing only its RsCIN windows marks only the
RsCIN scores and metrics stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_ROOT = REPO_ROOT / "data" / "demo"
REPO_PREFIX = "repo:"  # a path relative to the musc-pipeline checkout, wherever the config lives
Layout = Literal["mvtec", "visa", "btad", "mvtec_3d", "mvtec_loco"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSettings(_Strict):
    root: str
    layout: Layout = "mvtec"


class BackboneSettings(_Strict):
    # --- backbone naming (core.registry): a registry name, "auto" (the paper's if its weights
    # are present), timm:<model> or open_clip:<arch>/<pretrained tag>; taps: feature_info (timm)
    # or block (open_clip) indices of a timm:/open_clip: backbone, None: its default taps
    name: str = "auto"
    taps: tuple[int, ...] | None = None
    weights: str = "default"  # default (hub / package) | random | path to a checkpoint file
    image_size: int | None = None  # None: the backbone's default (518 for ViT-L-14-336)
    activation: str = "auto"
    seed: int = 0
    # auto: the authors' float16 autocast of the backbone on CUDA, float32 elsewhere (recorded per run)
    precision: Literal["auto", "float32", "float16_autocast"] = "auto"

    @field_validator("name")
    @classmethod
    def _name_form(cls, value: str) -> str:
        prefix, sep, rest = value.partition(":")
        if sep and (prefix not in ("timm", "open_clip") or not rest
                    or (prefix == "open_clip" and not re.fullmatch(r"[^/]+/[^/]+", rest))):
            raise ValueError(f"backbone name {value!r}: write a registry name, timm:<model> or "
                             f"open_clip:<arch>/<pretrained tag>")
        return value

    @model_serializer(mode="wrap")
    def _without_default_taps(self, handler):
        """Default taps are left out, so the settings hash (code versions) of a profile that
        names no taps is what it was before taps could be named."""
        data = handler(self)
        if isinstance(data, dict) and data.get("taps") is None:
            data.pop("taps", None)
        return data
    # --- end backbone naming


class MethodSettings(_Strict):
    degrees: tuple[int, ...] = (1, 3, 5)
    interval: tuple[float, float] = (0.0, 0.3)
    rscin_windows: tuple[int, ...] | None = None  # None: per dataset (MVTec {1,2,3}, VisA {1,8,9})
    rscin_precision: Literal["float32", "float64"] = "float32"  # float32: the authors' arithmetic
    subsets: int = 1
    subset_dealing: Literal["authors", "balanced"] = "authors"  # see core.subsets
    subset_seed: int = 42  # the authors' seed
    mask_rule: Literal["auto", "nearest", "authors_mvtec", "authors_visa"] = "auto"  # auto: by layout
    smoothing_sigma: float = 0.0
    mode: Literal["zero_shot", "few_shot", "musc_plus"] = "zero_shot"
    references: str | None = None  # folder of normal reference images (few_shot, musc_plus)
    # Method variants (defaults: the paper). MuSc-V2's 2-D changes and image-score choices:
    aggregation: Literal["lnamd", "snamd"] = "lnamd"  # snamd: similarity-weighted pooling (core/snamd.py)
    rescoring: Literal["rscin", "rscon", "none"] = "rscin"  # rscon: anomaly-salient features (core/rscon.py)
    rscon_windows: tuple[int, ...] = (1, 7)
    image_score: Literal["max", "topk_mean"] = "max"  # topk_mean: mean of the top q of the map
    image_score_q: float = Field(0.01, gt=0.0, le=1.0)

    def variant(self, *names: str) -> list[str]:
        """``name=value`` for each named variant choice that differs from the paper.

        Code versions hash these, so a variant re-runs exactly the stages it changes while the
        paper settings keep the versions (and stored results) they had before variants existed.
        Parameters of a choice (``image_score_q``, ``rscon_windows``) count only with it.
        """
        paper = MethodSettings()
        active = {"image_score_q": self.image_score == "topk_mean", "rscon_windows": self.rescoring == "rscon"}
        return [f"{k}={getattr(self, k)}" for k in names
                if active.get(k, True) and getattr(self, k) != getattr(paper, k)]


#: The method-variant choices (``MethodSettings.variant``); all at their defaults = the paper.
VARIANT_CHOICES = ("aggregation", "rescoring", "rscon_windows", "image_score", "image_score_q")


class ProfileSettings(_Strict):
    backbone: BackboneSettings = BackboneSettings()
    method: MethodSettings = MethodSettings()
    description: str = ""
    # keep: store every stage's result | drop: drop the LNAMD inputs Y_l (most of the bytes) once a
    # category is scored; whatever needs them later (a re-run, a study) re-embeds the images
    intermediates: Literal["keep", "drop"] = "keep"


class StudySettings(_Strict):
    """Ablation studies (``musc_pipeline.assets.studies``)."""

    extra_degrees: tuple[int, ...] = (7, 9)  # Tab. 9: LNAMD/MSM run for these degrees only
    # Tab. 11: other methods' image scores, name -> Parquet file with (path, score) columns
    imported_scores: dict[str, str] = Field(default_factory=dict)
    # Tab. 8, Tab. 13: the profiles compared side by side (one column per backbone × image size); () = every profile
    backbone_profiles: tuple[str, ...] = ()

    @field_validator("extra_degrees")
    @classmethod
    def _odd_degrees(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 or r % 2 == 0 for r in value):
            raise ValueError(f"studies.extra_degrees = {list(value)} is not allowed: odd integers >= 1 (LNAMD degrees r)")
        return value


class IntervalSettings(_Strict):
    """Uncertainty of the metrics (``docs/intervals.md``): DeLong for image AUROC, the
    stratified bootstrap over images for the other six; paired tests for comparisons."""

    resamples: int = Field(200, ge=20)  # B: bootstrap resamples of the images
    seed: int = 0  # of the resamples (the same seed, the same intervals)
    level: float = Field(0.95, gt=0.5, lt=1.0)  # coverage of every interval
    bins: int = Field(2048, ge=16)  # pixel AP / F1-max replicates: bins of the defect pixels' values
    # regression_vs_previous warns when Δ's interval excludes 0 and |Δ| is at least this
    min_effect: float = Field(0.01, ge=0.0)
    history_runs: int = Field(3, ge=1)  # per-image scores and grid maps kept per category (newest runs)


class Settings(_Strict):
    storage: str = ".musc"  # base location: a path or an fsspec URL (s3://…)
    reports_dir: str = "reports"
    datasets: dict[str, DatasetSettings] = Field(
        default_factory=lambda: {"demo": DatasetSettings(root=str(DEMO_ROOT))}
    )
    profiles: dict[str, ProfileSettings] = Field(default_factory=lambda: {"musc": ProfileSettings()})
    studies: StudySettings = StudySettings()
    intervals: IntervalSettings = IntervalSettings()

    @field_validator("datasets", "profiles")
    @classmethod
    def _names(cls, value: dict) -> dict:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must be letters, digits, '_', '-', '.' (no paths)")
        return value

    @model_validator(mode="after")
    def _backbone_profiles(self) -> Settings:
        unknown = [p for p in self.studies.backbone_profiles if p not in self.profiles]
        if unknown:
            raise ValueError(f"studies.backbone_profiles names {unknown}, which are not profiles "
                             f"(profiles: {sorted(self.profiles)})")
        return self


def fingerprint(*parts: BaseModel | str | int | None) -> str:
    """A short stable hash of settings: the code version of the assets they feed."""
    payload = json.dumps(
        [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


ENV_ROOTS = {"mvtec_ad": ("MUSC_MVTEC_AD_ROOT", "mvtec"), "visa": ("MUSC_VISA_ROOT", "visa"),
             "btad": ("MUSC_BTAD_ROOT", "btad")}


def resolve_path(value: str, base: Path) -> str:
    """A configured path made absolute: URLs unchanged, ``repo:`` against the checkout, other
    relative paths against ``base``."""
    if "://" in value:
        return value
    if value.startswith(REPO_PREFIX):
        return str((REPO_ROOT / value[len(REPO_PREFIX):]).resolve())
    return str((base / Path(value).expanduser()).resolve())


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    path = Path(path or os.environ.get("MUSC_CONFIG", "musc.yaml"))
    raw: dict = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
    elif "MUSC_CONFIG" in os.environ:
        raise FileNotFoundError(f"MUSC_CONFIG points to {path}, which does not exist")
    base = path.resolve().parent if path.exists() else Path.cwd()
    datasets = dict(raw.get("datasets") or {"demo": {"root": str(DEMO_ROOT)}})
    for name, cfg in datasets.items():
        if isinstance(cfg, dict) and isinstance(cfg.get("root"), str):
            datasets[name] = {**cfg, "root": resolve_path(cfg["root"], base)}
    for name, (var, layout) in ENV_ROOTS.items():
        if os.environ.get(var):
            datasets[name] = {"root": resolve_path(os.environ[var], Path.cwd()), "layout": layout}
    raw["datasets"] = datasets
    studies = raw.get("studies") or {}
    if isinstance(studies.get("imported_scores"), dict):
        raw["studies"] = {**studies, "imported_scores": {
            k: resolve_path(v, base) for k, v in studies["imported_scores"].items()}}
    if os.environ.get("MUSC_STORAGE"):
        raw["storage"] = os.environ["MUSC_STORAGE"]
    settings = Settings.model_validate(raw)
    return settings.model_copy(update={
        "storage": resolve_path(settings.storage, base),
        "reports_dir": resolve_path(settings.reports_dir, base),
    })
