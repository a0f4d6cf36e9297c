"""Low-level writers of genuine 10x Genomics file formats (Xenium Onboard Analysis and Space Ranger outputs).

These functions write exactly the files the 10x pipelines write, so that both :mod:`spatialdata_align.io` and
:mod:`spatialdata_io` read them. They are used by the synthetic data generator and by the tests; they never read
anything back.

Formats
-------
* Feature-barcode HDF5 (``*.h5``): ``/matrix/{barcodes,data,indices,indptr,shape}`` holding a CSC matrix of shape
  ``(n_features, n_barcodes)`` and ``/matrix/features/{id,name,feature_type,genome,_all_tag_keys}``; strings are
  fixed-length ASCII, as in Cell Ranger / Space Ranger / Xenium Onboard Analysis.
* Feature-barcode Matrix Market folder: ``matrix.mtx.gz`` (features x barcodes, 1-based coordinates),
  ``barcodes.tsv.gz`` and ``features.tsv.gz`` (id, name, type; no header).
* Xenium output folder (XOA 1.x-4.x file layouts): ``experiment.xenium`` (JSON), ``cells.csv.gz`` /
  ``cells.parquet``, ``cell_feature_matrix.h5`` / ``cell_feature_matrix/``, ``transcripts.parquet`` /
  ``transcripts.csv.gz``, ``cells.zarr.zip`` (XOA >= 2.0: cell ids, cell summary, label masks, polygon sets),
  ``cell_boundaries`` / ``nucleus_boundaries`` (``.csv.gz`` in XOA 1.x, ``.parquet`` after), the morphology focus
  image (``morphology_focus.ome.tif`` in XOA 1.x, one OME-TIFF per channel in ``morphology_focus/`` after).
  Positions in µm; the morphology image and label masks in pixels of ``pixel_size`` µm with origin at (0, 0) µm.
* Space Ranger ``outs/`` folder: ``filtered_feature_bc_matrix.h5`` / ``filtered_feature_bc_matrix/``,
  ``spatial/tissue_positions.csv`` (header) or ``spatial/tissue_positions_list.csv`` (no header),
  ``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png`` and
  optionally a full-resolution image next to them.

Gzip members are written with a zero timestamp, so identical inputs give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "write_feature_matrix_h5",
    "write_feature_matrix_mtx",
    "write_visium",
    "write_xenium",
    "xenium_cell_ids",
]

#: ``software_version`` written to the Space Ranger HDF5 attributes.
SPACERANGER_SOFTWARE_VERSION = "spaceranger-2.1.0"

_XENIUM_CELL_ID_RE = re.compile(r"^[a-p]{8}-\d+$")
_CELLS_COLUMNS = ("cell_id", "x_centroid", "y_centroid", "cell_area", "nucleus_area")
_TRANSCRIPT_COLUMNS = ("feature_name", "x_location", "y_location")
_VISIUM_SCALEFACTOR_KEYS = ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef")
#: Space Ranger position files: 2.x (header), 1.x (no header), 3.x / HD (parquet)
VISIUM_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _as_str_array(values: Any, what: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values).astype(str)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}.")
    if n is not None and len(arr) != n:
        raise ValueError(f"{what} has {len(arr)} entries, expected {n}.")
    return arr


def _as_counts(counts: Any, n_rows: int, n_cols: int, what: str = "counts") -> sparse.csr_matrix:
    """Return ``counts`` as an integer CSR matrix of shape ``(n_rows, n_cols)``, checking values."""
    mat = sparse.csr_matrix(counts)
    if mat.shape != (n_rows, n_cols):
        raise ValueError(f"{what} has shape {mat.shape}, expected ({n_rows}, {n_cols}) (barcodes x features).")
    data = mat.data
    if data.size and (not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data))):
        raise ValueError(f"{what} must hold non-negative integers.")
    mat = sparse.csr_matrix((data.astype(np.int32), mat.indices, mat.indptr), shape=mat.shape)
    mat.sum_duplicates()
    mat.eliminate_zeros()
    mat.sort_indices()
    return mat


def _fixed_ascii(values: Sequence[str] | np.ndarray) -> np.ndarray:
    arr = np.asarray([str(v).encode("ascii") for v in values])
    if arr.size == 0:
        return np.zeros(0, dtype="S1")
    return arr.astype(f"S{max(1, max(len(v) for v in arr))}")


def _write_gzip_text(path: Path, text: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory.")
        if any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it.")
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# feature-barcode matrices
# ----------------------------------------------------------------------------------------------------------------
def _check_features(barcodes, feature_ids, feature_names, feature_types):
    """Barcodes and per-feature columns as validated string arrays (a single feature type applies to all)."""
    barcodes = _as_str_array(barcodes, "barcodes")
    feature_ids = _as_str_array(feature_ids, "feature_ids")
    n_features = len(feature_ids)
    feature_names = _as_str_array(feature_names, "feature_names", n_features)
    if isinstance(feature_types, str):
        feature_types = [feature_types] * n_features
    return barcodes, feature_ids, feature_names, _as_str_array(feature_types, "feature_types", n_features)


def write_feature_matrix_h5(
    path: str | Path,
    counts: Any,
    barcodes: Sequence[str],
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    feature_types: Sequence[str] | str,
    *,
    genome: str = "GRCh38",
    library_id: str = "library",
    chemistry_description: str = "Spatial 3' v1",
    software_version: str = SPACERANGER_SOFTWARE_VERSION,
) -> Path:
    """Write a 10x feature-barcode matrix HDF5 file (Cell Ranger >= 3 / Space Ranger / Xenium layout).

    Parameters
    ----------
    path
        Output ``.h5`` file (parents are created).
    counts
        ``(n_barcodes, n_features)`` non-negative integer counts, dense or sparse.
    barcodes
        Barcodes (cell ids), one per row of ``counts``.
    feature_ids, feature_names
        Feature ids (e.g. Ensembl ids) and names (gene symbols), one per column of ``counts``.
    feature_types
        ``"Gene Expression"``, ``"Negative Control Probe"``, ...; one per feature or a single string for all.
    genome
        Value of ``/matrix/features/genome`` for every feature.
    library_id, chemistry_description, software_version
        File attributes, as written by the 10x pipelines.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    barcodes, feature_ids, feature_names, feature_types = _check_features(
        barcodes, feature_ids, feature_names, feature_types
    )
    n_features = len(feature_ids)
    # CSC of the (features x barcodes) matrix == CSR of (barcodes x features): one compressed column per barcode
    by_barcode = _as_counts(counts, len(barcodes), n_features)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["chemistry_description"] = np.bytes_(chemistry_description)
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["library_ids"] = _fixed_ascii([library_id])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = np.bytes_(software_version)
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=_fixed_ascii(barcodes))
        m.create_dataset("data", data=by_barcode.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=by_barcode.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=by_barcode.indptr.astype(np.int64), compression="gzip")
        m.create_dataset("shape", data=np.array([n_features, len(barcodes)], dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=_fixed_ascii(["genome"]))
        feats.create_dataset("feature_type", data=_fixed_ascii(feature_types))
        feats.create_dataset("genome", data=_fixed_ascii([genome] * n_features))
        feats.create_dataset("id", data=_fixed_ascii(feature_ids))
        feats.create_dataset("name", data=_fixed_ascii(feature_names))
    return path


def write_feature_matrix_mtx(
    folder: str | Path,
    counts: Any,
    barcodes: Sequence[str],
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    feature_types: Sequence[str] | str,
    *,
    software_version: str = SPACERANGER_SOFTWARE_VERSION,
) -> Path:
    """Write a 10x feature-barcode matrix folder (``matrix.mtx.gz``, ``barcodes.tsv.gz``, ``features.tsv.gz``).

    Parameters
    ----------
    folder
        Output folder (created).
    counts
        ``(n_barcodes, n_features)`` non-negative integer counts, dense or sparse.
    barcodes, feature_ids, feature_names, feature_types
        As in :func:`write_feature_matrix_h5`.
    software_version
        Written in the ``%metadata_json`` comment of ``matrix.mtx.gz``.

    Returns
    -------
    The folder written.
    """
    folder = Path(folder)
    barcodes, feature_ids, feature_names, feature_types = _check_features(
        barcodes, feature_ids, feature_names, feature_types
    )
    n_features = len(feature_ids)
    mat = _as_counts(counts, len(barcodes), n_features).tocoo()  # barcodes x features
    # entries sorted by barcode (column of the features x barcodes matrix), then feature, as 10x writes them
    order = np.lexsort((mat.col, mat.row))
    feat_1 = mat.col[order] + 1
    bc_1 = mat.row[order] + 1
    vals = mat.data[order]
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"software_version": software_version, "format_version": 2})
    buf = io.StringIO()
    buf.write("%%MatrixMarket matrix coordinate integer general\n")
    buf.write(f"%metadata_json: {meta}\n")
    buf.write(f"{n_features} {len(barcodes)} {len(vals)}\n")
    if len(vals):
        np.savetxt(buf, np.column_stack([feat_1, bc_1, vals]), fmt="%d", delimiter=" ")
    _write_gzip_text(folder / "matrix.mtx.gz", buf.getvalue())
    _write_gzip_text(folder / "barcodes.tsv.gz", "".join(f"{b}\n" for b in barcodes))
    _write_gzip_text(
        folder / "features.tsv.gz",
        "".join(f"{i}\t{n}\t{t}\n" for i, n, t in zip(feature_ids, feature_names, feature_types, strict=True)),
    )
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Xenium
# ----------------------------------------------------------------------------------------------------------------
def xenium_cell_ids(n: int, *, dataset_suffix: int = 1, start: int = 1) -> np.ndarray:
    """Return ``n`` genuine Xenium (XOA >= 1.3) cell ids such as ``"aaaaaaab-1"``.

    Xenium encodes a cell id as a uint32 prefix written as 8 hexadecimal digits shifted to ``a``-``p``, and a
    dataset suffix. ``layout="full"`` of :func:`write_xenium` needs ids of this form (``cells.zarr.zip`` stores the
    integers).

    Parameters
    ----------
    n
        Number of ids.
    dataset_suffix
        The ``-<suffix>`` part.
    start
        Prefix integer of the first id (consecutive after it).
    """
    prefix = np.arange(start, start + n, dtype=np.uint64)
    if n and prefix[-1] > np.iinfo(np.uint32).max:
        raise ValueError("Xenium cell id prefixes must fit in uint32.")
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint64)
    nibbles = (prefix[:, None] >> shifts) & np.uint64(0xF)
    letters = (nibbles + ord("a")).astype(np.uint8)
    stems = letters.view("S8").ravel().astype("U8") if n else np.zeros(0, dtype="U8")
    return np.char.add(stems, f"-{int(dataset_suffix)}")


def _encode_xenium_cell_ids(cell_ids: np.ndarray) -> np.ndarray:
    """Xenium string cell ids -> ``(n, 2)`` uint32 (prefix, dataset suffix), as in ``cells.zarr.zip``."""
    bad = [c for c in cell_ids if not _XENIUM_CELL_ID_RE.match(c)]
    if bad:
        raise ValueError(
            f"layout='full' needs genuine Xenium cell ids like 'aaaaaaab-1' ({len(bad)} of {len(cell_ids)} are not, "
            f"e.g. {bad[:3]}); generate them with xenium_cell_ids(n)."
        )
    stems = np.array([c.split("-")[0] for c in cell_ids]).astype("S8")
    nibbles = stems.view(np.uint8).reshape(-1, 8).astype(np.uint64) - ord("a")
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint64)
    prefix = (nibbles << shifts).sum(axis=1).astype(np.uint32)
    suffix = np.array([int(c.split("-")[1]) for c in cell_ids], dtype=np.uint32)
    return np.column_stack([prefix, suffix]).astype(np.uint32)


def _disc_polygons(
    cell_ids: np.ndarray, x: np.ndarray, y: np.ndarray, radius: np.ndarray, n_vertices: int = 13
) -> pd.DataFrame:
    """Closed polygons (first vertex repeated) approximating discs, in the Xenium boundaries parquet layout."""
    n = len(x)
    theta = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    theta = np.concatenate([theta, theta[:1]])
    vx = x[:, None] + radius[:, None] * np.cos(theta)[None, :]
    vy = y[:, None] + radius[:, None] * np.sin(theta)[None, :]
    k = len(theta)
    return pd.DataFrame(
        {
            "cell_id": np.repeat(cell_ids, k),
            "vertex_x": vx.ravel().astype(np.float32),
            "vertex_y": vy.ravel().astype(np.float32),
            "label_id": np.repeat(np.arange(1, n + 1, dtype=np.uint32), k),
        }
    )


def _disc_tiles(
    shape: tuple[int, int],
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    values: np.ndarray,
    tile: int,
    dtype: Any,
    falloff: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y0, x0, block)`` tiles (row-major) of an image with discs painted in (centres/radii in px).

    Tiles are ``tile x tile`` (clipped at the image border). Later discs overwrite earlier ones. With ``falloff`` the
    value decreases linearly to half of it at the disc edge (a DAPI-like nucleus).
    """
    from tqdm.auto import tqdm

    h, w = shape
    x_lo, x_hi = cx - radius, cx + radius
    y_lo, y_hi = cy - radius, cy + radius
    n_rows = -(-h // tile)
    for y0 in tqdm(range(0, h, tile), total=n_rows, desc="painting tiles", leave=False, disable=n_rows < 32):
        y1 = min(h, y0 + tile)
        rows_hit = (y_hi >= y0) & (y_lo < y1)
        for x0 in range(0, w, tile):
            x1 = min(w, x0 + tile)
            block = np.zeros((y1 - y0, x1 - x0), dtype=dtype)
            for i in np.flatnonzero(rows_hit & (x_hi >= x0) & (x_lo < x1)):
                r = radius[i]
                ya, yb = max(y0, int(np.floor(y_lo[i]))), min(y1, int(np.ceil(y_hi[i])) + 1)
                xa, xb = max(x0, int(np.floor(x_lo[i]))), min(x1, int(np.ceil(x_hi[i])) + 1)
                if ya >= yb or xa >= xb:
                    continue
                yy, xx = np.mgrid[ya:yb, xa:xb]
                d2 = (xx + 0.5 - cx[i]) ** 2 + (yy + 0.5 - cy[i]) ** 2
                inside = d2 <= r * r
                sub = block[ya - y0 : yb - y0, xa - x0 : xb - x0]
                if falloff:
                    val = values[i] * (1.0 - 0.5 * np.sqrt(d2) / max(r, 1e-9))
                    sub[inside] = val[inside].astype(dtype)
                else:
                    sub[inside] = values[i]
            yield y0, x0, block


def _write_ome_tiff(
    path: Path, image: np.ndarray | None, pixel_size: float, tiles: Any = None, shape=None, channel: str = "DAPI"
) -> None:
    """Write a 2D uint16 OME-TIFF (one channel, named), tiled and zlib-compressed, with physical pixel size."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "axes": "YX",
        "PhysicalSizeX": float(pixel_size),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(pixel_size),
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": [channel]},
    }
    if image is not None:
        tifffile.imwrite(path, image, ome=True, metadata=metadata, tile=(256, 256), compression="zlib")
    else:
        tifffile.imwrite(
            path, tiles, shape=shape, dtype=np.uint16, ome=True, metadata=metadata, tile=(256, 256), compression="zlib"
        )


def _check_cells(cells: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(cells, pd.DataFrame):
        raise TypeError(f"cells must be a pandas DataFrame, got {type(cells).__name__}.")
    missing = [c for c in _CELLS_COLUMNS if c not in cells.columns]
    if missing:
        raise ValueError(f"cells lacks columns {missing}; it has {list(cells.columns)}.")
    cells = cells.reset_index(drop=True).copy()
    cells["cell_id"] = cells["cell_id"].astype(str)
    if not cells["cell_id"].is_unique:
        raise ValueError("cells['cell_id'] must be unique.")
    return cells


def _str_column(col: pd.Series, fill: str | None = None) -> pd.Series:
    """``col`` as strings (missing values ``fill``); a categorical column stays categorical, with str categories.

    Casting millions of Python objects is the slow part of writing transcripts (1.3 s of the demo's 3.1M); a
    categorical is converted through its categories, and :func:`_write_table` writes it as a plain string column.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        if fill is not None and col.isna().any():
            if fill not in col.cat.categories:
                col = col.cat.add_categories([fill])
            col = col.fillna(fill)
        names = col.cat.categories.astype(str)
        if names.is_unique:  # (else two categories print alike, e.g. 1 and "1": merge them the slow way)
            return col.cat.rename_categories(names)
    if fill is not None:
        col = col.astype(object).where(col.notna(), fill)
    return col.astype(str)


def _check_transcripts(transcripts: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _TRANSCRIPT_COLUMNS if c not in transcripts.columns]
    if missing:
        raise ValueError(f"transcripts lacks columns {missing}; it has {list(transcripts.columns)}.")
    tx = transcripts.reset_index(drop=True).copy()
    if "transcript_id" not in tx.columns:
        tx.insert(0, "transcript_id", np.arange(1, len(tx) + 1, dtype=np.uint64))
    if "cell_id" in tx.columns:
        tx["cell_id"] = _str_column(tx["cell_id"], fill="UNASSIGNED")
    else:
        tx["cell_id"] = "UNASSIGNED"
    if "z_location" not in tx.columns:
        tx["z_location"] = np.float32(0.0)
    if "overlaps_nucleus" not in tx.columns:
        tx["overlaps_nucleus"] = np.uint8(0)
    if "qv" not in tx.columns:
        tx["qv"] = np.float32(40.0)
    tx["feature_name"] = _str_column(tx["feature_name"])
    for c in ("x_location", "y_location", "z_location", "qv"):
        tx[c] = tx[c].astype(np.float32)
    return tx


def _write_table(df: pd.DataFrame, path: Path, fmt: str) -> Path:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        for i, f in enumerate(table.schema):  # 10x files hold plain strings, not dictionary-encoded categoricals
            if pa.types.is_dictionary(f.type):
                table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
        # (no pandas metadata either: it would name the string columns categorical)
        pq.write_table(table.replace_schema_metadata(None), path)
    elif fmt == "csv.gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(df.to_csv(index=False).encode("utf-8"))
    else:
        raise ValueError(f"format must be 'parquet' or 'csv.gz', got {fmt!r}.")
    return path


def _write_cells_zarr(
    path: Path,
    cells: pd.DataFrame,
    mask_shape: tuple[int, int],
    pixel_size: float,
    chunk: int = 1024,
) -> None:
    """Write ``cells.zarr.zip`` (XOA >= 2.0 layout, zarr v2 format): cell_id, cell_summary, masks, polygon_sets."""
    import zarr

    n = len(cells)
    x = cells["x_centroid"].to_numpy(np.float64)
    y = cells["y_centroid"].to_numpy(np.float64)
    cell_r = np.sqrt(np.clip(cells["cell_area"].to_numpy(np.float64), 0, None) / np.pi)
    nuc_r = np.sqrt(np.clip(cells["nucleus_area"].to_numpy(np.float64), 0, None) / np.pi)
    summary = np.column_stack(
        [
            x,
            y,
            cells["cell_area"].to_numpy(np.float64),
            x,
            y,
            cells["nucleus_area"].to_numpy(np.float64),
            np.zeros(n),
            np.ones(n),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        # Build a local zarr v2 store, then zip it: a ZipStore written in place would duplicate metadata members.
        local = Path(tmp) / "cells.zarr"
        root = zarr.open_group(
            store=str(local), mode="w", zarr_format=2, attributes={"major_version": 5, "minor_version": 0}
        )
        ids = root.create_array("cell_id", shape=(n, 2), dtype=np.uint32, chunks=(max(n, 1), 2))
        ids[...] = _encode_xenium_cell_ids(cells["cell_id"].to_numpy())
        cs = root.create_array(
            "cell_summary",
            shape=summary.shape,
            dtype=np.float64,
            chunks=(max(n, 1), 8),
            attributes={
                "column_names": [
                    "cell_centroid_x",
                    "cell_centroid_y",
                    "cell_area",
                    "nucleus_centroid_x",
                    "nucleus_centroid_y",
                    "nucleus_area",
                    "z_level",
                    "nucleus_count",
                ]
            },
        )
        cs[...] = summary
        masks = root.create_group("masks")
        labels = np.arange(1, n + 1, dtype=np.uint32)
        for key, radius in (("0", nuc_r), ("1", cell_r)):
            arr = masks.create_array(key, shape=mask_shape, dtype=np.uint32, chunks=(chunk, chunk), fill_value=0)
            for y0, x0, block in _disc_tiles(
                mask_shape, x / pixel_size, y / pixel_size, radius / pixel_size, labels, chunk, np.uint32
            ):
                if block.any():  # empty chunks stay implicit (fill value), as zarr does
                    arr[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block
        polys = root.create_group("polygon_sets")
        for key, method in (("0", "nucleus"), ("1", "nucleus_expansion")):
            g = polys.create_group(key, attributes={"method": method})
            ci = g.create_array("cell_index", shape=(n,), dtype=np.uint32, chunks=(max(n, 1),))
            ci[...] = np.arange(n, dtype=np.uint32)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for file in sorted(local.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(local).as_posix())


def write_xenium(
    out_dir: str | Path,
    *,
    cells: pd.DataFrame,
    counts: Any,
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    feature_types: Sequence[str] | str,
    transcripts: pd.DataFrame | None = None,
    morphology: np.ndarray | None = None,
    pixel_size: float = 0.2125,
    layout: str = "minimal",
    cells_format: str = "csv.gz",
    matrix_format: str = "h5",
    transcripts_format: str = "parquet",
    xoa_version: int = 2,
    boundaries: bool | None = None,
    experiment: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Xenium Onboard Analysis output folder (XOA 1.x-4.x file layouts).

    Parameters
    ----------
    out_dir
        Output folder (created; must be empty or absent unless ``overwrite``).
    cells
        One row per cell with columns ``cell_id``, ``x_centroid``, ``y_centroid`` (µm), ``cell_area``,
        ``nucleus_area`` (µm²) and usually ``transcript_counts``, ``control_probe_counts``,
        ``control_codeword_counts``, ``total_counts``; all columns are written.
    counts
        ``(n_cells, n_features)`` non-negative integer counts, rows in ``cells`` order.
    feature_ids, feature_names, feature_types
        One per feature; types as XOA writes them (``"Gene Expression"``, ``"Negative Control Probe"``,
        ``"Negative Control Codeword"``, ``"Blank Codeword"``, ...).
    transcripts
        Optional, columns ``feature_name``, ``x_location``, ``y_location`` (µm) and optionally ``transcript_id``,
        ``cell_id`` (``"UNASSIGNED"`` when not in a cell), ``overlaps_nucleus``, ``z_location`` (µm), ``qv``.
    morphology
        Optional uint16 ``(y, x)`` DAPI-like image, or ``(c, y, x)`` with 4 channels (DAPI, boundary, interior
        RNA, interior protein stains), pixels of ``pixel_size`` µm, pixel ``(0, 0)`` covering ``[0, pixel_size)²``
        µm. Written as the XOA version writes it (see ``xoa_version``). With ``layout="full"`` and no image, one is
        rendered from the nuclei (discs of ``nucleus_area``).
    pixel_size
        Morphology/label pixel size (µm per pixel), written to ``experiment.xenium`` in the full layout.
    layout
        ``"minimal"``: the cells table, the cell-feature matrix and (if given) transcripts and morphology only, as
        people download them. ``"full"``: a complete XOA >= 2.0 output folder that :func:`spatialdata_io.xenium`
        reads (``experiment.xenium``, ``cells.csv.gz`` + ``cells.parquet``, ``cells.zarr.zip`` with label masks,
        ``cell_feature_matrix.h5`` + ``cell_feature_matrix/``, ``cell_boundaries.parquet``,
        ``nucleus_boundaries.parquet``, ``transcripts.parquet``, morphology image); cell ids must then be genuine
        Xenium ids (see :func:`xenium_cell_ids`) and ``cells_format``/``matrix_format`` are ignored.
    cells_format
        ``"csv.gz"`` (``cells.csv.gz``) or ``"parquet"`` (``cells.parquet``), minimal layout.
    matrix_format
        ``"h5"`` (``cell_feature_matrix.h5``) or ``"mtx"`` (``cell_feature_matrix/``), minimal layout.
    transcripts_format
        ``"parquet"`` (``transcripts.parquet``) or ``"csv.gz"`` (``transcripts.csv.gz``).
    xoa_version
        Xenium Onboard Analysis major version whose file layout is written: ``1`` (``morphology_focus.ome.tif`` and
        ``morphology_mip.ome.tif``, DAPI only; boundaries as ``*.csv.gz``), ``2`` or ``3``
        (``morphology_focus/morphology_focus_0000.ome.tif`` ... one file per channel; boundaries as parquet) or
        ``4`` (``morphology_focus/ch0000_dapi.ome.tif``, ``ch0001_atp1a1_cd45_e-cadherin.ome.tif`` ...). Its
        ``analysis_sw_version`` goes into ``experiment.xenium``. ``layout="full"`` needs ``2`` or ``3``.
    boundaries
        Write ``cell_boundaries`` / ``nucleus_boundaries`` (13-gons of ``cell_area`` / ``nucleus_area``); default:
        with ``layout="full"`` only.
    experiment
        Write ``experiment.xenium``; default: with ``layout="full"`` only.
    overwrite
        Replace a non-empty ``out_dir``.

    Returns
    -------
    The output folder.
    """
    if layout not in ("minimal", "full"):
        raise ValueError(f"layout must be 'minimal' or 'full', got {layout!r}.")
    if cells_format not in ("csv.gz", "parquet"):
        raise ValueError(f"cells_format must be 'csv.gz' or 'parquet', got {cells_format!r}.")
    if matrix_format not in ("h5", "mtx"):
        raise ValueError(f"matrix_format must be 'h5' or 'mtx', got {matrix_format!r}.")
    if transcripts_format not in ("parquet", "csv.gz"):
        raise ValueError(f"transcripts_format must be 'parquet' or 'csv.gz', got {transcripts_format!r}.")
    if xoa_version not in XOA_VERSIONS:
        raise ValueError(f"xoa_version must be one of {sorted(XOA_VERSIONS)}, got {xoa_version!r}.")
    if layout == "full" and xoa_version not in (2, 3):
        raise ValueError(f"layout='full' writes an XOA 2.x/3.x folder (cells.zarr.zip), got xoa_version={xoa_version}.")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be positive (µm per pixel), got {pixel_size}.")
    boundaries = layout == "full" if boundaries is None else bool(boundaries)
    experiment = layout == "full" if experiment is None else bool(experiment)
    cells = _check_cells(cells)
    cell_ids = cells["cell_id"].to_numpy()
    if layout == "full":
        _encode_xenium_cell_ids(cell_ids)  # validate before writing anything
    feature_ids = _as_str_array(feature_ids, "feature_ids")
    mat = _as_counts(counts, len(cells), len(feature_ids))
    if morphology is not None:
        morphology = np.asarray(morphology)
        if morphology.ndim == 2:
            morphology = morphology[None]
        if morphology.ndim != 3 or morphology.shape[0] not in (1, 4):
            raise ValueError(f"morphology must be (y, x) or (c, y, x) with 1 or 4 channels, got {morphology.shape}.")
        morphology = morphology.astype(np.uint16, copy=False)
    tx = _check_transcripts(transcripts) if transcripts is not None else None

    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    sw_version = XOA_VERSIONS[xoa_version]
    h5_kwargs = {
        "genome": "Unknown",
        "library_id": "xenium",
        "chemistry_description": "Xenium",
        "software_version": sw_version,
    }
    mtx_args = (mat, cell_ids, feature_ids, feature_names, feature_types)
    x = cells["x_centroid"].to_numpy(np.float64)
    y = cells["y_centroid"].to_numpy(np.float64)
    cell_r = np.sqrt(np.clip(cells["cell_area"].to_numpy(np.float64), 0, None) / np.pi)
    nuc_r = np.sqrt(np.clip(cells["nucleus_area"].to_numpy(np.float64), 0, None) / np.pi)
    if boundaries:
        fmt = "csv.gz" if xoa_version == 1 else "parquet"
        _write_table(_disc_polygons(cell_ids, x, y, cell_r), out / f"cell_boundaries.{fmt}", fmt)
        _write_table(_disc_polygons(cell_ids, x, y, nuc_r), out / f"nucleus_boundaries.{fmt}", fmt)
    if experiment:
        _write_experiment(out, cells, feature_ids, feature_types, tx, pixel_size, xoa_version)

    if layout == "minimal":
        _write_table(cells, out / f"cells.{cells_format}", cells_format)
        if matrix_format == "h5":
            write_feature_matrix_h5(out / "cell_feature_matrix.h5", *mtx_args, **h5_kwargs)
        else:
            write_feature_matrix_mtx(out / "cell_feature_matrix", *mtx_args, software_version=sw_version)
        if tx is not None:
            _write_table(tx, out / f"transcripts.{transcripts_format}", transcripts_format)
        if morphology is not None:
            _write_morphology(out, morphology, pixel_size, xoa_version)
        return out

    # --- full layout ---------------------------------------------------------------------------------------------
    if morphology is not None:
        shape = morphology.shape[1:]
    else:
        extent_x = float(np.max(x + cell_r, initial=0.0))
        extent_y = float(np.max(y + cell_r, initial=0.0))
        shape = (int(np.ceil(extent_y / pixel_size)) + 1, int(np.ceil(extent_x / pixel_size)) + 1)

    cells_full = cells.copy()
    if "nucleus_count" not in cells_full.columns:
        cells_full["nucleus_count"] = np.uint32(1)
    if "segmentation_method" not in cells_full.columns:
        cells_full["segmentation_method"] = "Segmented by nucleus expansion of 5.0µm"
    _write_table(cells_full, out / "cells.csv.gz", "csv.gz")
    _write_table(cells_full, out / "cells.parquet", "parquet")
    write_feature_matrix_h5(out / "cell_feature_matrix.h5", *mtx_args, **h5_kwargs)
    write_feature_matrix_mtx(out / "cell_feature_matrix", *mtx_args, software_version=sw_version)
    _write_cells_zarr(out / "cells.zarr.zip", cells, shape, pixel_size)
    if tx is None:
        tx = _check_transcripts(pd.DataFrame({c: pd.Series(dtype=float) for c in _TRANSCRIPT_COLUMNS}))
    _write_table(tx, out / "transcripts.parquet", "parquet")
    if transcripts_format == "csv.gz":
        _write_table(tx, out / "transcripts.csv.gz", "csv.gz")
    if morphology is not None:
        _write_morphology(out, morphology, pixel_size, xoa_version)
    else:
        tiles = (
            block
            for _, _, block in _disc_tiles(
                shape,
                x / pixel_size,
                y / pixel_size,
                nuc_r / pixel_size,
                np.full(len(x), 2000.0),
                256,
                np.uint16,
                falloff=True,
            )
        )
        padded = (_pad_tile(b, 256) for b in tiles)
        _write_ome_tiff(_focus_paths(out, 1, xoa_version)[0], None, pixel_size, tiles=padded, shape=shape)
    return out


#: XOA major version -> ``analysis_sw_version`` written by :func:`write_xenium`
XOA_VERSIONS = {1: "xenium-1.9.0.2", 2: "xenium-2.0.0.10", 3: "xenium-3.1.0.4", 4: "xenium-4.0.0.8"}
#: morphology focus channels (XOA >= 2 with the multi-tissue stain) and the file-name stems XOA 4 gives them
FOCUS_CHANNELS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")
_FOCUS_STEMS_V4 = ("dapi", "atp1a1_cd45_e-cadherin", "18s", "alphasma_vimentin")


def _focus_paths(out: Path, n_channels: int, xoa_version: int) -> list[Path]:
    if xoa_version == 1:
        return [out / "morphology_focus.ome.tif"]
    if xoa_version == 4:
        return [out / "morphology_focus" / f"ch{i:04d}_{_FOCUS_STEMS_V4[i]}.ome.tif" for i in range(n_channels)]
    return [out / "morphology_focus" / f"morphology_focus_{i:04d}.ome.tif" for i in range(n_channels)]


def _write_multifile_ome(paths: list[Path], morphology: np.ndarray, pixel_size: float) -> None:
    """One channel per file, as XOA >= 2 writes ``morphology_focus/``: a multi-file OME-TIFF.

    Every file holds one channel's pixels, and its OME-XML describes the whole image (all channels, named), each
    channel's plane referenced by file name and UUID (``TiffData``/``UUID``), so OME readers (tifffile, Bio-Formats,
    spatialdata-io) open the set from any of its files.
    """
    import uuid

    import tifffile

    c, h, w = morphology.shape
    ids = [f"urn:uuid:{uuid.UUID(int=i + 1)}" for i in range(c)]  # fixed: the same folder bytes for a seed
    channels = "".join(
        f'<Channel ID="Channel:0:{i}" Name="{FOCUS_CHANNELS[i]}" SamplesPerPixel="1"/>' for i in range(c)
    )
    data = "".join(
        f'<TiffData FirstC="{i}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1">'
        f'<UUID FileName="{p.name}">{ids[i]}</UUID></TiffData>'
        for i, p in enumerate(paths)
    )
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" UUID="{ids[i]}">'
            '<Image ID="Image:0" Name="morphology_focus"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" '
            f'SizeX="{w}" SizeY="{h}" SizeC="{c}" SizeZ="1" SizeT="1" PhysicalSizeX="{float(pixel_size)}" '
            f'PhysicalSizeY="{float(pixel_size)}">{channels}{data}</Pixels></Image></OME>'
        )
        tifffile.imwrite(
            path,
            np.asarray(morphology[i], np.uint16),
            description=xml,
            metadata=None,
            photometric="minisblack",
            tile=(256, 256),
            compression="zlib",
        )


def _write_morphology(out: Path, morphology: np.ndarray, pixel_size: float, xoa_version: int) -> None:
    """One channel per file of a multi-file OME-TIFF (XOA >= 2) or the DAPI focus + MIP images (XOA 1)."""
    n = 1 if xoa_version == 1 else morphology.shape[0]
    paths = _focus_paths(out, n, xoa_version)
    if n > 1:
        _write_multifile_ome(paths, morphology[:n], pixel_size)
    else:
        _write_ome_tiff(paths[0], morphology[0], pixel_size, channel=FOCUS_CHANNELS[0])
    if xoa_version == 1:
        _write_ome_tiff(out / "morphology_mip.ome.tif", morphology[0], pixel_size)


def _write_experiment(out, cells, feature_ids, feature_types, tx, pixel_size: float, xoa_version: int) -> None:
    types = np.asarray(
        [feature_types] * len(feature_ids) if isinstance(feature_types, str) else feature_types, dtype=str
    )
    n_genes = int(np.sum(types == "Gene Expression"))
    n_tx = 0 if tx is None else len(tx)
    focus = _focus_paths(Path("."), 1, xoa_version)[0].as_posix()
    experiment = {
        "major_version": {1: 3, 2: 5, 3: 5, 4: 6}[xoa_version],
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "spatialdata-align synthetic",
        "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": "synthetic",
        "preservation_method": "ffpe",
        "num_cells": len(cells),
        "transcripts_per_cell": float(n_tx / max(len(cells), 1)),
        "transcripts_per_100um": 0.0,
        "cassette_name": "synthetic",
        "slide_id": "0000000",
        "panel_design_file": "synthetic.json",
        "panel_name": "synthetic",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": n_genes,
        "panel_num_targets_custom": 0,
        "pixel_size": float(pixel_size),
        "instrument_sn": "0000",
        "instrument_sw_version": XOA_VERSIONS[xoa_version].replace("xenium-", ""),
        "analysis_sw_version": XOA_VERSIONS[xoa_version],
        "experiment_uuid": "00000000-0000-0000-0000-000000000000",
        "cassette_uuid": "00000000-0000-0000-0000-000000000000",
        "roi_uuid": "00000000-0000-0000-0000-000000000000",
        "z_step_size": 3.0,
        "well_uuid": "",
        "calibration_uuid": "00000000-0000-0000-0000-000000000000",
        "images": {"morphology_filepath": "morphology.ome.tif", "morphology_focus_filepath": focus},
        "xenium_explorer_files": {
            "transcripts_zarr_filepath": "transcripts.zarr.zip",
            "cells_zarr_filepath": "cells.zarr.zip",
            "cell_features_zarr_filepath": "cell_feature_matrix.zarr.zip",
            "analysis_zarr_filepath": "analysis.zarr.zip",
            "analysis_summary_filepath": "analysis_summary.html",
        },
    }
    (out / "experiment.xenium").write_text(json.dumps(experiment, indent=4))


def _pad_tile(block: np.ndarray, tile: int) -> np.ndarray:
    if block.shape == (tile, tile):
        return block
    out = np.zeros((tile, tile), dtype=block.dtype)
    out[: block.shape[0], : block.shape[1]] = block
    return out


# ----------------------------------------------------------------------------------------------------------------
# Visium
# ----------------------------------------------------------------------------------------------------------------
def _check_rgb(image: Any, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{what} must be (H, W, 3) uint8, got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {arr.dtype}.")
    return arr


def write_visium(
    outs_dir: str | Path,
    *,
    barcodes: Sequence[str],
    in_tissue: Sequence[int],
    array_row: Sequence[int],
    array_col: Sequence[int],
    pxl_row_in_fullres: Sequence[float],
    pxl_col_in_fullres: Sequence[float],
    counts: Any,
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    scalefactors: dict,
    hires_image: np.ndarray | None,
    lowres_image: np.ndarray | None,
    fullres_image: np.ndarray | None = None,
    cytassist_image: np.ndarray | None = None,
    positions_file: str = "tissue_positions.csv",
    matrix_format: str = "h5",
    feature_types: Sequence[str] | str = "Gene Expression",
    fullres_image_file: str = "tissue_image.tif",
    library_id: str = "visium",
    overwrite: bool = False,
) -> Path:
    """Write a Space Ranger ``outs/`` folder (Visium SD / CytAssist layout, Space Ranger 1.x-3.x variants).

    Parameters
    ----------
    outs_dir
        Output folder (created; must be empty or absent unless ``overwrite``).
    barcodes, in_tissue, array_row, array_col
        One entry per spot of the capture area, in and out of tissue (as Space Ranger lists them).
    pxl_row_in_fullres, pxl_col_in_fullres
        Spot centres in full-resolution image pixels: row = y, column = x.
    counts
        ``(n_in_tissue, n_features)`` non-negative integer counts for ``barcodes[in_tissue == 1]`` in that order.
    feature_ids, feature_names
        Gene ids and gene symbols, one per column of ``counts``.
    scalefactors
        ``spot_diameter_fullres`` (full-res px), ``tissue_hires_scalef``, ``tissue_lowres_scalef`` (hires/lowres px
        per full-res px) and usually ``fiducial_diameter_fullres``; written to ``spatial/scalefactors_json.json``.
        With a CytAssist image also ``regist_target_img_scalef`` (CytAssist px per full-res px).
    hires_image, lowres_image
        uint8 ``(H, W, 3)`` images, written to ``spatial/tissue_hires_image.png`` / ``tissue_lowres_image.png``;
        ``None`` leaves one out (folders shared with only some images).
    fullres_image
        Optional uint8 ``(H, W, 3)`` full-resolution image, written as ``outs_dir / fullres_image_file`` (TIFF).
    cytassist_image
        Optional uint8 ``(H, W, 3)`` CytAssist camera image, written as ``spatial/cytassist_image.tiff``.
    positions_file
        ``"tissue_positions.csv"`` (Space Ranger >= 2, with header), ``"tissue_positions_list.csv"`` (Space
        Ranger 1, no header) or ``"tissue_positions.parquet"`` (Space Ranger 3 / Visium HD).
    matrix_format
        ``"h5"`` (``filtered_feature_bc_matrix.h5``) or ``"mtx"`` (``filtered_feature_bc_matrix/``).
    feature_types
        One per feature or one for all.
    fullres_image_file
        File name of the full-resolution image.
    library_id
        Library id stored in the HDF5 attributes.
    overwrite
        Replace a non-empty ``outs_dir``.

    Returns
    -------
    The ``outs`` folder.
    """
    if positions_file not in VISIUM_POSITION_FILES:
        raise ValueError(f"positions_file must be one of {list(VISIUM_POSITION_FILES)}, got {positions_file!r}.")
    if matrix_format not in ("h5", "mtx"):
        raise ValueError(f"matrix_format must be 'h5' or 'mtx', got {matrix_format!r}.")
    needed = ["spot_diameter_fullres"]
    needed += [
        k for k, im in zip(_VISIUM_SCALEFACTOR_KEYS[1:], (hires_image, lowres_image), strict=True) if im is not None
    ]
    needed += ["regist_target_img_scalef"] if cytassist_image is not None else []
    missing = [k for k in needed if k not in scalefactors]
    if missing:
        raise ValueError(f"scalefactors lacks {missing}; it has {sorted(scalefactors)}.")
    barcodes = _as_str_array(barcodes, "barcodes")
    n = len(barcodes)
    if len(set(barcodes)) != n:
        raise ValueError("barcodes must be unique.")
    in_tissue = np.asarray(in_tissue).astype(np.int64)
    if in_tissue.shape != (n,) or not np.isin(in_tissue, (0, 1)).all():
        raise ValueError(f"in_tissue must hold {n} values in {{0, 1}}.")
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": np.asarray(array_row).astype(np.int64),
            "array_col": np.asarray(array_col).astype(np.int64),
            "pxl_row_in_fullres": _maybe_int(np.asarray(pxl_row_in_fullres)),
            "pxl_col_in_fullres": _maybe_int(np.asarray(pxl_col_in_fullres)),
        }
    )
    tissue_bc = barcodes[in_tissue == 1]
    feature_ids = _as_str_array(feature_ids, "feature_ids")
    mat = _as_counts(counts, len(tissue_bc), len(feature_ids), "counts (in-tissue spots x features)")
    images = {
        name: _check_rgb(im, name)
        for name, im in (
            ("hires_image", hires_image),
            ("lowres_image", lowres_image),
            ("fullres_image", fullres_image),
            ("cytassist_image", cytassist_image),
        )
        if im is not None
    }

    from PIL import Image

    out = Path(outs_dir)
    _prepare_dir(out, overwrite)
    spatial = out / "spatial"
    spatial.mkdir()
    mtx_args = (mat, tissue_bc, feature_ids, feature_names, feature_types)
    if matrix_format == "h5":
        write_feature_matrix_h5(out / "filtered_feature_bc_matrix.h5", *mtx_args, library_id=library_id)
    else:
        write_feature_matrix_mtx(out / "filtered_feature_bc_matrix", *mtx_args)
    write_positions(spatial / positions_file, positions)
    (spatial / "scalefactors_json.json").write_text(json.dumps({k: scalefactors[k] for k in scalefactors}))
    # zlib level 1: ~5x faster than PIL's default level 6 on H&E-like images, files ~10 % larger
    for key, file in (("hires_image", "tissue_hires_image.png"), ("lowres_image", "tissue_lowres_image.png")):
        if key in images:
            Image.fromarray(images[key]).save(spatial / file, compress_level=1)
    import tifffile

    if "fullres_image" in images:
        tifffile.imwrite(out / fullres_image_file, images["fullres_image"], photometric="rgb", compression="zlib")
    if "cytassist_image" in images:
        tifffile.imwrite(spatial / "cytassist_image.tiff", images["cytassist_image"], photometric="rgb")
    return out


def write_positions(file: Path, positions: pd.DataFrame) -> Path:
    """Write Space Ranger positions: ``.parquet``, ``tissue_positions.csv`` (header) or ``..._list.csv`` (none)."""
    if file.suffix == ".parquet":
        positions.to_parquet(file, index=False)
    else:
        positions.to_csv(file, index=False, header=file.name == "tissue_positions.csv")
    return file


def _maybe_int(values: np.ndarray) -> np.ndarray:
    """Integers stay integers on disk (Space Ranger writes integer pixel positions); other floats are exact."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    values = values.astype(np.float64)
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


# ----------------------------------------------------------------------------------------------------------------
# Visium HD
# ----------------------------------------------------------------------------------------------------------------
def hd_barcodes(bin_size: int, array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Visium HD bin barcodes as Space Ranger writes them: ``s_008um_00012_00345-1`` (size, row, column)."""
    rows = np.char.zfill(np.asarray(array_row).astype(str), 5)
    cols = np.char.zfill(np.asarray(array_col).astype(str), 5)
    return np.char.add(np.char.add(np.char.add(f"s_{int(bin_size):03d}um_", rows), "_"), np.char.add(cols, "-1"))


def write_visium_hd(
    outs_dir: str | Path,
    *,
    bins: dict[int, dict],
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    scalefactors: dict,
    hires_image: np.ndarray | None,
    lowres_image: np.ndarray | None,
    cytassist_image: np.ndarray | None = None,
    feature_slice: bool = False,
    library_id: str = "visium_hd",
    overwrite: bool = False,
) -> Path:
    """Write a Space Ranger (>= 3) Visium HD ``outs/`` folder.

    Layout: ``binned_outputs/square_<size>um/`` for each bin size with ``filtered_feature_bc_matrix.h5``,
    ``spatial/tissue_positions.parquet`` (``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
    pxl_col_in_fullres``), ``spatial/scalefactors_json.json`` (``spot_diameter_fullres = bin_size_um /
    microns_per_pixel``, ``bin_size_um``, ``microns_per_pixel`` and the image scale factors) and the images; the same
    images and the 2 µm scale factors also in ``outs/spatial/``.

    Parameters
    ----------
    outs_dir
        Output folder (created; must be empty or absent unless ``overwrite``).
    bins
        ``{bin_size_um: {"array_row", "array_col", "in_tissue", "pxl_row_in_fullres", "pxl_col_in_fullres",
        "counts"}}``: every bin of the capture area at that size, and the ``(n_in_tissue, n_features)`` counts of the
        in-tissue bins in that order. Barcodes are made from the size, row and column (:func:`hd_barcodes`).
    feature_ids, feature_names
        Gene ids and symbols, one per column of the counts.
    scalefactors
        ``microns_per_pixel``, ``tissue_hires_scalef``, ``tissue_lowres_scalef`` (and e.g.
        ``regist_target_img_scalef``, ``fiducial_diameter_fullres``).
    hires_image, lowres_image, cytassist_image
        uint8 ``(H, W, 3)`` images (``None`` leaves one out).
    feature_slice
        Also write ``feature_slice.h5`` with the metadata :func:`spatialdata_io.visium_hd` needs (file format, and
        transforms placing the CytAssist image with ``regist_target_img_scalef``); a download of the binned outputs
        alone has no such file.
    library_id
        Library id stored in the HDF5 attributes.
    overwrite
        Replace a non-empty ``outs_dir``.

    Returns
    -------
    The ``outs`` folder.
    """
    if "microns_per_pixel" not in scalefactors:
        raise ValueError(f"scalefactors lacks 'microns_per_pixel'; it has {sorted(scalefactors)}.")
    from PIL import Image

    images = {
        name: _check_rgb(im, name)
        for name, im in (("hires", hires_image), ("lowres", lowres_image), ("cytassist", cytassist_image))
        if im is not None
    }
    out = Path(outs_dir)
    _prepare_dir(out, overwrite)
    upp = float(scalefactors["microns_per_pixel"])

    def spatial_folder(folder: Path, bin_size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        sf = dict(scalefactors, bin_size_um=float(bin_size), spot_diameter_fullres=bin_size / upp)
        (folder / "scalefactors_json.json").write_text(json.dumps(sf))
        for key, file in (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png")):
            if key in images:
                Image.fromarray(images[key]).save(folder / file)
        if "cytassist" in images:
            import tifffile

            tifffile.imwrite(folder / "cytassist_image.tiff", images["cytassist"], photometric="rgb")

    spatial_folder(out / "spatial", min(bins))
    grid = None
    for size, b in sorted(bins.items()):
        folder = out / "binned_outputs" / f"square_{int(size):03d}um"
        barcodes = hd_barcodes(size, b["array_row"], b["array_col"])
        in_tissue = np.asarray(b["in_tissue"]).astype(np.int64)
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": in_tissue.astype(np.int32),
                "array_row": np.asarray(b["array_row"]).astype(np.int32),
                "array_col": np.asarray(b["array_col"]).astype(np.int32),
                "pxl_row_in_fullres": np.asarray(b["pxl_row_in_fullres"], dtype=np.float64),
                "pxl_col_in_fullres": np.asarray(b["pxl_col_in_fullres"], dtype=np.float64),
            }
        )
        spatial_folder(folder / "spatial", size)
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        tissue_bc = barcodes[in_tissue == 1]
        mat = _as_counts(b["counts"], len(tissue_bc), len(feature_ids), f"counts of the {size} µm bins")
        write_feature_matrix_h5(
            folder / "filtered_feature_bc_matrix.h5",
            mat,
            tissue_bc,
            feature_ids,
            feature_names,
            "Gene Expression",
            library_id=library_id,
            chemistry_description="Visium HD v1",
            software_version="spaceranger-3.1.2",
        )
        if grid is None:  # (array col, row) -> full-res px of the finest bins, for feature_slice.h5
            A = np.column_stack([positions["array_col"], positions["array_row"], np.ones(len(positions))])
            sol = np.linalg.lstsq(A, positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), rcond=None)
            grid = np.vstack([sol[0].T, [0.0, 0.0, 1.0]])
    if feature_slice:
        _write_feature_slice(out / "feature_slice.h5", grid, scalefactors)
    return out


def _write_feature_slice(path: Path, grid: np.ndarray, scalefactors: dict) -> None:
    """``feature_slice.h5`` holding only the metadata :func:`spatialdata_io.visium_hd` reads (no feature slices)."""
    s = float(scalefactors.get("regist_target_img_scalef", scalefactors["tissue_hires_scalef"]))
    cyt_to_px = np.diag([1.0 / s, 1.0 / s, 1.0])  # CytAssist image px -> full-resolution px
    cyt_to_spot = np.linalg.inv(grid) @ cyt_to_px
    matrices = {
        "cytassist_colrow_to_spot_colrow": cyt_to_spot,
        "spot_colrow_to_cytassist_colrow": np.linalg.inv(cyt_to_spot),
        "microscope_colrow_to_spot_colrow": np.linalg.inv(grid),
        "spot_colrow_to_microscope_colrow": grid,
    }
    metadata = {
        "hd_layout_json": json.dumps({"file_format": "1.0", "transform": np.eye(3).ravel().tolist()}),
        "transform_matrices": {k: np.asarray(v).ravel().tolist() for k, v in matrices.items()},
    }
    with h5py.File(path, "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
