"""Result storage: Parquet tables, safetensors arrays, and a DuckDB catalog over them.

Both IO managers build on Dagster's :class:`~dagster.UPathIOManager` (partition paths,
multi-partition loads, local or fsspec URLs such as ``s3://…``). Each output lands at
``<storage>/<profile>/<asset>/<dataset>/<category>.<ext>``.

Writes are atomic: the bytes go to a hidden temporary sibling (``.<name>.<pid>.tmp``), which is
renamed over the final name only when complete, so a crash leaves either the old file or the
new one, and the catalog's globs never match a half-written file. A write that fails with an
exception removes its temporary; only a killed process can leave one behind (hidden, and
matched by no glob), and the next write of the same file deletes such leftovers once they are
older than an hour (no live write takes that long; younger ones may belong to a writer on
another machine sharing the storage).

The DuckDB catalog (``<storage>/catalog.duckdb``) holds only *views* over the Parquet files
(``read_parquet`` globs), so it never has to be written per partition: the Parquet IO manager
rebuilds it only when a table appears for the first time (:func:`ensure_catalog_view`), after
which concurrent partitions write their own Parquet files and nothing else. :func:`rebuild_catalog` (re)creates the views
from whatever tables exist, under a file lock, into a temporary database that replaces the
old one — so readers never see a half-built catalog and it can always be rebuilt from Parquet.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetKey, ConfigurableIOManagerFactory, InputContext, OutputContext, UPathIOManager
from filelock import FileLock
from upath import UPath

CATALOG_FILE = "catalog.duckdb"
CATALOG_VIEWS = ".catalog_views.json"  # the views the catalog has, read without opening DuckDB
#: Views of the catalog -> the tables (asset names, globs allowed) each one unites.
CATALOG_TABLES = {"image_manifest": "image_manifest", "rscin_scores": "rscin_scores",
                  "category_metrics": "category_metrics",
                  # per-image scores and grid maps of each category's last runs (resources/score_history.py)
                  "score_history": "score_history",
                  # every study's long table (study, setting, dataset, category, metric, value)
                  "ablation_results": "study_*"}


def catalog_view(table: str) -> str | None:
    """The catalog view that shows ``table``, or None."""
    return next((view for view, glob in CATALOG_TABLES.items() if fnmatch.fnmatchcase(table, glob)), None)


@dataclass
class ArrayBundle:
    """Named arrays plus string metadata, stored as one safetensors file."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        return {k: f"{v.dtype}{list(v.shape)}" for k, v in self.arrays.items()}


#: A temporary this old is a killed writer's leftover (a write is one buffered put).
STALE_TEMP_SECONDS = 3600


def _remove_stale_temporaries(path: UPath) -> None:
    """Delete what killed writers of ``path`` left behind (see the module doc)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except (OSError, AttributeError, TypeError):  # gone meanwhile, or a store without mtimes
            pass


def _atomic_write(path: UPath, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(payload)
            if hasattr(fh, "fileno"):
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                except (OSError, io.UnsupportedOperation):
                    pass
        if path.protocol in ("", "file", "local"):
            os.replace(tmp.path, path.path)
        else:
            tmp.rename(path)
    except BaseException:
        try:  # a failed write leaves the old file and no temporary
            tmp.unlink()
        except Exception:
            pass
        raise
    _remove_stale_temporaries(path)


def _safe_partition(base: UPath, partition: str) -> UPath:
    parts = partition.split("/")
    if any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ValueError(f"partition key {partition!r} is not a safe relative path")
    return base.joinpath(*parts)


def _record_size(context: OutputContext | None, payload: bytes, images: int | None = None) -> None:
    """The stored size as output metadata (and per image when the output says how many)."""
    if context is None:  # a direct call outside a run
        return
    stored = {"stored_bytes": len(payload)}
    if images:
        stored["stored_bytes_per_image"] = round(len(payload) / images)
    context.add_output_metadata(stored)


class _Base(UPathIOManager):
    def make_safe_partition_path(self, base_path: UPath, partition: str) -> UPath:
        return _safe_partition(base_path, partition)

    def partition_file(self, asset_key: AssetKey, partition: str) -> UPath:
        """Where one asset partition is stored (a path-like partition key is refused)."""
        return self._with_extension(self.make_safe_partition_path(self._base_path.joinpath(*asset_key.path), partition))


class ParquetIOManager(_Base):
    extension = ".parquet"

    def dump_to_path(self, context: OutputContext | None, obj: pd.DataFrame, path: UPath) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(obj, preserve_index=False), sink)
        payload = sink.getvalue().to_pybytes()
        _atomic_write(path, payload)
        _record_size(context, payload)
        table = path.parent.parent.name  # <base>/<profile>/<table>/<dataset>/<category>.parquet
        view = catalog_view(table)
        if view and self._base_path.protocol in ("", "file", "local"):
            ensure_catalog_view(self._base_path.path, view)

    def load_from_path(self, context: InputContext, path: UPath) -> pd.DataFrame:
        with path.open("rb") as fh:
            return pq.read_table(fh).to_pandas()


def _array_payload(bundle: ArrayBundle) -> bytes:
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in bundle.arrays.items()}
    return save(arrays, metadata={"meta": json.dumps(bundle.meta)})


class ArrayIOManager(_Base):
    extension = ".safetensors"

    def dump_to_path(self, context: OutputContext | None, obj: ArrayBundle, path: UPath) -> None:
        payload = _array_payload(obj)
        _atomic_write(path, payload)
        _record_size(context, payload, int(obj.meta["images"]) if "images" in obj.meta else None)

    def drop_arrays(self, asset_key: AssetKey, partition: str, reason: str) -> int:
        """Replace a stored bundle by its metadata alone (``meta["dropped"] = reason``).

        For intermediates that can be recomputed (``intermediates: drop``): the file stays, so
        the asset stays materialized and its readers find a bundle without arrays, which they
        recompute. Returns the bytes freed (0 when there was nothing to drop).
        """
        path = self.partition_file(asset_key, partition)
        if not path.exists():
            return 0
        bundle = self.load_from_path(None, path)
        if not bundle.arrays:
            return 0
        before = path.stat().st_size
        payload = _array_payload(ArrayBundle({}, bundle.meta | {"dropped": reason}))
        _atomic_write(path, payload)
        return before - len(payload)

    def load_from_path(self, context: InputContext | None, path: UPath) -> ArrayBundle:
        from safetensors import safe_open

        if path.protocol in ("", "file", "local"):
            with safe_open(str(path.path), framework="np") as fh:
                meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
                return ArrayBundle({k: fh.get_tensor(k) for k in fh.keys()}, meta)
        from safetensors.numpy import load

        data = path.read_bytes()
        arrays = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        return ArrayBundle(arrays, json.loads(header.get("__metadata__", {}).get("meta", "{}")))


class ParquetStorage(ConfigurableIOManagerFactory):
    base_path: str

    def create_io_manager(self, context) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.base_path))


class ArrayStorage(ConfigurableIOManagerFactory):
    base_path: str

    def create_io_manager(self, context) -> ArrayIOManager:
        return ArrayIOManager(base_path=UPath(self.base_path))


def ensure_catalog_view(storage: str | os.PathLike, table: str) -> None:
    """Rebuild the catalog once, when ``table`` has no view yet.

    Views read globs, so a table's later partitions need no catalog write: in steady state
    concurrent partitions never touch the DuckDB file.
    """
    listing = Path(storage) / CATALOG_VIEWS
    if listing.is_file() and table in json.loads(listing.read_text()):
        return
    rebuild_catalog(storage)


def rebuild_catalog(storage: str | os.PathLike) -> Path:
    """(Re)create the DuckDB views over every profile's Parquet tables; returns the db path."""
    import duckdb

    base = Path(storage)
    base.mkdir(parents=True, exist_ok=True)
    db = base / CATALOG_FILE
    with FileLock(str(base / ".catalog.lock"), timeout=120):
        tmp = base / f".{CATALOG_FILE}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        views = []
        try:
            for view, table in CATALOG_TABLES.items():
                if not any(base.glob(f"*/{table}/*/*.parquet")):
                    continue
                views.append(view)
                pattern = str(base / "*" / table / "*" / "*.parquet").replace("'", "''")
                con.execute(
                    f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{pattern}', union_by_name = true)"
                )
        finally:
            con.close()
        os.replace(tmp, db)
        _atomic_write(UPath(base / CATALOG_VIEWS), json.dumps(views).encode())
    return db
