"""Dev evaluation of the method variants on every category of a folder dataset (default: PIPED).

For each backbone profile of ``musc.yaml`` (default: ``musc`` and ``random_vit``) and each
category, it runs what the Dagster assets run — ``ModelRuntime.embed``, ``layer_norm_map``,
MSM with each aggregation (``lnamd``: :func:`msm.score_stages`; ``snamd``:
:func:`snamd.score_stages`), maps, re-scoring — and scores every combination of

    aggregation ∈ {lnamd, snamd} × rescoring ∈ {rscin, rscon, none} × image_score ∈ {max, topk_mean}

Work is shared as the asset graph shares it: features once per backbone, MSM once per
aggregation, pixel metrics once per aggregation (maps do not depend on re-scoring or the image
score); re-scoring and image-score variants reuse the stored MSM scores. MSM scores, class
tokens and RsCon's salient features are cached per category under ``--cache`` (a re-run only
computes what is missing), so adding a re-scoring or image-score variant costs seconds.

Run:  .venv/bin/python benchmarks/evaluate.py                     (all 12 PIPED types, ~1 h on 2 cores)
      make evaluate                                                (the same, niced)
      .venv/bin/python benchmarks/evaluate.py --categories PA_BDP01_TL --profiles musc

Writes ``<out>/variants.csv`` (one row per profile, category and variant) and
``<out>/variants.md`` (means over categories per variant, per-category tables of the paper
variant, each single change and the best combination, time per image of each variant).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from musc_pipeline.core import lnamd, maps, metrics, msm, rscin, rscon, snamd, subsets  # noqa: E402
from musc_pipeline.core.preprocess import mask_array, resolve_mask_rule  # noqa: E402
from musc_pipeline.resources.datasets import categories, read_image, read_mask, scan_category  # noqa: E402
from musc_pipeline.resources.model import ModelRuntime  # noqa: E402
from musc_pipeline.resources.weights import resolve_name  # noqa: E402
from musc_pipeline.settings import fingerprint, load_settings  # noqa: E402

AGGREGATIONS = ("lnamd", "snamd")
RESCORINGS = ("rscin", "rscon", "none")
IMAGE_SCORES = maps.IMAGE_SCORES
PAPER = ("lnamd", "rscin", "max")
CACHE_REVISION = 2
METRICS = metrics.IMAGE_METRICS + metrics.PIXEL_METRICS


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def category_stages(model: ModelRuntime, profile, root: str, category: str, cache: Path) -> dict:
    """Features and MSM of both aggregations for one category, from the cache when present."""
    method = profile.method
    key = fingerprint(CACHE_REVISION, profile.backbone, resolve_name(profile.backbone.name),
                      json.dumps([method.degrees, method.interval, method.subsets, method.subset_seed,
                                  method.subset_dealing, method.mask_rule]))
    path = cache / key / f"{category}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    manifest = scan_category(root, "mvtec", category)
    emb = model.embed(profile.backbone, (read_image(p) for p in manifest["path"]), len(manifest))
    ys, t_ln = _timed(lambda: [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps])
    groups = subsets.divide(list(manifest["defect_type"].astype(str)), method.subsets, method.subset_seed,
                            method.subset_dealing)
    out = {"labels": torch.tensor(manifest["label"].to_numpy(int)), "class_tokens": torch.from_numpy(emb.class_tokens),
           "image_size": torch.tensor(emb.identity.image_size), "grid": torch.tensor(ys[0].shape[1:3]),
           "seconds_features": torch.tensor(emb.measured.seconds + t_ln)}
    for agg in AGGREGATIONS:
        score = snamd.score_stages if agg == "snamd" else msm.score_stages
        scores, t = _timed(lambda: score(ys, groups, method.degrees, method.interval))
        salient, t_sal = _timed(lambda: rscon.salient_features(
            ys[rscon.SALIENT_STAGE], maps.patch_scores(scores), method.degrees, agg))
        out |= {f"scores_{agg}": scores, f"salient_{agg}": salient, f"seconds_msm_{agg}": torch.tensor(t),
                f"seconds_salient_{agg}": torch.tensor(t_sal)}
    rule = resolve_mask_rule(method.mask_rule, "mvtec")
    gt = np.zeros((len(manifest), emb.identity.image_size, emb.identity.image_size), dtype=bool)
    for i, row in enumerate(manifest.itertuples()):
        if isinstance(row.mask_path, str):
            gt[i] = mask_array(read_mask(row.mask_path, (row.width, row.height)), emb.identity.image_size, rule)
    out["gt"] = torch.from_numpy(gt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def evaluate_category(data: dict, method, windows: tuple[int, ...], q: float) -> list[dict]:
    """Every variant's metrics and time per image for one category's cached stages."""
    n = len(data["labels"])
    labels = data["labels"].numpy()
    rows = []
    for agg in AGGREGATIONS:
        amaps, t_maps = _timed(lambda: maps.anomaly_maps(maps.patch_scores(data[f"scores_{agg}"]),
                                                         tuple(data["grid"].tolist()), int(data["image_size"])))
        pixel = metrics.pixel_metrics(data["gt"].numpy(), amaps.numpy()).values
        for image_score in IMAGE_SCORES:
            c, t_img = _timed(lambda: maps.image_scores(amaps, image_score, q))
            for resc in RESCORINGS:
                if resc == "rscin":
                    final, t_re = _timed(lambda: rscin.rescore(c, data["class_tokens"], windows,
                                                                      method.rscin_precision))
                elif resc == "rscon":
                    final, t_re = _timed(lambda: rscon.rescore(c, data[f"salient_{agg}"], method.rscon_windows))
                    t_re += float(data[f"seconds_salient_{agg}"])
                else:
                    final, t_re = c.double(), 0.0
                seconds = (float(data["seconds_features"]) + float(data[f"seconds_msm_{agg}"])
                           + t_maps + t_img + t_re)
                rows.append({"aggregation": agg, "rescoring": resc, "image_score": image_score,
                             **metrics.image_metrics(labels, final.numpy()).values, **pixel,
                             "ms_per_image": 1000 * seconds / n,
                             "msm_ms_per_image": 1000 * float(data[f"seconds_msm_{agg}"]) / n})
    return rows


def variant_name(agg: str, resc: str, image_score: str) -> str:
    return f"{agg}+{resc}+{image_score}"


def markdown(df: pd.DataFrame) -> str:
    """Means per variant, and per-category tables of the paper, single changes and the best."""
    df = df.assign(variant=[variant_name(*v) for v in df[["aggregation", "rescoring", "image_score"]].itertuples(index=False)])
    paper = variant_name(*PAPER)
    lines = []
    for profile, part in df.groupby("profile", sort=False):
        backbone = part["backbone"].iloc[0]
        means = part.groupby("variant")[[*METRICS, "ms_per_image"]].mean()
        means["mean_image"] = means[list(metrics.IMAGE_METRICS)].mean(axis=1)
        means = means.sort_values("mean_image", ascending=False)
        best = means.index[0]
        lines += [f"## {profile} ({backbone}), {part['category'].nunique()} categories", "",
                  "Mean over categories (×100); Δ image AUROC against the paper variant; time per image "
                  "(features + MSM + maps + re-scoring, ms).", "",
                  "| variant | img AUROC | Δ | img F1-max | img AP | px AUROC | px PRO | ms/image |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, r in means.iterrows():
            mark = " (paper)" if v == paper else (" (best)" if v == best else "")
            lines.append(f"| {v}{mark} | {100 * r.image_auroc:.1f} | {100 * (r.image_auroc - means.loc[paper, 'image_auroc']):+.1f} | "
                         f"{100 * r.image_f1_max:.1f} | {100 * r.image_ap:.1f} | {100 * r.pixel_auroc:.1f} | "
                         f"{100 * r.pixel_pro:.1f} | {r.ms_per_image:.0f} |")
        singles = [variant_name("snamd", "rscin", "max"), variant_name("lnamd", "rscon", "max"),
                   variant_name("lnamd", "none", "max"), variant_name("lnamd", "rscin", "topk_mean")]
        shown = list(dict.fromkeys([paper, *singles, best]))
        lines += ["", "Per category: image AUROC / F1-max / AP, pixel AUROC / PRO (×100)", "",
                  "| category | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for cat, cpart in part.groupby("category"):
            cells = []
            for v in shown:
                r = cpart[cpart["variant"] == v].iloc[0]
                cells.append(" / ".join(f"{100 * r[k]:.1f}" for k in
                                        ("image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_pro")))
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "piped"),
                    help="folder dataset in the MVTec layout (default: PIPED beside the checkout)")
    ap.add_argument("--categories", nargs="*", help="default: every category under --root")
    ap.add_argument("--profiles", nargs="*", default=["musc", "random_vit"], help="profiles of musc.yaml (backbones)")
    ap.add_argument("--config", default=str(REPO / "musc.yaml"))
    ap.add_argument("--cache", default=str(REPO / ".musc" / "evaluate"), help="cached features/MSM per category")
    ap.add_argument("--out", default=str(REPO / ".musc" / "evaluate"), help="where variants.csv/.md go")
    ap.add_argument("--topk-q", type=float, default=0.01, help="q of image_score topk_mean")
    args = ap.parse_args(argv)
    settings = load_settings(args.config)
    model = ModelRuntime(device="cpu")
    cats = args.categories or categories(args.root, "mvtec")
    cache, out = Path(args.cache), Path(args.out)
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in args.profiles:
        profile = settings.profiles[name]
        windows = profile.method.rscin_windows or rscin.windows_for("piped")
        for cat in cats:
            start = time.perf_counter()
            data = category_stages(model, profile, args.root, cat, cache)
            for r in evaluate_category(data, profile.method, windows, args.topk_q):
                rows.append({"profile": name, "backbone": resolve_name(profile.backbone.name), "category": cat, **r})
            print(f"{name} {cat}: {time.perf_counter() - start:.0f} s", flush=True)
            df = pd.DataFrame(rows)  # written after every category: an interrupted run leaves its results
            df.to_csv(out / "variants.csv", index=False)
            (out / "variants.md").write_text(markdown(df))
    print(markdown(df))


if __name__ == "__main__":
    main()
