"""Visium reader: a Space Ranger ``outs/`` folder (SD and CytAssist) read by this package's own code."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

from .._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_FULLRES,
    VISIUM_HIRES,
    VISIUM_LOWRES,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOTS,
    VISIUM_TABLE,
)
from ._files import check_folder, find_first, missing
from ._matrix import read_feature_matrix
from ._xenium import gene_var

__all__ = ["read_visium", "visium_scalefactors"]

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_SCALEFACTORS = "scalefactors_json.json"
_SCALEFACTOR_KEYS = ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef")
_MATRIX_H5 = "filtered_feature_bc_matrix.h5"
_MATRIX_DIR = "filtered_feature_bc_matrix"
_HIRES = "tissue_hires_image.png"
_LOWRES = "tissue_lowres_image.png"
_FULLRES_SUFFIXES = (".tif", ".tiff", ".btf")
#: Full-resolution images larger than this (pixels, either side) are read as a multiscale pyramid.
_MULTISCALE_ABOVE = 4096


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def _find_counts(path: Path, counts_file: str | Path | None) -> Path:
    if counts_file is not None:
        p = Path(counts_file)
        p = p if p.is_absolute() else path / p
        if not p.exists():
            raise missing(p.parent, "Visium counts", [p.name])
        return p
    found = find_first(path, (_MATRIX_H5,))
    if found is None:
        prefixed = sorted(path.glob(f"*_{_MATRIX_H5}"))
        found = prefixed[0] if len(prefixed) == 1 else None
    found = found or find_first(path, (_MATRIX_DIR,), dirs=True)
    if found is None:
        raise missing(path, "Visium counts", (_MATRIX_H5, f"<id>_{_MATRIX_H5}", _MATRIX_DIR + "/"))
    return found


def read_positions(file: str | Path) -> pd.DataFrame:
    """Read ``tissue_positions.csv`` (header) or ``tissue_positions_list.csv`` (no header; a header is detected).

    Returns a DataFrame with the six Space Ranger columns (``barcode`` as ``str``, ``in_tissue`` / ``array_row`` /
    ``array_col`` as ``int64``, ``pxl_row_in_fullres`` (y) / ``pxl_col_in_fullres`` (x) in full-resolution pixels as
    ``float64``), in file order.

    Raises
    ------
    ValueError
        The file is empty, has the wrong number of columns, missing or non-numeric values, ``in_tissue`` values other
        than 0/1, or duplicated barcodes.
    """
    file = Path(file)
    try:
        with open(file, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} could not be read as text ({type(e).__name__}: {e}).") from None
    if not first.strip():
        raise ValueError(f"{file} is empty.")
    has_header = "in_tissue" in first or "barcode" in first
    try:
        df = pd.read_csv(file, header=0 if has_header else None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not a readable CSV file ({type(e).__name__}: {e}).") from None
    if df.shape[1] != len(POSITION_COLUMNS):
        raise ValueError(
            f"{file} has {df.shape[1]} column(s), expected {len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}."
        )
    if has_header:
        lacking = [c for c in POSITION_COLUMNS if c not in df.columns]
        if lacking:
            raise ValueError(f"{file}: header lacks {lacking}; it has {list(df.columns)}.")
        df = df[list(POSITION_COLUMNS)]
    else:
        df.columns = list(POSITION_COLUMNS)
    if len(df) == 0:
        raise ValueError(f"{file} lists no spots.")
    out = pd.DataFrame({"barcode": df["barcode"].astype(str).str.strip().to_numpy()})
    for col in POSITION_COLUMNS[1:]:
        vals = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = vals.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{file}: column {col!r} has {int(bad.sum())} missing or non-numeric value(s) "
                f"(first at data row {row + 1}: {df[col].iloc[row]!r})."
            )
        if col.startswith("pxl_"):
            out[col] = vals.astype(np.float64).to_numpy()
        else:
            if not np.all(vals == np.round(vals)):
                raise ValueError(f"{file}: column {col!r} must hold integers.")
            out[col] = vals.astype(np.int64).to_numpy()
    if not out["in_tissue"].isin((0, 1)).all():
        raise ValueError(f"{file}: 'in_tissue' must be 0 or 1, found {sorted(out['in_tissue'].unique())[:5]}.")
    if not out["barcode"].is_unique:
        dup = out["barcode"][out["barcode"].duplicated()].unique()
        raise ValueError(f"{file}: {len(dup)} barcode(s) are listed more than once (e.g. {list(dup[:3])}).")
    return out


def read_scalefactors(file: str | Path) -> dict:
    """Read ``scalefactors_json.json``; checks ``spot_diameter_fullres`` and the hires/lowres scale factors.

    Raises
    ------
    ValueError
        Invalid JSON, a missing key, or a value that is not a positive number.
    """
    file = Path(file)
    try:
        sf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(sf, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(sf).__name__}.")
    lacking = [k for k in _SCALEFACTOR_KEYS if k not in sf]
    if lacking:
        raise ValueError(f"{file} lacks {lacking}; it has {sorted(sf)}.")
    out = {}
    for k, v in sf.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            if k in _SCALEFACTOR_KEYS:
                raise ValueError(f"{file}: {k!r} must be a number, found {v!r}.")
            continue  # keep only numeric entries (all Space Ranger scale factors are numbers)
        out[k] = float(v)
    for k in _SCALEFACTOR_KEYS:
        if not (np.isfinite(out[k]) and out[k] > 0):
            raise ValueError(f"{file}: {k!r} must be a positive number, found {out[k]}.")
    return out


def _read_png(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{file} could not be read as an image ({type(e).__name__}: {e}).") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _image(arr: Any, transform, scale_factors=None):
    c = arr.shape[0]
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"] if c == 3 else None,
        scale_factors=scale_factors,
        transformations={VISIUM_CS: transform},
    )


def _find_fullres(path: Path, fullres_image: str | Path | bool | None) -> Path | None:
    if fullres_image is None or fullres_image is False:
        return None
    if fullres_image == "auto":
        cands = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _FULLRES_SUFFIXES)
        if len(cands) > 1:
            warnings.warn(
                f"{len(cands)} candidate full-resolution images in {path} ({[p.name for p in cands]}); none read. "
                "Pass fullres_image=<file> to choose one.",
                stacklevel=3,
            )
            return None
        return cands[0] if cands else None
    p = Path(fullres_image)
    p = p if p.is_absolute() else path / p
    if not p.is_file():
        raise missing(p.parent, "Visium full-resolution image", [p.name])
    return p


def _read_fullres(file: Path):
    from dask_image.imread import imread

    try:
        im = imread(str(file))
    except Exception as e:  # the image libraries raise many types
        raise ValueError(f"{file} could not be read as an image ({type(e).__name__}: {e}).") from None
    if im.ndim == 4 and im.shape[0] == 1:
        im = im[0]
    if im.ndim == 2:
        im = im[None]
    if im.ndim != 3:
        raise ValueError(f"{file}: unsupported image shape {im.shape}.")
    if int(np.argmin(im.shape)) == 2:  # (y, x, c) -> (c, y, x)
        im = im.transpose(2, 0, 1)
    elif int(np.argmin(im.shape)) != 0:
        raise ValueError(f"{file}: unsupported image shape {im.shape}.")
    big = max(im.shape[1:]) > _MULTISCALE_ABOVE
    return _image(im, Identity(), scale_factors=[2, 2, 2, 2] if big else None)


# ----------------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------------
def read_visium(
    path: str | Path,
    *,
    counts_file: str | Path | None = None,
    images: bool = True,
    fullres_image: str | Path | bool | None = "auto",
    gex_only: bool = True,
) -> SpatialData:
    """Read a Space Ranger ``outs/`` folder (Visium SD or CytAssist) into SpatialData (cs ``visium``, full-res px).

    Reads ``filtered_feature_bc_matrix.h5`` (or ``<id>_filtered_feature_bc_matrix.h5`` or the
    ``filtered_feature_bc_matrix/`` Matrix Market folder), ``spatial/tissue_positions.csv`` (with header, Space
    Ranger >= 2) or ``spatial/tissue_positions_list.csv`` (no header, Space Ranger 1),
    ``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png`` and
    an optional full-resolution image. Inputs on disk are never modified.

    Parameters
    ----------
    path
        The ``outs/`` folder (or the run folder that holds ``outs/``).
    counts_file
        Counts to read instead of the filtered matrix (e.g. ``"raw_feature_bc_matrix.h5"``), relative to ``path``.
    images
        Read the hires and lowres images (then both are required).
    fullres_image
        Full-resolution image: ``"auto"`` reads the single ``.tif`` / ``.tiff`` / ``.btf`` file directly in
        ``path`` if there is exactly one; a file name (relative to ``path``) or path reads that file; ``None`` or
        ``False`` reads none.
    gex_only
        Keep only ``"Gene Expression"`` features (drops e.g. antibody capture) when the matrix has any.

    Returns
    -------
    A SpatialData object with, in coordinate system ``visium`` (full-resolution pixels):

    * ``visium_spots``: one circle per matrix barcode at (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``),
      radius ``spot_diameter_fullres / 2`` px, index = barcode, row-for-row with the table;
    * ``visium_table``: spots x genes AnnData, CSR integer counts, ``var_names`` = gene symbols (made unique with
      ``-1``, ``-2`` only when duplicated; ``var['gene_symbols']`` un-suffixed, ``var['gene_ids']``,
      ``var['feature_types']``); obs = the six tissue-position columns plus ``region`` / ``instance_id``
      (= barcode) annotating ``visium_spots``; ``obsm['spatial']`` = (x, y) full-res px;
      ``uns['visium']`` = ``{'scalefactors': {...}, 'um_per_px': 55 / spot_diameter_fullres, ...}`` (see
      :func:`visium_scalefactors`);
    * ``visium_hires_image`` / ``visium_lowres_image``: uint8 (c, y, x) RGB mapped to ``visium`` by
      ``Scale(1 / scalef)`` (hires pixel (i, j) covers full-res x in [j / s, (j + 1) / s));
    * ``visium_fullres_image`` (if found): Identity to ``visium``; multiscale when larger than 4096 px.

    Raises
    ------
    FileNotFoundError
        The folder, the counts, the ``spatial/`` folder, the positions file, ``scalefactors_json.json`` or (with
        ``images``) an image is missing; the message names it and lists what the folder holds.
    ValueError
        A malformed CSV/HDF5/JSON/PNG (named, with the problem), or matrix barcodes absent from the positions file
        (with counts).
    """
    path = check_folder(path, "Space Ranger outs")
    if not (path / "spatial").is_dir() and (path / "outs").is_dir():
        path = path / "outs"
    counts_path = _find_counts(path, counts_file)
    spatial = path / "spatial"
    if not spatial.is_dir():
        raise missing(path, "Space Ranger spatial folder", ["spatial/"])
    pos_file = find_first(spatial, _POSITION_FILES)
    if pos_file is None:
        raise missing(spatial, "Visium tissue positions", _POSITION_FILES)
    sf_file = spatial / _SCALEFACTORS
    if not sf_file.is_file():
        raise missing(spatial, "Visium scale factors", [_SCALEFACTORS])
    image_files = {}
    if images:
        for name, fname in ((VISIUM_HIRES, _HIRES), (VISIUM_LOWRES, _LOWRES)):
            if not (spatial / fname).is_file():
                raise missing(spatial, f"Visium image (or pass images=False) for {name}", [fname])
            image_files[name] = spatial / fname
    full_file = _find_fullres(path, fullres_image)

    positions = read_positions(pos_file)
    scalefactors = read_scalefactors(sf_file)
    mat = read_feature_matrix(counts_path)
    features, counts = mat.features, mat.counts
    if gex_only:
        gex = (features["feature_type"] == "Gene Expression").to_numpy()
        if gex.any() and not gex.all():
            features, counts = features.loc[gex].reset_index(drop=True), counts[:, np.flatnonzero(gex)]

    pos_index = pd.Index(positions["barcode"])
    rows = pos_index.get_indexer(mat.barcodes)
    absent = rows < 0
    if absent.any():
        raise ValueError(
            f"{int(absent.sum())} of {len(rows)} barcodes of {counts_path.name} are not in {pos_file.name} "
            f"({len(positions)} barcodes there; e.g. {list(mat.barcodes[absent][:3])}): the matrix and the positions "
            "do not come from the same Space Ranger run."
        )
    obs = positions.iloc[rows].reset_index(drop=True)
    if counts_path.name.startswith(_MATRIX_DIR) or counts_path.name.endswith(_MATRIX_H5):
        n_out = int((obs["in_tissue"] == 0).sum())
        n_missing = int(positions["in_tissue"].sum()) - (len(obs) - n_out)
        if n_out or n_missing:
            warnings.warn(
                f"{counts_path.name} should hold exactly the in-tissue spots of {pos_file.name}: {n_out} of its "
                f"barcodes are out of tissue and {n_missing} in-tissue spots are absent.",
                stacklevel=2,
            )
    barcodes = obs["barcode"].to_numpy().astype(str)
    obs.index = pd.Index(barcodes)
    obs[REGION_KEY] = pd.Categorical([VISIUM_SPOTS] * len(obs))
    obs[INSTANCE_KEY] = barcodes
    xy = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    um_per_px = VISIUM_SPOT_DIAMETER_UM / scalefactors["spot_diameter_fullres"]
    uns = {
        "scalefactors": scalefactors,
        "um_per_px": float(um_per_px),
        "spot_diameter_um": float(VISIUM_SPOT_DIAMETER_UM),
        "positions_file": pos_file.name,
        "counts_file": counts_path.name,
        "path": str(path),
    }
    lib = mat.attrs.get("library_ids")
    if isinstance(lib, list) and lib:
        uns["library_id"] = str(lib[0])
    table = ad.AnnData(X=counts, obs=obs, var=gene_var(features), obsm={SPATIAL_KEY: xy}, uns={UNS_VISIUM_KEY: uns})
    table = TableModel.parse(table, region=VISIUM_SPOTS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    spots = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), scalefactors["spot_diameter_fullres"] / 2.0),
        index=pd.Index(barcodes),
        transformations={VISIUM_CS: Identity()},
    )
    imgs = {}
    for name, file in image_files.items():
        s = scalefactors["tissue_hires_scalef" if name == VISIUM_HIRES else "tissue_lowres_scalef"]
        imgs[name] = _image(_read_png(file), Scale([1.0 / s, 1.0 / s], axes=("x", "y")))
    if full_file is not None:
        imgs[VISIUM_FULLRES] = _read_fullres(full_file)
    return SpatialData(images=imgs, shapes={VISIUM_SPOTS: spots}, tables={VISIUM_TABLE: table})


def visium_scalefactors(sdata: SpatialData | ad.AnnData) -> dict:
    """Scale factors of the Visium data in ``sdata``, plus ``um_per_px``.

    Parameters
    ----------
    sdata
        A SpatialData object holding ``visium_table`` (as :func:`read_visium` makes it), or that table itself.

    Returns
    -------
    ``{'spot_diameter_fullres': full-res px, 'tissue_hires_scalef': hires px per full-res px,
    'tissue_lowres_scalef': lowres px per full-res px, 'fiducial_diameter_fullres': ..., 'um_per_px': µm per
    full-res px}`` (floats; whatever scale factors Space Ranger wrote).

    Raises
    ------
    ValueError
        No ``visium_table`` or no ``uns['visium']`` scale factors in it.
    """
    if isinstance(sdata, ad.AnnData):
        table = sdata
    else:
        if VISIUM_TABLE not in sdata.tables:
            raise ValueError(
                f"no table {VISIUM_TABLE!r} in this SpatialData (tables: {sorted(sdata.tables)}); read the Visium "
                "data with sda.io.read_visium or sda.io.read_pair."
            )
        table = sdata.tables[VISIUM_TABLE]
    node = table.uns.get(UNS_VISIUM_KEY)
    if not isinstance(node, dict):
        raise ValueError(f"{VISIUM_TABLE}.uns has no {UNS_VISIUM_KEY!r} entry (uns keys: {sorted(table.uns)}).")
    sf = node.get("scalefactors", node)
    if not isinstance(sf, dict) or "tissue_hires_scalef" not in sf:
        raise ValueError(f"{VISIUM_TABLE}.uns[{UNS_VISIUM_KEY!r}] holds no scale factors (keys: {sorted(node)}).")
    out = {k: float(v) for k, v in sf.items() if np.ndim(v) == 0 and not isinstance(v, str)}
    if "um_per_px" in node:
        out["um_per_px"] = float(node["um_per_px"])
    elif "spot_diameter_fullres" in out:
        out["um_per_px"] = VISIUM_SPOT_DIAMETER_UM / out["spot_diameter_fullres"]
    return out
