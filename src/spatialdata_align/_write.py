"""Write a SpatialData object to zarr, the points elements' parquet in one pass.

``SpatialData.write`` writes one element after the other, and a points element is computed and written by
dask's ``to_parquet`` with pyarrow's defaults. Three things make that slow for aligned transcripts:

* the aligned copy (``sdata.align.apply``) is computed lazily from the same partitions as the original, so
  writing the two one after the other reads and decodes ``transcripts.parquet`` twice;
* dask's ``to_parquet`` resets the index of every partition (a copy of it) and pyarrow's writer sets it back (a
  second copy) before the table is converted;
* pyarrow tries a dictionary for every column, the float coordinates included, and gives up on each only after
  1 MB of values per row group.

:func:`write_sdata` lets spatialdata write everything, each points element replaced by an empty one with the same
columns, attributes and transformations (so every element's zarr metadata is spatialdata's own), then writes the
parquet parts of all points elements with one dask computation (shared reads). Each partition is converted to arrow
once, its index as dask's ``__null_dask_index__`` column, with the schema dask infers from the frame's meta, and
written as dask names it (``part.<i>.parquet``, the same pandas metadata): dictionaries for categorical and string
columns only, ``BYTE_STREAM_SPLIT`` for floats, delta encoding for the index. A frame whose types the meta does not
tell (``object`` columns) is written by dask's ``to_parquet``. The store reads back with
:func:`spatialdata.read_zarr` as the same frames.

The tables are written by spatialdata's own table writer (:func:`spatialdata._io.write_table`, anndata's encoding)
into an in-memory zarr store, whose files are then written to the store on disk as they are. zarr's local store
makes every one of the ~260 metadata and array writes of five tables an asynchronous round trip (a table is a group
per ``obs`` column, ``uns`` entry, ...), and those, not the bytes, took the time: ``python benchmarks/bench_write.py
demo_out/aligned.zarr`` (the demo's five tables, 263 zarr nodes) measures the two ways.

Measured with ``python benchmarks/bench_transcripts.py --write FILE`` (26M transcripts of a 168k-cell
``twin_sections`` bundle and their aligned copy, one process, 2 cores): see the docstring of :func:`write_zarr`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

#: the folder spatialdata writes a points element's parquet parts into (``points/<name>/points.parquet``)
POINTS_PARQUET = "points.parquet"


#: the name dask gives an unnamed index in the parquet files it writes (and turns back into an unnamed index on reading)
NONE_LABEL = "__null_dask_index__"


def _dictionary_columns(ddf) -> list[str]:
    """Columns worth a parquet dictionary: categoricals (kept as such on reading) and strings."""
    return [
        str(c) for c, t in ddf.dtypes.items() if isinstance(t, pd.CategoricalDtype) or pd.api.types.is_string_dtype(t)
    ]


def _parquet_schema(meta: pd.DataFrame):
    """The arrow schema dask's ``to_parquet`` infers from a frame's meta (index as ``NONE_LABEL``), or ``None``.

    ``None`` when a column's type cannot be told from the meta alone (an ``object`` column: dask samples the data
    for those) or the index is named: such frames are written by dask itself.
    """
    import pyarrow as pa

    if meta.index.name is not None or NONE_LABEL in meta.columns:
        return None
    schema = pa.Schema.from_pandas(meta.rename_axis(NONE_LABEL), preserve_index=True)
    if any(pa.types.is_null(f.type) for f in schema):
        return None
    return schema


def _write_options(frame, schema) -> dict:
    """Options of ``pyarrow.parquet.write_table`` for a points element's parts.

    Dictionaries for categorical and string columns (:func:`_dictionary_columns`, as for dask's writer),
    ``BYTE_STREAM_SPLIT`` for float columns and delta encoding for the index: the 26M transcripts of the 168k-cell
    bundle take 503 MB per copy instead of 682 MB, encoded in the same time (``python
    benchmarks/bench_transcripts.py --write FILE``).
    """
    import pyarrow as pa

    encoding = {f.name: "BYTE_STREAM_SPLIT" for f in schema if pa.types.is_floating(f.type)}
    if pa.types.is_integer(schema.field(NONE_LABEL).type):
        encoding[NONE_LABEL] = "DELTA_BINARY_PACKED"
    return {"compression": "snappy", "use_dictionary": _dictionary_columns(frame), "column_encoding": encoding}


def _write_part(df: pd.DataFrame, folder: str, schema, options: dict, partition_info=None) -> pd.DataFrame:
    """Write one partition as ``folder/part.<i>.parquet``, as dask's ``to_parquet`` names and lays it out.

    The index is written as the column ``NONE_LABEL`` through the pandas metadata (what dask does after a
    ``reset_index`` and a ``set_index`` of the whole partition, two copies of it that are skipped here).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df.rename_axis(NONE_LABEL, copy=False), schema=schema, preserve_index=True, nthreads=1)
    pq.write_table(table, f"{folder}/part.{partition_info['number']}.parquet", **options)
    return pd.DataFrame({"rows": [len(df)]})


def _copy_frame(part: tuple[pd.DataFrame, str]) -> pd.DataFrame:
    return part[0].copy()  # (part[1]: a random token, only there to make the task key unique)


def _placeholder(el):
    """An empty points element with ``el``'s columns, dtypes, attributes and transformations.

    Its task keys are unique (a random token): empty frames of equal columns would otherwise share keys, and on a
    ``dask.distributed`` cluster two pipelines writing at once (``sda.batch``) would be handed each other's frame.
    """
    import uuid

    import dask.dataframe as dd

    ph = dd.from_map(_copy_frame, [(el._meta, uuid.uuid4().hex)], meta=el._meta, enforce_metadata=False)
    ph.attrs.update(el.attrs)
    return ph


def _parquet_frame(el):
    """``el`` as spatialdata hands it to ``to_parquet``: categories known, no transform attribute."""
    out = el.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.CategoricalDtype) and not out[c].cat.known:
            out[c] = out[c].cat.as_known()
    out.attrs.pop("transform", None)
    return out


def write_sdata(sdata, path) -> None:
    """Write ``sdata`` to a new zarr store ``path``: spatialdata's format, points written in one pass.

    ``sdata`` is not changed (its ``path`` included). Raises :class:`RuntimeError` if the installed spatialdata no
    longer writes a points element as ``points/<name>/points.parquet``.
    """
    import dask
    import spatialdata as sd

    path = Path(path)
    points = dict(sdata.points)
    shell = sd.SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points={k: _placeholder(v) for k, v in points.items()},
        shapes=dict(sdata.shapes),
        attrs=dict(sdata.attrs),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        shell.write(path, consolidate_metadata=False)
    write_tables(dict(sdata.tables), path)
    writes = []
    for name, el in points.items():
        folder = path / "points" / name / POINTS_PARQUET
        if not folder.is_dir():
            raise RuntimeError(
                f"spatialdata {sd.__version__} did not write points element {name!r} to {folder}; "
                "this writer needs updating for it."
            )
        shutil.rmtree(folder)
        frame = _parquet_frame(el)
        schema = _parquet_schema(frame._meta)
        if schema is None:
            writes.append(frame.to_parquet(folder, compute=False, use_dictionary=_dictionary_columns(frame)))
            continue
        folder.mkdir()
        meta = pd.DataFrame({"rows": pd.Series([], dtype=np.int64)})
        writes.append(frame.map_partitions(_write_part, str(folder), schema, _write_options(frame, schema), meta=meta))
    if writes:
        dask.compute(*writes)
    from spatialdata._io.io_zarr import _write_consolidated_metadata

    _write_consolidated_metadata(path)  # what SpatialData.write ends with, now over every element


def write_tables(tables: dict, path) -> None:
    """Write AnnData tables into the existing SpatialData zarr store ``path``, as ``SpatialData.write`` does.

    Each table goes through spatialdata's table writer (:func:`spatialdata._io.write_table`, the current tables
    format) into an in-memory zarr store of the same zarr format as ``path``; its files are then written under
    ``path`` key by key, as zarr's local store names them (``tables/<name>/...``). The result is the layout
    spatialdata writes; the metadata is not consolidated here.
    """
    import zarr
    from spatialdata._io import write_table
    from spatialdata._io.format import CurrentTablesFormat

    if not tables:
        return
    path = Path(path)
    fmt = zarr.open_group(path, mode="r", use_consolidated=False).metadata.zarr_format
    files: dict = {}
    root = zarr.create_group(store=zarr.storage.MemoryStore(files), zarr_format=fmt)
    group = root.require_group("tables")
    for name, table in tables.items():
        write_table(table=table, group=group, name=name, element_format=CurrentTablesFormat())
    for key, buf in files.items():
        if not key.startswith("tables/"):
            continue  # the root's metadata: spatialdata's own, already on disk
        target = path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buf.to_bytes())


def write_zarr(sdata, path, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to the zarr store ``path``, as :meth:`spatialdata.SpatialData.write` does, faster with points.

    The store is spatialdata's own (read it with :func:`spatialdata.read_zarr`). The aligned transcripts that
    ``sdata.align.apply`` makes are computed from the same partitions as the original ones, and
    ``SpatialData.write`` reads and decodes those twice (one element after the other); here every points element is
    written in one pass, each partition converted to arrow once (26M transcripts and their aligned copy, 2 cores,
    2026-12-03: 8.9 s vs 16.0 s, a store of 1006 vs 1452 MB; ``python benchmarks/bench_transcripts.py --write
    FILE``). ``spatialdata-align run`` writes with it.

    Parameters
    ----------
    sdata
        The object to write; it is not changed (``sdata.path`` included).
    path
        Store to create.
    overwrite
        Replace an existing zarr store at ``path`` (only a zarr store: any other existing path raises). The new
        store is written next to it and moved into place when complete, so a failure leaves the old one.

    Returns
    -------
    The store's path.

    Examples
    --------
    >>> sda.write_zarr(sdata, "aligned.zarr")  # doctest: +SKIP
    >>> back = spatialdata.read_zarr("aligned.zarr")  # doctest: +SKIP
    """
    from . import _checks

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it (only a zarr store is replaced).")
    _checks.check_outputs(out=path)  # an existing path that is not a zarr store is never replaced
    with _checks.StagedOutputs({"out": path}) as staged:  # written next to it, moved into place when complete
        write_sdata(sdata, staged.path("out"))
        staged.commit()
    return path
