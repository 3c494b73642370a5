"""What a profile's settings must satisfy beyond their types: the constraints the core enforces
(LNAMD degrees, the MSM interval, RsCIN/RsCon windows, subsets, the backbone's token grid),
checked when the code location loads so that a bad value disables its profile with one line
naming the field and what is allowed, instead of failing minutes later inside a run."""

from __future__ import annotations

from musc_pipeline.core import backbone as bb
from musc_pipeline.core import registry
from musc_pipeline.settings import ProfileSettings


def _positive(values: tuple[int, ...] | None) -> bool:
    return bool(values) and all(v >= 1 for v in values)


def setting_problem(profile: ProfileSettings, spec: registry.BackboneSpec) -> str | None:
    """``<field> = <value> is not allowed: <what is>`` for the first bad setting, or None.

    ``spec`` is the backbone the profile names (``auto`` already resolved)."""
    m, b = profile.method, profile.backbone
    lo, hi = m.interval
    rules = [
        ("method.degrees", m.degrees, _positive(m.degrees) and all(r % 2 for r in m.degrees),
         "odd integers >= 1 (the LNAMD/SNAMD aggregation degrees r), at least one"),
        ("method.interval", m.interval, 0.0 <= lo <= hi <= 1.0, "[a, b] with 0 <= a <= b <= 1"),
        ("method.rscin_windows", m.rscin_windows, m.rscin_windows is None or _positive(m.rscin_windows),
         "integers >= 1 (RsCIN window sizes k), at least one; omit it for the per-dataset default"),
        ("method.rscon_windows", m.rscon_windows, _positive(m.rscon_windows),
         "integers >= 1 (RsCon window sizes k), at least one"),
        ("method.subsets", m.subsets, m.subsets >= 1, "an integer >= 1 (1: all images scored together)"),
        ("method.smoothing_sigma", m.smoothing_sigma, m.smoothing_sigma >= 0, "a number >= 0 (0: no smoothing)"),
        ("method.references", m.references, m.mode == "zero_shot" or bool(m.references),
         f"a folder of normal reference images, needed by mode {m.mode}"),
        ("backbone.activation", b.activation, b.activation in bb.ACTIVATIONS, f"one of {', '.join(bb.ACTIVATIONS)}"),
    ]
    stride = registry.token_stride(spec)
    if b.image_size is not None:
        multiple = stride or 1
        rules.append(("backbone.image_size", b.image_size, b.image_size >= multiple and b.image_size % multiple == 0,
                      f"a positive multiple of {multiple} (the token stride of {spec.name})" if stride
                      else "a positive integer"))
    for field, value, ok, allowed in rules:
        if not ok:
            shown = list(value) if isinstance(value, tuple) else value
            return f"{field} = {shown} is not allowed: {allowed}"
    return None
