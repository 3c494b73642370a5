"""lowp_rerank on real features: the parity fixture's images through its network.

Run:  .venv/bin/python benchmarks/msm_candidates.py            (vitb16_224_n24: N = 24, ViT-B-16 @224)
      .venv/bin/python benchmarks/msm_candidates.py --images 12 --backbone efficientnet_lite0

Features: the images of ``../shared/parity/vitb16_224_n24.npz`` (demo category PA_BDP01_TL)
through the fixtures' network (ViT-B-16, seeded random weights rounded through float16;
``tests/parity.py``), the four stage taps, layer-normed: what ``msm_scores`` scores in the
parity test; or, ``--backbone``, through a backbone with trained offline weights. Per stage it prints:

- max |Δ score| of ``precision="lowp_rerank"`` (bfloat16 and float16 products) against
  ``exact_fp32`` (the default, box_filter), all degrees, and the candidates per maximum;
  beside it exact_fp32's own per_degree strategy against box_filter (float32 rounding alone);
- for the box-filter identity (one product of Y for all degrees, not what lowp_rerank runs):
  the window norm ratios ρ_r (:func:`msm_lowp.window_norm_ratios`, median and 99th
  percentile) and how many patches lie within the window that identity's bound e·ρ_r(m)·ρ_r(n)
  would leave, against per-degree products' e (counted on the float32 similarities: the
  patches n with s(m, n) ≥ max s − 2·bound, the window of a candidate test with ŝ = s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def features(n_images: int, backbone: str):
    import numpy as np
    import torch

    import parity
    from musc_pipeline.core import lnamd
    from musc_pipeline.resources.datasets import read_image
    from musc_pipeline.resources.model import ModelRuntime
    from musc_pipeline.settings import BackboneSettings

    fixture = np.load(parity.PARITY_DIR / "vitb16_224_n24.npz")
    paths = [parity.DEMO_CATEGORY / str(p) for p in fixture["images"][:n_images]]
    with tempfile.TemporaryDirectory() as tmp:
        if backbone == "parity":
            weights = parity.fixture_weights("ViT-B-16", Path(tmp))
            settings = BackboneSettings(name="ViT-B-16", weights=str(weights), image_size=224)
        else:  # a backbone with its own (offline) weights, e.g. the ImageNet efficientnet_lite0
            settings = BackboneSettings(name=backbone)
        emb = ModelRuntime(device="cpu").embed(settings, (read_image(p) for p in paths), len(paths))
    return [lnamd.layer_norm_map(torch.from_numpy(t).float()) for t in emb.taps]


def within(sims, bound):
    """Mean count of n with s(m, n) ≥ max_n s − 2·bound(m, n), over (degree, i, m, j ≠ i)."""
    import torch

    best = sims.amax(dim=-1, keepdim=True)
    keep = (sims >= best - 2 * bound) & torch.isfinite(sims)
    return keep.sum(-1).double()[torch.isfinite(best[..., 0])].mean().item()


def box_identity_windows(y, degrees, e):
    """Candidates per maximum: per-degree products (bound e) vs the box-filter identity
    (bound e·ρ_r(m)·ρ_r(n)); and ρ_r's median and 99th percentile."""
    import torch

    from musc_pipeline.core import lnamd, msm_lowp

    n, h, w, c = y.shape
    out = []
    for r in degrees:
        z = lnamd.unit_features(y, r).reshape(n, h * w, c)
        sims = torch.einsum("imc,jnc->imjn", z, z)  # N×P×N×P float32 (N = 24: 85 MB)
        sims[torch.arange(n), :, torch.arange(n)] = -torch.inf
        rho = msm_lowp.window_norm_ratios(y, r).reshape(n, h * w)
        bound = e * rho[:, :, None, None] * rho[None, None, :, :]
        out.append((r, within(sims, e), within(sims, bound), rho.median().item(), rho.quantile(0.99).item()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24, help="the first N images of the fixture (≤ 24)")
    ap.add_argument("--backbone", default="parity",
                    help="parity (the fixture's network) or a backbone name with offline weights (efficientnet_lite0)")
    args = ap.parse_args(argv)

    import torch

    from musc_pipeline.core import msm, msm_lowp

    torch.set_num_threads(2)
    ys = features(args.images, args.backbone)
    degrees = (1, 3, 5)
    _, h, w, c = ys[0].shape
    print(f"parity fixture vitb16_224_n24's images, first {args.images}, backbone {args.backbone}, grid {h}×{w}, "
          f"C = {c}, degrees {degrees}")
    for name in ("bfloat16", "float16"):
        print(f"  {name}: e = {msm_lowp.product_error(c, getattr(torch, name)):.4g}, "
              f"candidate margin e + 3δ = {msm_lowp.candidate_margin(c, getattr(torch, name)):.4g}")
    msm.scores_by_degree(ys[0][:3], degrees)  # compiles the box_filter kernel outside the timing
    print("\nstage  lowp    seconds exact / lowp   max |Δ score|  cand./max  |Δ| per_degree (exact)")
    for stage, y in enumerate(ys, 1):
        t = time.perf_counter()
        exact = msm.scores_by_degree(y, degrees)
        t_exact = time.perf_counter() - t
        other = (msm.scores_by_degree(y, degrees, strategy="per_degree") - exact).abs().max().item()
        for name in ("bfloat16", "float16"):
            counter = msm_lowp.Candidates()
            t = time.perf_counter()
            got = msm.scores_by_degree(y, degrees, precision="lowp_rerank", lowp_dtype=getattr(torch, name),
                                       counter=counter)
            t_lowp = time.perf_counter() - t
            print(f"{stage:5}  {name:8} {t_exact:5.2f} / {t_lowp:6.2f}  {(got - exact).abs().max().item():13.1e}"
                  f"  {counter.per_patch:9.1f}  {other:21.1e}")
    e = msm_lowp.product_error(c, torch.bfloat16)
    print(f"\nbfloat16, patches within the bound's window (of {h * w}) — per-degree products (e) vs the "
          "box-filter identity (e·ρ·ρ):")
    print("stage  r  per-degree  box identity  ρ median  ρ p99")
    for stage, y in enumerate(ys, 1):
        for r, per_degree, box, med, p99 in box_identity_windows(y, degrees, e):
            print(f"{stage:5}  {r}  {per_degree:10.1f}  {box:12.1f}  {med:8.2f}  {p99:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
