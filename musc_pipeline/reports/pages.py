"""Which pages the report has and their file names: one page per run and dataset, the compare
page, the method-variant pages (the links the index shows)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pandas as pd

from .inputs import RunData, datasets
from .paths import inside, slug


def href(name: str) -> str:
    return quote(name)


class Names:
    """Page file names: slugged, unique, inside ``out_dir``."""

    def __init__(self, out_dir: Path, reserved: set[str]):
        self.out_dir = out_dir
        self.used: set[str] = {name.lower() for name in reserved}

    def take(self, *parts: str) -> str:
        base = "_".join(slug(p) for p in parts)
        name, k = f"{base}.html", 2
        while name.lower() in self.used:
            name, k = f"{base}-{k}.html", k + 1
        self.used.add(name.lower())
        inside(self.out_dir, name)
        return name


def compare_page(names: Names, compare: tuple[str, str], profiles: list[str]) -> dict:
    """The page of deltas b − a of ``compare = (a, b)``: its profiles and file."""
    unknown = [p for p in compare if p not in profiles]
    if unknown:
        raise ValueError(f"render_reports: compare names unknown run(s) {unknown}; runs are {profiles}")
    name = names.take("compare", slug(compare[0]) + "_vs_" + slug(compare[1]))
    return {"a": compare[0], "b": compare[1], "file": name, "href": href(name)}


def variant_pages(names: Names, variants: dict[str, list[str]], profiles: list[str]) -> list[dict]:
    """One page per paper profile that has method variants: its profiles and file."""
    unknown = [p for k, vs in variants.items() for p in (k, *vs) if p not in profiles]
    if unknown:
        raise ValueError(f"render_reports: variants name unknown run(s) {unknown}; runs are {profiles}")
    pages = []
    for paper, others in variants.items():
        if others:
            name = names.take("variants", paper)
            pages.append({"paper": paper, "variants": others, "file": name, "href": href(name)})
    return pages


def run_link(names: Names, run: RunData, df: pd.DataFrame, expected: dict[str, list[str]]) -> dict:
    """A run's entry on the index: one page per dataset it has metrics for, and the configured
    categories it has none for."""
    done = set(zip(df["dataset"], df["category"]))
    missing = {d: [c for c in cats if (d, c) not in done] for d, cats in expected.items()}
    files = [(d, names.take(run.profile, d)) for d in datasets(df)]
    pages = [{"dataset": d, "file": f, "href": href(f), "missing": missing.get(d, [])} for d, f in files]
    unpaged = [{"dataset": d, "missing": cats} for d, cats in missing.items() if cats and d not in dict(files)]
    return {"profile": run.profile, "description": run.description, "backbone": (run.facts or {}).get("backbone", ""),
            "random_init": run.random_init, "pages": pages, "unpaged": unpaged, "n_categories": len(df)}
