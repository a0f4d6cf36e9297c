"""Xenium transcripts, read lazily with a unique, ordered index (known dask divisions).

``dask.dataframe.read_parquet`` gives every partition its own ``RangeIndex`` starting at 0, so the index of the
whole frame repeats; ``spatialdata.transform``, queries and spatialdata-plot's ``render_points`` then fail with
"cannot reindex on an axis with duplicate labels". Here each partition (a run of parquet row groups of about
``TRANSCRIPT_BLOCKSIZE`` bytes) gets the rows ``start .. stop - 1`` of the file as its index, from the parquet
metadata alone, so the divisions are known before anything is read and the frame stays lazy. Column projection is
kept (the partition reader takes ``columns=``), so ``ddf[["x", "y"]]`` reads two columns only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: target partition size of lazily read transcripts (memory of each partition-wise pass)
TRANSCRIPT_BLOCKSIZE = 32 * 2**20
_REQUIRED = ("feature_name", "x_location", "y_location")
#: Xenium's coordinate columns and the names a points element gives them
COORDINATES = {"x_location": "x", "y_location": "y", "z_location": "z"}
_FILE_NAME = {v: k for k, v in COORDINATES.items()}


def _layout(file_columns) -> list[str]:
    """The file's columns in the frame's order: coordinates, feature name, cell id, then the others as in the file.

    The coordinates come first, as ``PointsModel.parse`` puts them, so the frame needs no reordering copy when it
    becomes a points element; a file column already called ``x``, ``y`` or ``z`` is left out, as parse drops it.
    """
    first = [c for c in (*COORDINATES, "feature_name", "cell_id") if c in file_columns]
    return first + [c for c in file_columns if c not in first and c not in _FILE_NAME]


def _read_row_groups(part: tuple[list[int], int, int], file: str, categories: pd.Index, columns=None) -> pd.DataFrame:
    """One partition (a run of row groups) of a parquet file, with its global row numbers as index.

    ``columns=`` (the frame's names) lets dask project columns: only the columns a computation uses are read.
    """
    import pyarrow.parquet as pq

    groups, start, stop = part
    pf = pq.ParquetFile(file, read_dictionary=["feature_name"])
    wanted = _layout(pf.schema_arrow.names) if columns is None else [_FILE_NAME.get(c, c) for c in columns]
    table = pf.read_row_groups(groups, columns=wanted).select(wanted)
    return _fix(table, categories, start, stop)


def _gene_codes(names, categories: pd.Index) -> np.ndarray:
    """Codes of ``names`` (an arrow chunked array of gene names) in ``categories``; -1 where absent or null.

    A dictionary-encoded column (read with ``read_dictionary``) is coded through its small dictionary, so the 26M
    strings of a large file are never materialised: a 2M-row partition reads in 0.12 s instead of 0.15 s.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(categories.tolist(), pa.string())

    def as_string(arr):
        return arr if pa.types.is_string(arr.type) else arr.cast(pa.string())  # binary (XOA < 2), large strings

    codes = []
    for chunk in names.chunks:
        if pa.types.is_dictionary(chunk.type):
            in_set = pc.index_in(as_string(chunk.dictionary), value_set=value_set)
            coded = in_set.take(chunk.indices)
        else:
            coded = pc.index_in(as_string(chunk), value_set=value_set)
        codes.append(coded.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
    return np.concatenate(codes) if codes else np.zeros(0, np.int32)


def _fix(table, categories: pd.Index, start: int, stop: int) -> pd.DataFrame:
    """A pyarrow table of transcripts as pandas, index ``start .. stop - 1``.

    The coordinate columns get a points element's names (``x_location`` -> ``x``, ...); ``feature_name`` becomes
    categorical (``categories``), the other strings arrow strings.

    Kept in arrow: the gene names are coded with ``pyarrow.compute.index_in`` and the strings never become Python
    objects (dask would turn them back into arrow strings). Reading the whole demo table (3.1M rows) takes 0.43 s,
    0.88 s through Python objects and ``pd.Categorical`` as before; 26M rows 4.1 s vs 9.1 s; dask's
    ``read_parquet`` + the same categorical is 1.4x slower (``python benchmarks/bench_transcripts.py --read FILE``).
    """
    import pyarrow as pa

    table = table.rename_columns([COORDINATES.get(c, c) for c in table.column_names])
    codes = None
    if "feature_name" in table.column_names:
        at = table.column_names.index("feature_name")
        codes = _gene_codes(table.column(at), categories)
        table = table.drop_columns(["feature_name"])
    strings = {t: pd.StringDtype("pyarrow") for t in (pa.string(), pa.large_string())}
    df = table.to_pandas(types_mapper=strings.get)
    for col in ("cell_id",):  # (XOA < 2 writes cell ids as bytes)
        if col in df.columns and df[col].dtype == object and len(df) and isinstance(df[col].iloc[0], bytes):
            df[col] = df[col].str.decode("utf-8").astype(pd.StringDtype("pyarrow"))
    if codes is not None:
        df.insert(at, "feature_name", pd.Categorical.from_codes(codes, categories))
    df.index = pd.RangeIndex(start, stop)
    return df


def _categories(file) -> pd.Index:
    """Unique feature names, in order of first appearance, one row group at a time.

    Read as dictionaries: the unique codes of each chunk pick its names from the chunk's dictionary, so the strings
    of every row are never decoded (26M transcripts: 0.2 s instead of 0.75 s, the same names in the same order).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file, read_dictionary=["feature_name"])
    seen: dict[str, None] = {}
    for i in range(pf.metadata.num_row_groups):
        for chunk in pf.read_row_group(i, columns=["feature_name"]).column(0).chunks:
            if pa.types.is_dictionary(chunk.type):
                names = chunk.dictionary.take(pc.unique(chunk.indices))
            else:
                names = chunk.unique()
            for v in names.to_pylist():
                if v is not None:  # a missing name is a missing value, not a gene called "None"
                    seen.setdefault(v.decode("utf-8") if isinstance(v, bytes) else str(v), None)
    return pd.Index(list(seen))


def read_transcripts_parquet(file: Path):
    """``transcripts.parquet`` as a lazy dask frame with a unique index; ``None`` when it has no rows."""
    import dask.dataframe as dd
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{file} is not a readable parquet file ({type(e).__name__}: {e}).") from None
    md = pf.metadata
    if md.num_rows == 0:
        return None
    columns = list(pf.schema_arrow.names)
    lacking = [c for c in _REQUIRED if c not in columns]
    if lacking:
        raise ValueError(f"{file} lacks required column(s) {lacking}; it has {columns}.")
    parts, groups, size, start, row = [], [], 0, 0, 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        groups.append(i)
        size += rg.total_byte_size
        row += rg.num_rows
        if size >= TRANSCRIPT_BLOCKSIZE or i == md.num_row_groups - 1:
            if row > start:
                parts.append((groups, start, row))
            groups, size, start = [], 0, row
    categories = _categories(file)
    meta = _fix(pf.schema_arrow.empty_table().select(_layout(columns)), categories, 0, 0)
    divisions = (*(p[1] for p in parts), parts[-1][2] - 1)
    return dd.from_map(
        _read_row_groups,
        parts,
        file=str(file),
        categories=categories,
        meta=meta,
        divisions=divisions,
        enforce_metadata=False,
    )


def read_transcripts_csv(file: Path):
    """``transcripts.csv(.gz)``: one partition (gzip cannot be split), so its ``RangeIndex`` is unique.

    ``None`` when it has no rows (like :func:`read_transcripts_parquet`).
    """
    import dask.dataframe as dd

    try:
        ddf = dd.read_csv(file, blocksize=None, dtype={"cell_id": str, "feature_name": str})
        columns = list(ddf.columns)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} could not be read as a transcripts table ({type(e).__name__}: {e}).") from None
    lacking = [c for c in _REQUIRED if c not in columns]
    if lacking:
        raise ValueError(f"{file} lacks required column(s) {lacking}; it has {columns}.")
    try:
        names = ddf["feature_name"].drop_duplicates().compute()
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} could not be read as a transcripts table ({type(e).__name__}: {e}).") from None
    if len(names) == 0:  # a header and no rows: no transcripts, as for an empty transcripts.parquet
        return None
    cat = pd.CategoricalDtype(categories=pd.Index(names.astype(str).unique()))
    ddf["feature_name"] = ddf["feature_name"].astype(cat)
    return ddf


def n_rows(ddf) -> int:
    """Rows of a frame from :func:`read_transcripts_parquet` without reading it (known divisions)."""
    return int(np.asarray(ddf.divisions)[-1]) + 1
