"""Visium HD reader: the binned outputs of a Space Ranger (>= 3) ``outs/`` folder, in the ``visium`` system.

Delegation: when the folder has ``feature_slice.h5`` (a full Space Ranger ``outs/``), the bins, tables and images
are read by :func:`spatialdata_io.visium_hd` (which also places the CytAssist image with Space Ranger's own
registration matrices) and renamed here. A download of the binned outputs alone has no ``feature_slice.h5``, which
``spatialdata_io.visium_hd`` needs (it raises ``RuntimeError``); those folders, and any it fails on, are read from
their files here: ``binned_outputs/square_<size>um/{filtered_feature_bc_matrix.h5, spatial/tissue_positions.parquet,
spatial/scalefactors_json.json}`` and the images. Both paths give the same elements (``tests/test_visium_hd.py``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, get_transformation, set_transformation

from .._checks import check_visium_geometry
from .._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_CYTASSIST,
    VISIUM_FULLRES,
    VISIUM_HD_BINS,
    VISIUM_HD_TABLE,
    VISIUM_HIRES,
    VISIUM_LOWRES,
)
from ._files import check_folder, folder_listing, missing
from ._matrix import _int_counts, features_of, read_feature_matrix
from ._visium import (
    _SCALEFACTORS,
    SPATIAL_IMAGES,
    _find_fullres,
    _read_fullres,
    pyramid_levels,
    read_positions,
    read_scalefactors,
    spatial_image_elements,
    spatial_images,
    spatial_uns,
)
from ._xenium import gene_var

__all__ = ["find_binned_outputs", "is_visium_hd", "read_visium_hd"]

_BINNED = "binned_outputs"
_BIN_DIR = re.compile(r"^square_(\d{3})um$")
_HD_REQUIRED_SCALEFACTORS = ("spot_diameter_fullres", "microns_per_pixel")
_DATASET_ID = "visium_hd"


def find_binned_outputs(path: Path) -> Path | None:
    """The ``binned_outputs/`` folder of a Visium HD folder, else None.

    ``path`` may be the ``outs/`` folder, the run folder, ``binned_outputs/`` or one bin size's ``square_<size>um/``.
    """
    cands = [path / _BINNED, path / "outs" / _BINNED, path]
    if _BIN_DIR.match(path.name):  # one bin size's folder: its parent holds them all
        cands.append(path.parent)
    for cand in cands:
        if cand.is_dir() and any(_BIN_DIR.match(p.name) and p.is_dir() for p in cand.iterdir()):
            return cand
    return None


def is_visium_hd(path: str | Path) -> bool:
    """Whether ``path`` is a Visium HD folder (it holds ``binned_outputs/square_<size>um/``)."""
    path = Path(path)
    return path.is_dir() and find_binned_outputs(path) is not None


def _available(binned: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in sorted(binned.iterdir()) if p.is_dir() and (m := _BIN_DIR.match(p.name))}


#: the bin sizes (µm) read by default, those of them that the run has
DEFAULT_BINS = (8, 16)


def default_bins(path: str | Path, include=()) -> tuple[int, ...]:
    """Bin sizes (µm) :func:`read_visium_hd` reads by default from a Visium HD folder, plus ``include``.

    Those of :data:`DEFAULT_BINS` that the folder holds; if it holds neither (a download of one bin size, say), every
    size it holds but 2 µm (millions of bins), or 2 µm if that is all.
    """
    binned = find_binned_outputs(Path(path))
    have = sorted(_available(binned)) if binned is not None else []
    out = [b for b in DEFAULT_BINS if b in have] or [b for b in have if b != 2] or have
    return tuple(sorted({*out, *(int(b) for b in include)}))


def _bin_elements(size: int, positions: pd.DataFrame, mat: ad.AnnData, scalefactors: dict, library: str, images):
    """Squares + table of one bin size, from the positions, the matrix (AnnData) and that level's scale factors."""
    name, table_name = VISIUM_HD_BINS.format(size), VISIUM_HD_TABLE.format(size)
    barcodes = mat.obs_names.to_numpy().astype(str)
    rows = pd.Index(positions["barcode"]).get_indexer(barcodes)
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} of {len(rows)} barcodes of the {size} µm matrix are not in its "
            f"tissue_positions.parquet (e.g. {[str(v) for v in barcodes[rows < 0][:3]]}): files from different runs."
        )
    obs = positions.iloc[rows].reset_index(drop=True)
    obs.index = pd.Index(barcodes)
    obs[REGION_KEY] = pd.Categorical([name] * len(obs))
    obs[INSTANCE_KEY] = barcodes
    xy = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    upp = float(scalefactors["microns_per_pixel"])
    uns = {
        "scalefactors": scalefactors,
        "um_per_px": upp,
        "bin_size_um": float(scalefactors.get("bin_size_um", size)),
        "positions_file": "tissue_positions.parquet",
        "library_id": library,
    }
    table = ad.AnnData(
        X=_int_counts(mat.X),
        obs=obs,
        var=gene_var(features_of(mat)),
        obsm={SPATIAL_KEY: xy},
        uns={UNS_VISIUM_KEY: uns, "spatial": spatial_uns(library, images, scalefactors, {"bin_size_um": size})},
    )
    table = TableModel.parse(table, region=name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    # axis-aligned squares of the bin's side around its centre, as spatialdata_io.visium_hd draws them
    half = scalefactors["spot_diameter_fullres"] / 2.0
    squares = gpd.GeoSeries(gpd.points_from_xy(xy[:, 0], xy[:, 1])).buffer(half, cap_style=3)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=squares.values, index=pd.Index(barcodes)), transformations={VISIUM_CS: Identity()}
    )
    return {name: shapes}, {table_name: table}


def _bin_files(binned: Path, bins) -> dict[int, tuple[Path, Path, Path]]:
    """``{size: (positions, scale factors, counts)}`` after checking every file exists (errors name the missing one)."""
    available = _available(binned)
    out = {}
    for size in bins:
        folder = available.get(size)
        if folder is None:
            raise FileNotFoundError(
                f"Visium HD: no {size} µm bins (square_{size:03d}um/) in {binned}; it holds: {folder_listing(binned)}."
            )
        spatial = folder / "spatial"
        pos_file, sf_file = spatial / "tissue_positions.parquet", spatial / _SCALEFACTORS
        for f, what in ((pos_file, "Visium HD bin positions"), (sf_file, "Visium HD scale factors")):
            if not f.is_file():
                raise missing(f.parent if f.parent.is_dir() else folder, what, [f.name])
        counts = folder / "filtered_feature_bc_matrix.h5"
        if not counts.is_file():
            counts = folder / "filtered_feature_bc_matrix"
            if not counts.is_dir():
                raise missing(
                    folder, "Visium HD counts", ["filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix/"]
                )
        out[size] = (pos_file, sf_file, counts)
    return out


def _read_level(pos_file: Path, counts: Path, gex_only: bool) -> tuple[pd.DataFrame, ad.AnnData]:
    mat = read_feature_matrix(counts)
    if gex_only:
        gex = (mat.var["feature_types"] == "Gene Expression").to_numpy()
        if gex.any() and not gex.all():
            mat = mat[:, gex].copy()
    return read_positions(pos_file), mat


def _spatial_dir(outs: Path, binned: Path, bins) -> Path | None:
    """The folder holding the images: ``outs/spatial/``, else the first bin folder's ``spatial/``."""
    cands = [outs / "spatial"] + [binned / f"square_{s:03d}um" / "spatial" for s in bins]
    return next((c for c in cands if (c / _SCALEFACTORS).is_file()), None)


def _delegate(outs: Path, bins, gex_only: bool, want_images: bool):
    """Bins, tables and images through :func:`spatialdata_io.visium_hd` (needs ``feature_slice.h5``)."""
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no full resolution image", file-format notes, ...
        sd = spatialdata_io.visium_hd(
            outs,
            dataset_id=_DATASET_ID,
            filtered_counts_file=True,
            load_segmentations_only=False,
            bin_size=list(bins),
            bins_as_squares=True,
            load_all_images=want_images,
            var_names_make_unique=False,
            gex_only=gex_only,
        )
    out = {}
    for size in bins:
        table = sd.tables.get(f"square_{size:03d}um")
        if table is None:
            raise ValueError(f"spatialdata_io.visium_hd read no {size} µm bins")
        xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
        positions = pd.DataFrame(
            {
                "barcode": table.obs_names.astype(str),
                "in_tissue": table.obs["in_tissue"].to_numpy().astype(np.int64),
                "array_row": table.obs["array_row"].to_numpy().astype(np.int64),
                "array_col": table.obs["array_col"].to_numpy().astype(np.int64),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        )
        mat = ad.AnnData(X=table.X, obs=pd.DataFrame(index=table.obs_names.astype(str)), var=table.var.copy())
        out[size] = (positions, mat)
    rename = {
        f"{_DATASET_ID}_hires_image": VISIUM_HIRES,
        f"{_DATASET_ID}_lowres_image": VISIUM_LOWRES,
        f"{_DATASET_ID}_full_image": VISIUM_FULLRES,
        f"{_DATASET_ID}_cytassist_image": VISIUM_CYTASSIST,
    }
    images = {}
    for old, new in rename.items():
        if want_images and old in sd.images:
            el = sd.images[old]
            transform = get_transformation(el, _DATASET_ID)
            if not hasattr(el, "children") and pyramid_levels(el.shape):  # large single-scale image: add levels
                el = Image2DModel.parse(
                    el.data, dims=el.dims, c_coords=el.coords["c"].values, scale_factors=pyramid_levels(el.shape)
                )
            set_transformation(el, {VISIUM_CS: transform}, set_all=True)
            images[new] = el
    return out, images


def read_visium_hd(
    path: str | Path,
    bins=None,
    *,
    images: bool = True,
    fullres_image: str | Path | bool | None = "auto",
    gex_only: bool = True,
) -> SpatialData:
    """Read a Visium HD Space Ranger ``outs/`` folder (or its ``binned_outputs/``) into SpatialData.

    Each requested bin size needs ``binned_outputs/square_<size>um/`` with ``filtered_feature_bc_matrix.h5``,
    ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json`` (with ``microns_per_pixel``); a
    missing one is an error naming the file. Images: whichever of ``tissue_hires_image.png``,
    ``tissue_lowres_image.png`` and ``cytassist_image.tiff`` exist in ``spatial/`` (a missing hires or lowres image
    is a warning), and a full-resolution microscope image next to ``spatial/``. With ``feature_slice.h5`` present
    the reading is delegated to :func:`spatialdata_io.visium_hd` (see the module docstring).

    Parameters
    ----------
    path
        The ``outs/`` folder, the run folder holding it, a ``binned_outputs/`` folder or one bin size's
        ``square_<size>um/`` folder in it.
    bins
        Bin sizes (µm) to read, e.g. ``(8, 16)`` or ``(2, 8, 16)`` (the 2 µm bins are many: millions of rows).
        Default: 8 and 16 µm, those of them present (a folder with neither: every size present but 2 µm).
    images
        Read the images present.
    fullres_image
        Full-resolution image: ``"auto"`` (the single ``.tif``/``.tiff``/``.btf`` next to ``spatial/``), a file, or
        ``None``.
    gex_only
        Keep only ``"Gene Expression"`` features.

    Returns
    -------
    SpatialData in coordinate system ``visium`` (full-resolution pixels), for each bin size ``<s>`` (3 digits):

    * ``visium_hd_bins_<s>um``: the in-tissue bins as squares (side ``spot_diameter_fullres`` px, axis-aligned as
      in spatialdata-io), index = barcode;
    * ``visium_hd_table_<s>um``: bins x genes, CSR integer counts, ``var`` as for Visium; obs ``in_tissue``,
      ``array_row``, ``array_col``, ``pxl_row_in_fullres``, ``pxl_col_in_fullres``, ``region`` / ``instance_id``;
      ``obsm['spatial']`` (x, y) px; ``uns['visium']`` the level's scale factors (incl. ``microns_per_pixel``,
      ``bin_size_um``) and ``um_per_px``; ``uns['spatial']`` in the scanpy layout;
    * the images, as :func:`read_visium` names them (``visium_hires_image``, ...).

    Raises
    ------
    FileNotFoundError
        No ``binned_outputs/square_<size>um/`` for a requested size, or a missing matrix, positions or scale
        factors file; the message names it and lists the folder.
    ValueError
        Malformed files (named), or matrix barcodes missing from the positions.
    """
    path = check_folder(path, "Visium HD outs")
    binned = find_binned_outputs(path)
    if binned is None:
        raise missing(path, "Visium HD binned outputs", [f"{_BINNED}/square_<size>um/"])
    outs = binned.parent if binned.name == _BINNED else binned
    bins = default_bins(binned) if bins is None else tuple(int(b) for b in np.atleast_1d(bins))
    if not bins:
        raise ValueError("bins must name at least one bin size (µm), e.g. bins=(8, 16).")
    files = _bin_files(binned, bins)
    scalefactors = {size: read_scalefactors(sf, _HD_REQUIRED_SCALEFACTORS) for size, (_, sf, _) in files.items()}
    spatial = _spatial_dir(outs, binned, bins)
    image_arrays, imgs = {}, {}
    if images and spatial is not None:
        sf_img = read_scalefactors(spatial / _SCALEFACTORS, _HD_REQUIRED_SCALEFACTORS)
        image_arrays = spatial_images(spatial, sf_img, spatial / _SCALEFACTORS, what="Visium HD")
        imgs = spatial_image_elements(image_arrays, sf_img)
    levels = None
    if (outs / "feature_slice.h5").is_file():
        try:
            levels, delegated = _delegate(outs, bins, gex_only, images)
            imgs.update(delegated)
        except Exception as e:  # a reader of many formats raises many types; our own path needs no feature_slice
            warnings.warn(f"spatialdata_io.visium_hd could not read {outs} ({type(e).__name__}: {e}); read directly.")
    if levels is None:
        levels = {size: _read_level(pos, counts, gex_only) for size, (pos, _, counts) in files.items()}
    full_file = _find_fullres(outs, fullres_image) if images else None
    if full_file is not None and VISIUM_FULLRES not in imgs:
        imgs[VISIUM_FULLRES] = _read_fullres(full_file)
    # the checks of read_visium (bin grid vs pixel positions, images vs scale factors) on the largest bins
    size = max(bins)
    shown = {spatial / SPATIAL_IMAGES[n][0]: (imgs[n], SPATIAL_IMAGES[n][1]) for n in image_arrays if n in imgs}
    if full_file is not None:
        shown[full_file] = (imgs[VISIUM_FULLRES], None)
    check_visium_geometry(levels[size][0], files[size][0], scalefactors[size], files[size][1], shown)
    library = _library_id(outs, next(iter(files.values()))[2])
    shapes, tables = {}, {}
    for size in bins:
        positions, mat = levels[size]
        s, t = _bin_elements(size, positions, mat, scalefactors[size], library, image_arrays)
        shapes.update(s)
        tables.update(t)
    return SpatialData(images=imgs, shapes=shapes, tables=tables)


def _library_id(outs: Path, counts: Path) -> str:
    """Space Ranger's library id (``library_ids`` of the HDF5 matrix), else the run folder's name."""
    import h5py

    try:
        with h5py.File(counts, "r") as f:
            lib = np.atleast_1d(f.attrs.get("library_ids", []))
    except OSError:
        lib = []
    if len(lib):
        return lib[0].decode() if isinstance(lib[0], bytes) else str(lib[0])
    return outs.parent.name if outs.name == "outs" else outs.name
