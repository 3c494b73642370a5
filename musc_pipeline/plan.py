"""What a run would do, said before anything heavy starts: ``python -m musc_pipeline.plan``.

Per profile: the backbone (``auto`` resolved), where its weights come from — or why they are
missing and how to provide them —, the compute device, each dataset's categories with their
image counts, and an estimate of time and disk per category. Nothing is downloaded (the hub
cache is only looked into), no image is decoded and no model is built.

Estimates come from the stage timings the project records: the stored ``category_metrics``
rows of the same backbone at the same image size (this profile's first, then any profile's),
scaled to the category's N (features and maps grow with N, MSM with N², as it compares every
image with every other); without a stored row from the measured defaults in :data:`DEFAULTS`
(docs/backbones.md); else the plan says there is none.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pandas as pd
from upath import UPath

from musc_pipeline.resources import hub
from musc_pipeline.resources.datasets import categories, category_entries, root_problem
from musc_pipeline.resources.model import ModelRuntime, resolve_device
from musc_pipeline.resources.weights import WeightsUnavailableError, locate_weights, spec_for
from musc_pipeline.settings import ProfileSettings, Settings, load_settings

#: Measured per-image costs where no run stored any (2-core CPU, N = 100 / 40 images, s = 1;
#: docs/measurements.md "Stages" and "Disk per image"): (features ms, MSM ms at N_ref, N_ref, stored bytes
#: with intermediates keep, with drop).
DEFAULTS = {
    ("efficientnet_lite0", 448): (159.1, 612.3, 100, 824_233, 46_500),
    ("ViT-L-14-336", 518): (6806.2, 5197.9, 40, 11_300_000, 70_000),
}

NO_ESTIMATE = "none: no stored row for this backbone and size, no measured default; the first category run records one"


@dataclass
class Cost:
    features_ms: float  # per image
    msm_ms: float  # per image at n_ref images
    n_ref: int
    bytes_per_image: float
    source: str

    def seconds(self, n: int) -> float:
        return n * (self.features_ms + self.msm_ms * n / self.n_ref) / 1000

    def disk(self, n: int) -> float:
        return n * self.bytes_per_image


@dataclass
class ProfilePlan:
    name: str
    description: str
    backbone: str  # resolved, with its size
    weights: str  # where they come from, or why they are missing
    weights_ok: bool
    cost: Cost | None
    datasets: list[tuple[str, str, list[tuple[str, int]]]] = field(default_factory=list)  # name, note, (category, N)


def plan(settings: Settings) -> list[ProfilePlan]:
    listed = _datasets(settings)
    return [_profile_plan(settings, name, profile, listed) for name, profile in settings.profiles.items()]


def _profile_plan(settings: Settings, name: str, profile: ProfileSettings, listed) -> ProfilePlan:
    try:
        spec = spec_for(profile.backbone)
    except ValueError as exc:
        return ProfilePlan(name, profile.description, f"unusable: {exc}", "n/a", False, None, listed)
    size = profile.backbone.image_size or spec.default_size
    backbone = f"{spec.name} @ {size} px (taps {','.join(map(str, spec.taps))})"
    if profile.backbone.name == "auto":
        why = "its weights are in the hub cache" if spec.name != hub.OFFLINE_DEFAULT else (
            f"ViT-L-14-336 weights are not in the hub cache {hub.cache_dir()}")
        backbone = f"auto -> {backbone}: {why}"
    weights, ok = _weights(profile, spec.weights_package)
    cost = _stored_cost(settings, name, spec.name, size, profile.intermediates) or _default_cost(
        spec.name, size, profile.intermediates)
    return ProfilePlan(name, profile.description, backbone, weights, ok, cost, listed)


def _weights(profile: ProfileSettings, package: str | None) -> tuple[str, bool]:
    try:
        path = locate_weights(profile.backbone, download=False)
    except WeightsUnavailableError as exc:
        return f"MISSING: {exc}", False
    if path is None:
        return f"random (seed {profile.backbone.seed}): outputs are labelled random", True
    if profile.backbone.weights != "default":
        return f"file {path}", True
    rev = hub.revision(path)
    return (f"hub cache {path} (revision {rev})" if rev else f"package {package}: {path}"), True


def _datasets(settings: Settings) -> list[tuple[str, str, list[tuple[str, int]]]]:
    out = []
    for name, cfg in settings.datasets.items():
        problem = root_problem(cfg.root, cfg.layout)
        if problem:
            out.append((name, f"{cfg.root} {problem}", []))
            continue
        cats = [(c, len(category_entries(cfg.root, cfg.layout, c))) for c in categories(cfg.root, cfg.layout)]
        out.append((name, f"{cfg.root} (layout {cfg.layout})", cats))
    return out


def _stored_cost(settings: Settings, profile: str, backbone: str, size: int, intermediates: str) -> Cost | None:
    rows = []
    for path in UPath(settings.storage).glob("*/category_metrics/*/*.parquet"):
        df = pd.read_parquet(str(path))
        df["from_profile"] = path.parts[-4]
        rows.append(df)
    if not rows:
        return None
    df = pd.concat(rows, ignore_index=True)
    df = df[(df["backbone"] == backbone) & (df["image_size"] == size)]
    if "intermediates" in df:  # what is stored depends on it
        df = df[df["intermediates"] == intermediates]
    if df.empty:
        return None
    own = df[df["from_profile"] == profile]
    df = own if not own.empty else df
    stored = df.filter(like="stored_").filter(like="_bytes_per_image").sum(axis=1)
    features = df["features_ms_per_image"] + df["maps_ms_per_image"]
    return Cost(float(features.median()), float((df["msm_ms_per_image"] / df["n_images"]).median()), 1,
                float(stored.median()), f"{len(df)} stored category_metrics row(s) of "
                f"{'this profile' if not own.empty else 'profile ' + ', '.join(sorted(set(df['from_profile'])))}")


def _default_cost(backbone: str, size: int, intermediates: str) -> Cost | None:
    if (backbone, size) not in DEFAULTS:
        return None
    features, msm, n_ref, keep, drop = DEFAULTS[(backbone, size)]
    return Cost(features, msm, n_ref, keep if intermediates == "keep" else drop,
                "measured default, 2-core CPU (docs/backbones.md)")


def render(plans: list[ProfilePlan], settings: Settings, device: str) -> str:
    lines = [f"storage {settings.storage}; device {device} (ModelResource device {ModelRuntime.device!r})"]
    for p in plans:
        source = p.cost.source if p.cost else NO_ESTIMATE
        lines += ["", f"profile {p.name}" + (f" - {p.description}" if p.description else ""),
                  f"  backbone  {p.backbone}", f"  weights   {p.weights}", f"  estimate  {source}"]
        for name, note, cats in p.datasets:
            lines.append(f"  dataset {name}: {note}: {len(cats)} categories, {sum(n for _, n in cats)} images")
            for cat, n in cats:
                est = f"{_duration(p.cost.seconds(n))}, {_size(p.cost.disk(n))}" if p.cost else "no estimate"
                lines.append(f"    {cat:<28} {n:>6} images  {est}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def main() -> int:
    settings = load_settings()
    plans = plan(settings)
    print(render(plans, settings, str(resolve_device(ModelRuntime.device))))
    return 0 if all(p.weights_ok for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
