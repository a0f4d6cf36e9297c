"""Visium reader: a Space Ranger ``outs/`` folder (SD, CytAssist; Space Ranger 1.x-3.x) read by our own code."""

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

from .._checks import check_finite, check_folder_modality, check_visium_geometry
from .._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_CYTASSIST,
    VISIUM_FULLRES,
    VISIUM_HD_TABLE,
    VISIUM_HIRES,
    VISIUM_LOWRES,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    VISIUM_TARGET_ORDER,
)
from ._files import TIFF_SUFFIXES, check_folder, find_first, folder_listing, lazy_image, missing
from ._matrix import features_of, read_feature_matrix
from ._xenium import gene_var

__all__ = ["read_visium", "registration_target", "spatial_uns", "visium_scalefactors"]

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_SCALEFACTORS = "scalefactors_json.json"
#: the only scale factor every folder needs (it gives µm per full-resolution pixel); the others are needed only
#: by the image they place
_REQUIRED_SCALEFACTORS = ("spot_diameter_fullres",)
_MATRIX_H5 = "filtered_feature_bc_matrix.h5"
_MATRIX_DIR = "filtered_feature_bc_matrix"
#: images in ``spatial/``: element -> (file, scale factor key giving image pixels per full-resolution pixel,
#: ``uns['spatial']`` image key)
SPATIAL_IMAGES = {
    VISIUM_HIRES: ("tissue_hires_image.png", "tissue_hires_scalef", "hires"),
    VISIUM_LOWRES: ("tissue_lowres_image.png", "tissue_lowres_scalef", "lowres"),
    VISIUM_CYTASSIST: ("cytassist_image.tiff", "regist_target_img_scalef", None),
}
#: full-resolution images get pyramid levels down to at most this many pixels on their long side, so that the
#: registration (which reads the finest level with at most ~4 Mpx) gets a downsampled image, not the full one
_PYRAMID_TOP_PX = 2048


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


def _raw_positions(file: Path) -> tuple[pd.DataFrame, bool]:
    """The positions file as strings (CSV) or as stored (parquet), and whether it named its columns."""
    if file.suffix == ".parquet":
        try:
            df = pd.read_parquet(file)
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise ValueError(f"{file} is not a readable parquet file ({type(e).__name__}: {e}).") from None
        return df, True
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
    return df, has_header


def read_positions(file: str | Path) -> pd.DataFrame:
    """Read Space Ranger spot / bin positions, any version.

    ``tissue_positions_list.csv`` (Space Ranger 1, no header; a header is detected), ``tissue_positions.csv``
    (Space Ranger >= 2, header) or ``tissue_positions.parquet`` (Visium HD, some Space Ranger 3 outputs).

    Returns a DataFrame with the six Space Ranger columns (``barcode`` as ``str``, ``in_tissue`` / ``array_row`` /
    ``array_col`` as ``int64``, ``pxl_row_in_fullres`` (y) / ``pxl_col_in_fullres`` (x) in full-resolution pixels as
    ``float64``), in file order.

    Raises
    ------
    ValueError
        The file is empty or unreadable, has the wrong columns, missing or non-numeric values, ``in_tissue`` values
        other than 0/1, or duplicated barcodes.
    """
    file = Path(file)
    df, named = _raw_positions(file)
    if named:
        lacking = [c for c in POSITION_COLUMNS if c not in df.columns]
        if lacking:
            raise ValueError(f"{file}: columns {lacking} are missing; it has {list(df.columns)}.")
        df = df[list(POSITION_COLUMNS)]
    elif df.shape[1] != len(POSITION_COLUMNS):
        raise ValueError(
            f"{file} has {df.shape[1]} column(s), expected {len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}."
        )
    else:
        df.columns = list(POSITION_COLUMNS)
    if len(df) == 0:
        raise ValueError(f"{file} lists no spots.")
    bc = df["barcode"]
    if len(bc) and isinstance(bc.iloc[0], bytes):
        bc = bc.str.decode("utf-8")
    out = pd.DataFrame({"barcode": bc.astype(str).str.strip().to_numpy()})
    for col in POSITION_COLUMNS[1:]:
        raw = df[col]
        vals = pd.to_numeric(raw.str.strip() if raw.dtype == object else raw, errors="coerce")
        bad = vals.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{file}: column {col!r} has {int(bad.sum())} missing or non-numeric value(s) "
                f"(first at data row {row + 1}: {raw.iloc[row]!r})."
            )
        if col.startswith("pxl_"):
            out[col] = vals.astype(np.float64).to_numpy()
        else:
            if not np.all(vals == np.round(vals)):
                raise ValueError(f"{file}: column {col!r} must hold integers.")
            out[col] = vals.astype(np.int64).to_numpy()
    check_finite(out, file, ("pxl_col_in_fullres", "pxl_row_in_fullres"), ids=out["barcode"], what="pixel positions")
    if not out["in_tissue"].isin((0, 1)).all():
        raise ValueError(
            f"{file}: 'in_tissue' must be 0 or 1, found {sorted(int(v) for v in out['in_tissue'].unique())[:5]}."
        )
    if not out["barcode"].is_unique:
        dup = out["barcode"][out["barcode"].duplicated()].unique()
        raise ValueError(f"{file}: {len(dup)} barcode(s) are listed more than once (e.g. {[str(v) for v in dup[:3]]}).")
    return out


def read_scalefactors(file: str | Path, require: tuple[str, ...] = _REQUIRED_SCALEFACTORS) -> dict:
    """Read ``scalefactors_json.json``: every numeric entry, checked positive.

    Space Ranger writes ``spot_diameter_fullres``, ``tissue_hires_scalef``, ``tissue_lowres_scalef``,
    ``fiducial_diameter_fullres``, CytAssist runs ``regist_target_img_scalef``, Visium HD ``microns_per_pixel`` and
    ``bin_size_um``. Only ``require`` (default ``spot_diameter_fullres``) must be present; an image's scale factor
    is checked where that image is read.

    Raises
    ------
    ValueError
        Invalid JSON, a missing required key, or a scale factor that is not a positive number.
    """
    file = Path(file)
    try:
        sf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(sf, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(sf).__name__}.")
    lacking = [k for k in require if k not in sf]
    if lacking:
        raise ValueError(f"{file} lacks {lacking}; it has {sorted(sf)}.")
    out = {}
    for k, v in sf.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            if k in require or k.endswith(("_scalef", "_fullres")):
                raise ValueError(f"{file}: {k!r} must be a number, found {v!r}.")
            continue  # keep only numeric entries (all Space Ranger scale factors are numbers)
        out[k] = float(v)
        if not (np.isfinite(out[k]) and out[k] > 0) and (k in require or k.endswith(("_scalef", "_fullres"))):
            raise ValueError(f"{file}: {k!r} must be a positive number, found {out[k]}.")
    return out


def _read_rgb(file: Path) -> np.ndarray:
    """A small image file (PNG, JPEG, TIFF) as uint8 ``(c, y, x)`` RGB (16-bit grey is rescaled to 8 bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{file} could not be read as an image ({type(e).__name__}: {e}).") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def pyramid_levels(shape) -> list[int] | None:
    """Scale factors (2 each) bringing an image's long side to at most ~2000 px, or None when it already is.

    The registration reads the finest level with at most ~4 Mpx; without levels a large image (a full-resolution
    scan, or a Visium HD hires image of several thousand pixels) would be registered at full size.
    """
    long = max(shape[-2:])
    return [2] * int(np.ceil(np.log2(long / _PYRAMID_TOP_PX))) if long > _PYRAMID_TOP_PX else None


def _image(arr: Any, transform, scale_factors=None):
    c = arr.shape[0]
    scale_factors = scale_factors if scale_factors is not None else pyramid_levels(arr.shape)
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"] if c == 3 else None,
        scale_factors=scale_factors,
        transformations={VISIUM_CS: transform},
    )


def spatial_images(
    spatial: Path, scalefactors: dict, sf_file: Path, *, names=tuple(SPATIAL_IMAGES), what: str = "Visium"
) -> dict[str, np.ndarray]:
    """Read whichever of the ``spatial/`` images exist (``(c, y, x)`` uint8); warn once about the missing ones.

    An image present without its scale factor is a ``ValueError`` naming both files; a missing hires or lowres
    image is a warning listing what the folder holds (the alignment then registers onto the best image left, see
    :func:`registration_target`).
    """
    out = {}
    for name in names:
        fname, key, _ = SPATIAL_IMAGES[name]
        file = spatial / fname
        if not file.is_file():
            continue
        if key not in scalefactors:
            raise ValueError(
                f"{sf_file} lacks [{key!r}], needed to place {fname} (image pixels per full-resolution pixel); "
                f"it has {sorted(scalefactors)}."
            )
        out[name] = _read_rgb(file)
    lacking = [SPATIAL_IMAGES[n][0] for n in (VISIUM_HIRES, VISIUM_LOWRES) if n in names and n not in out]
    if lacking:
        found = [SPATIAL_IMAGES[n][0] for n in out]
        warnings.warn(
            f"{what} folder {spatial.parent}: {' and '.join(lacking)} not found in spatial/ (it holds: "
            f"{folder_listing(spatial)}); read {', '.join(found) if found else 'no spatial/ image'}.",
            stacklevel=3,
        )
    return out


def spatial_image_elements(images: dict[str, np.ndarray], scalefactors: dict) -> dict:
    """Image elements of :func:`spatial_images`, each mapped to ``visium`` by ``Scale(1 / scale factor)``."""
    out = {}
    for name, arr in images.items():
        s = scalefactors[SPATIAL_IMAGES[name][1]]
        out[name] = _image(arr, Scale([1.0 / s, 1.0 / s], axes=("x", "y")))
    return out


def spatial_uns(library_id: str, images: dict[str, np.ndarray], scalefactors: dict, metadata: dict | None = None):
    """``uns['spatial']`` in the scanpy/squidpy layout: ``{library_id: {'images', 'scalefactors', 'metadata'}}``.

    ``images`` maps image element names (or ``'hires'`` / ``'lowres'``) to ``(c, y, x)`` arrays; the hires and
    lowres images go in as ``'hires'`` / ``'lowres'`` ``(y, x, c)`` views (no copy), so :func:`scanpy.pl.spatial`
    and ``squidpy.pl.spatial_scatter`` draw ``obsm['spatial']`` (full-resolution pixels) on them with their
    ``tissue_<res>_scalef``.
    """
    imgs = {}
    for name, arr in images.items():
        key = SPATIAL_IMAGES[name][2] if name in SPATIAL_IMAGES else name if name in ("hires", "lowres") else None
        if key is not None:
            imgs[key] = np.asarray(arr).transpose(1, 2, 0)
    return {
        str(library_id): {
            "images": imgs,
            "scalefactors": {k: float(v) for k, v in scalefactors.items()},
            "metadata": {k: str(v) for k, v in (metadata or {}).items()},
        }
    }


def _find_fullres(path: Path, fullres_image: str | Path | bool | None) -> Path | None:
    if fullres_image is None or fullres_image is False:
        return None
    if fullres_image == "auto":
        cands = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
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
    im = lazy_image(file)
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
    return _image(im, Identity())


def _library_id(path: Path, mat: ad.AnnData) -> str:
    """Space Ranger's library id (HDF5 ``library_ids``), else the run folder's name."""
    lib = mat.uns.get("library_id")
    if lib:
        return str(lib)
    return path.parent.name if path.name == "outs" and path.parent.name else path.name


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
    """Read a Space Ranger ``outs/`` folder (Visium SD or CytAssist, Space Ranger 1.x-3.x) into SpatialData.

    Needs three things, and raises a clear error naming the file only when one is missing: the counts
    (``filtered_feature_bc_matrix.h5``, ``<id>_filtered_feature_bc_matrix.h5`` or the ``filtered_feature_bc_matrix/``
    Matrix Market folder, read with :func:`scanpy.read_10x_h5` / :func:`scanpy.read_10x_mtx`), the spot positions
    (``spatial/tissue_positions.parquet``, ``spatial/tissue_positions.csv`` or, Space Ranger 1,
    ``spatial/tissue_positions_list.csv``) and ``spatial/scalefactors_json.json`` (with ``spot_diameter_fullres``).
    Whichever images exist are read, each placed by its scale factor: ``spatial/tissue_hires_image.png``,
    ``spatial/tissue_lowres_image.png``, the CytAssist camera image ``spatial/cytassist_image.tiff``
    (``regist_target_img_scalef``; Space Ranger registers a CytAssist-only run onto it) and a full-resolution
    microscope image next to ``spatial/``. A missing hires or lowres image is a warning that lists what was found.
    Inputs on disk are never modified.

    Parameters
    ----------
    path
        The ``outs/`` folder (or the run folder that holds ``outs/``).
    counts_file
        Counts to read instead of the filtered matrix (e.g. ``"raw_feature_bc_matrix.h5"``), relative to ``path``.
    images
        Read the images present (``False``: none).
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
      ``uns['visium']`` = ``{'scalefactors': {...}, 'um_per_px': ..., 'um_per_px_from': ..., ...}`` (µm per
      full-resolution pixel from the spot grid's 100 µm pitch, or 55 / ``spot_diameter_fullres`` without a
      grid; see :func:`visium_scalefactors`); ``uns['spatial']`` in the scanpy layout (library id, hires/lowres images,
      scale factors), so :func:`scanpy.pl.spatial` draws the spots on the H&E with no extra arguments;
    * whichever images exist: ``visium_hires_image`` / ``visium_lowres_image`` / ``visium_cytassist_image``, uint8
      (c, y, x) RGB mapped to ``visium`` by ``Scale(1 / scalef)`` (hires pixel (i, j) covers full-res x in
      [j / s, (j + 1) / s)); ``visium_fullres_image``: Identity, with pyramid levels down to ~2000 px.

    :func:`registration_target` names the image to register onto (hires, else lowres, else full resolution, else
    CytAssist).

    Raises
    ------
    FileNotFoundError
        The folder, the counts, the ``spatial/`` folder, the positions file or ``scalefactors_json.json`` is
        missing; the message names it and lists what the folder holds.
    ValueError
        A malformed CSV/parquet/HDF5/JSON/image (named, with the problem), an image without its scale factor, or
        matrix barcodes absent from the positions file (with counts).
    """
    path = check_folder(path, "Space Ranger outs")
    check_folder_modality(path, "visium")
    from ._visium_hd import is_visium_hd  # (that module builds on this one)

    if is_visium_hd(path):
        raise ValueError(
            f"{path} is a Visium HD folder (binned_outputs/square_<size>um/): read it with "
            "sda.io.read_visium_hd (sda.io.read_pair and spatialdata-align run detect it)."
        )
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
    full_file = _find_fullres(path, fullres_image) if images else None

    positions = read_positions(pos_file)
    scalefactors = read_scalefactors(sf_file)
    image_arrays = spatial_images(spatial, scalefactors, sf_file) if images else {}
    if images and not image_arrays and full_file is None:
        warnings.warn(f"Visium folder {path} has no image at all: nothing to register onto.", stacklevel=2)
    mat = read_feature_matrix(counts_path)
    if mat.n_obs == 0:
        raise ValueError(
            f"{counts_path} holds no barcodes ({int(positions['in_tissue'].sum())} of the {len(positions)} spots of "
            f"{pos_file.name} are in tissue): no spot to read. If Space Ranger found no tissue, check its tissue "
            "detection (or give the raw matrix with counts_file=)."
        )
    features, counts = features_of(mat), mat.X
    if gex_only:
        gex = (features["feature_type"] == "Gene Expression").to_numpy()
        if gex.any() and not gex.all():
            features, counts = features.loc[gex].reset_index(drop=True), counts[:, np.flatnonzero(gex)]

    barcodes_m = mat.obs_names.to_numpy().astype(str)
    pos_index = pd.Index(positions["barcode"])
    rows = pos_index.get_indexer(barcodes_m)
    absent = rows < 0
    if absent.any():
        raise ValueError(
            f"{int(absent.sum())} of {len(rows)} barcodes of {counts_path.name} are not in {pos_file.name} "
            f"({len(positions)} barcodes there; e.g. {[str(v) for v in barcodes_m[absent][:3]]}): the matrix and "
            "the positions do not come from the same Space Ranger run."
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
    library_id = _library_id(path, mat)
    uns = {
        "scalefactors": scalefactors,
        "um_per_px": float(um_per_px),
        "spot_diameter_um": float(VISIUM_SPOT_DIAMETER_UM),
        "positions_file": pos_file.name,
        "counts_file": counts_path.name,
        "path": str(path),
        "library_id": library_id,
        "images": sorted(image_arrays) + ([VISIUM_FULLRES] if full_file is not None else []),
    }
    table = ad.AnnData(
        X=counts,
        obs=obs,
        var=gene_var(features),
        obsm={SPATIAL_KEY: xy},
        uns={
            UNS_VISIUM_KEY: uns,
            "spatial": spatial_uns(library_id, image_arrays, scalefactors, {"source": str(path)}),
        },
    )
    table = TableModel.parse(table, region=VISIUM_SPOTS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    spots = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), scalefactors["spot_diameter_fullres"] / 2.0),
        index=pd.Index(barcodes),
        transformations={VISIUM_CS: Identity()},
    )
    imgs = spatial_image_elements(image_arrays, scalefactors)
    if full_file is not None:
        imgs[VISIUM_FULLRES] = _read_fullres(full_file)
    shown = {spatial / SPATIAL_IMAGES[n][0]: (imgs[n], SPATIAL_IMAGES[n][1]) for n in image_arrays}
    if full_file is not None:
        shown[full_file] = (imgs[VISIUM_FULLRES], None)
    geometry = check_visium_geometry(positions, pos_file, scalefactors, sf_file, shown)
    if geometry.get("um_per_px_grid"):
        # the spot grid's 100 µm pitch fixes the pixel size; spot_diameter_fullres does not (Space Ranger's value
        # spans ~65 µm of tissue in real runs, not the 55 µm of the spot, an ~18 % error)
        table.uns[UNS_VISIUM_KEY]["um_per_px"] = float(geometry["um_per_px_grid"])
        table.uns[UNS_VISIUM_KEY]["um_per_px_from"] = "spot grid (100 µm pitch)"
    else:
        table.uns[UNS_VISIUM_KEY]["um_per_px_from"] = "spot_diameter_fullres (55 µm)"
    return SpatialData(images=imgs, shapes={VISIUM_SPOTS: spots}, tables={VISIUM_TABLE: table})


def registration_target(sdata: SpatialData) -> str:
    """The image to register the Xenium cells onto: the best Visium image present.

    The hires image, else the lowres image, else the full-resolution image (the registration reads its finest
    pyramid level with at most ~4 Mpx, i.e. a downsampled copy), else the CytAssist image. The accessor
    (``sdata.align.affine`` / ``lddmm`` with no ``target``), the pipeline and the CLI all use it.

    Raises
    ------
    ValueError
        No Visium image in ``sdata``; the message lists the images it holds.
    """
    for name in VISIUM_TARGET_ORDER:
        if name in sdata.images:
            return name
    raise ValueError(
        f"no Visium image to register onto: none of {list(VISIUM_TARGET_ORDER)} is in this SpatialData (images: "
        f"{sorted(sdata.images) or 'none'}). The Space Ranger folder needs spatial/tissue_hires_image.png, "
        "spatial/tissue_lowres_image.png, a full-resolution image or spatial/cytassist_image.tiff."
    )


def visium_table_name(sdata: SpatialData) -> str:
    """``visium_table``, else the Visium HD table of the smallest bin size (all share the image scale factors)."""
    if VISIUM_TABLE in sdata.tables:
        return VISIUM_TABLE
    hd = sorted(t for t in sdata.tables if t.startswith(VISIUM_HD_TABLE.split("{")[0]))
    if hd:
        return hd[0]
    raise ValueError(
        f"no table {VISIUM_TABLE!r} (nor a Visium HD table) in this SpatialData (tables: {sorted(sdata.tables)}); "
        "read the Visium data with sda.io.read_visium, sda.io.read_visium_hd or sda.io.read_pair."
    )


def visium_scalefactors(sdata: SpatialData | ad.AnnData) -> dict:
    """Scale factors of the Visium (or Visium HD) data in ``sdata``, plus ``um_per_px``.

    Parameters
    ----------
    sdata
        A SpatialData object holding ``visium_table`` (as :func:`read_visium` makes it) or Visium HD tables (as
        :func:`read_visium_hd` makes them), or such a table itself.

    Returns
    -------
    ``{'spot_diameter_fullres': full-res px, 'tissue_hires_scalef': hires px per full-res px,
    'tissue_lowres_scalef': lowres px per full-res px, 'fiducial_diameter_fullres': ..., 'um_per_px': µm per
    full-res px}`` (floats; whatever scale factors Space Ranger wrote, e.g. also ``regist_target_img_scalef``,
    ``microns_per_pixel``, ``bin_size_um``).

    Raises
    ------
    ValueError
        No Visium table or no ``uns['visium']`` scale factors in it.
    """
    if isinstance(sdata, ad.AnnData):
        table, name = sdata, "table"
    else:
        name = visium_table_name(sdata)
        table = sdata.tables[name]
    node = table.uns.get(UNS_VISIUM_KEY)
    if not isinstance(node, dict):
        raise ValueError(f"{name}.uns has no {UNS_VISIUM_KEY!r} entry (uns keys: {sorted(table.uns)}).")
    sf = node.get("scalefactors", node)
    if not isinstance(sf, dict) or "spot_diameter_fullres" not in sf:
        raise ValueError(f"{name}.uns[{UNS_VISIUM_KEY!r}] holds no scale factors (keys: {sorted(node)}).")
    out = {k: float(v) for k, v in sf.items() if np.ndim(v) == 0 and not isinstance(v, str)}
    if "um_per_px" in node:
        out["um_per_px"] = float(node["um_per_px"])
    elif "spot_diameter_fullres" in out:
        out["um_per_px"] = VISIUM_SPOT_DIAMETER_UM / out["spot_diameter_fullres"]
    return out
