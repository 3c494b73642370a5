"""Safe file names for report files built from data (profiles, datasets, categories).

Every name the report layer writes goes through :func:`slug` (only ``[A-Za-z0-9_.-]``, never
starting with a dot) and :func:`inside` (the resolved path must lie in the output folder), so a
category called ``../../etc`` or ``<script>`` cannot write outside the report folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_LEN = 80


def slug(text: object) -> str:
    """A file-name-safe version of ``text``.

    Names that are already safe come back unchanged (``"mvtec_ad"`` → ``"mvtec_ad"``). When
    characters had to be replaced or the name cut, a short hash of the original is appended,
    so two different inputs (``"a b"``, ``"a_b"``) never share a slug.
    """
    raw = str(text)
    safe = _UNSAFE.sub("_", raw)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)  # no hidden files, no "..".
    changed = safe != raw or len(safe) > _MAX_LEN or not safe
    safe = safe[:_MAX_LEN]
    if changed:
        digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe}-{digest}" if safe else digest
    return safe


def inside(root: Path, name: str) -> Path:
    """``root / name``, after checking that the resolved result stays within ``root``."""
    root_resolved = Path(root).resolve()
    path = (root_resolved / name).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise ValueError(f"refusing to write {name!r}: it resolves outside {root_resolved}")
    return path


def escapes(root: Path, relpath: str) -> bool:
    """True if ``relpath`` is absolute, climbs out of ``root`` (``..``) or resolves outside it."""
    rel = PurePosixPath(str(relpath).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        return True
    try:
        inside(root, rel.as_posix())
    except ValueError:
        return True
    return False


def safe_relpath(root: Path, relpath: str) -> str | None:
    """Normalise a figure path given relative to ``root``; None if it is empty, escapes ``root``
    (:func:`escapes`), or does not name an existing file inside ``root``."""
    if not relpath or escapes(root, relpath):
        return None
    rel = PurePosixPath(str(relpath).replace("\\", "/")).as_posix()
    return rel if inside(root, rel).is_file() else None
