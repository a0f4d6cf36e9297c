"""Xenium reader: both the full Xenium Onboard Analysis folder and the minimal download, same result."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation, set_transformation

from .._checks import check_finite, check_folder_modality
from .._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_XENIUM_KEY,
    XENIUM_CELL_BOUNDARIES,
    XENIUM_CELL_LABELS,
    XENIUM_CELLS,
    XENIUM_CONTROL_PREFIXES,
    XENIUM_CS,
    XENIUM_MORPHOLOGY,
    XENIUM_NUCLEUS_BOUNDARIES,
    XENIUM_NUCLEUS_LABELS,
    XENIUM_TABLE,
    XENIUM_TRANSCRIPTS,
)
from .._elements import parse_lazy_points
from ._files import check_folder, find_first, folder_listing, lazy_image, missing
from ._matrix import features_of, read_feature_matrix
from ._transcripts import read_transcripts_csv, read_transcripts_parquet

__all__ = ["XENIUM_PIXEL_SIZE", "read_xenium"]

#: Default Xenium morphology pixel size (µm per pixel), used when no ``experiment.xenium`` says otherwise.
XENIUM_PIXEL_SIZE = 0.2125
#: ``xenium_table`` keys holding the control/blank/unassigned features kept out of ``X``.
CONTROL_COUNTS_KEY = "control_counts"
CONTROL_FEATURES_KEY = "control_features"


_SPECS = "experiment.xenium"
_CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
_MATRIX_H5 = "cell_feature_matrix.h5"
_MATRIX_DIR = "cell_feature_matrix"
_TRANSCRIPT_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
_CELLS_REQUIRED = ("cell_id", "x_centroid", "y_centroid")
_TRANSCRIPTS_REQUIRED = ("feature_name", "x_location", "y_location")
_FOCUS_CHANNELS_4 = ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"]


# ----------------------------------------------------------------------------------------------------------------
# shared pieces (both layouts)
# ----------------------------------------------------------------------------------------------------------------
def _read_specs(path: Path) -> dict | None:
    spec_file = path / _SPECS
    if not spec_file.is_file():
        return None
    try:
        specs = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec_file} is not valid JSON ({e}).") from None
    if not isinstance(specs, dict):
        raise ValueError(f"{spec_file} must hold a JSON object, found {type(specs).__name__}.")
    return specs


def _pixel_size(specs: dict | None, default: float | None, spec_file: Path) -> float:
    if specs is not None and "pixel_size" in specs:
        try:
            ps = float(specs["pixel_size"])
        except (TypeError, ValueError):
            raise ValueError(f"{spec_file}: 'pixel_size' is not a number ({specs['pixel_size']!r}).") from None
    else:
        ps = XENIUM_PIXEL_SIZE if default is None else float(default)
    if not np.isfinite(ps) or ps <= 0:
        raise ValueError(f"Xenium pixel size must be a positive number of µm per pixel, got {ps}.")
    return ps


def _decode_str(series: pd.Series) -> pd.Series:
    if len(series) and isinstance(series.iloc[0], bytes):
        return series.str.decode("utf-8")
    return series.astype(str)


def _is_control(features: pd.DataFrame) -> np.ndarray:
    names = features["name"].astype(str)
    return (features["feature_type"].astype(str) != "Gene Expression").to_numpy() | names.str.startswith(
        XENIUM_CONTROL_PREFIXES
    ).to_numpy()


def gene_var(features: pd.DataFrame) -> pd.DataFrame:
    """``var`` from a 10x feature table: index = gene symbols (made unique only if duplicated, ``-1``, ``-2``...).

    Columns ``gene_ids``, ``feature_types``, ``gene_symbols`` (un-suffixed) and ``genome`` when present.
    """
    symbols = features["name"].astype(str).to_numpy()
    var = pd.DataFrame(
        {
            "gene_ids": features["id"].astype(str).to_numpy(),
            "feature_types": features["feature_type"].astype(str).to_numpy(),
            "gene_symbols": symbols,
        },
        index=pd.Index(symbols),
    )
    if "genome" in features.columns:
        var["genome"] = features["genome"].astype(str).to_numpy()
    if not var.index.is_unique:
        var.index = ad.utils.make_index_unique(pd.Index(symbols))
    var.index.name = None
    return var


def _xenium_table(counts: sparse.csr_matrix, features: pd.DataFrame, obs: pd.DataFrame, uns: dict) -> ad.AnnData:
    """Cells x genes table; controls moved to ``obsm['control_counts']`` (names in ``uns['control_features']``)."""
    control = _is_control(features)
    genes = features.loc[~control].reset_index(drop=True)
    ctrls = features.loc[control].reset_index(drop=True)
    counts = sparse.csr_matrix(counts)
    obs = obs.copy()
    obs.index = pd.Index(obs["cell_id"].astype(str).to_numpy())
    obs.index.name = None
    obs[REGION_KEY] = pd.Categorical([XENIUM_CELLS] * len(obs))
    obs[INSTANCE_KEY] = obs.index.to_numpy()
    xy = obs[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    ctrl_df = pd.DataFrame(
        {"gene_ids": ctrls["id"].to_numpy(), "feature_types": ctrls["feature_type"].to_numpy()},
        index=ad.utils.make_index_unique(pd.Index(ctrls["name"].astype(str).to_numpy())),
    )
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts[:, np.flatnonzero(~control)]),
        obs=obs,
        var=gene_var(genes),
        obsm={SPATIAL_KEY: xy, CONTROL_COUNTS_KEY: sparse.csr_matrix(counts[:, np.flatnonzero(control)])},
        uns={CONTROL_FEATURES_KEY: ctrl_df, UNS_XENIUM_KEY: uns},
    )
    return TableModel.parse(adata, region=XENIUM_CELLS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _cells_element(table: ad.AnnData, cells_as: str, source: str):
    xy = table.obsm[SPATIAL_KEY]
    ids = table.obs_names.to_numpy()
    if cells_as == "points":
        df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cell_id": ids})
        return PointsModel.parse(df, instance_key="cell_id", transformations={XENIUM_CS: Identity()})
    if "cell_area" not in table.obs.columns:
        raise ValueError(f"{source} has no 'cell_area' column, needed for circle radii; use cells_as='points'.")
    area = pd.to_numeric(table.obs["cell_area"], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(area) & (area > 0))
    if bad.any():
        raise ValueError(
            f"{source}: {int(bad.sum())} of {len(area)} cells have a missing or non-positive 'cell_area' "
            f"(e.g. {[str(v) for v in ids[bad][:3]]}); circles need positive radii, use cells_as='points'."
        )
    return ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.sqrt(area / np.pi),
        index=pd.Index(ids, name=None),
        transformations={XENIUM_CS: Identity()},
    )


def _simplified(matrix: np.ndarray):
    """A native transformation for a 3x3 (x, y) affine matrix: Identity, Scale or Affine."""
    lin, t = matrix[:2, :2], matrix[:2, 2]
    if np.allclose(matrix, np.eye(3), rtol=0, atol=1e-12):
        return Identity()
    if np.allclose(lin, np.diag(np.diag(lin)), rtol=0, atol=0) and np.allclose(t, 0, rtol=0, atol=0):
        return Scale(np.diag(lin).copy(), axes=("x", "y"))
    return Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))


def _to_xenium_cs(element: Any, pixel_size: float, source_cs: str = "global") -> None:
    """Replace the element's ``source_cs`` (pixels) transformation by one to ``xenium`` (µm)."""
    t = get_transformation(element, to_coordinate_system=source_cs)
    m = np.diag([pixel_size, pixel_size, 1.0]) @ t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    set_transformation(element, {XENIUM_CS: _simplified(m)}, set_all=True)


# ----------------------------------------------------------------------------------------------------------------
# minimal layout
# ----------------------------------------------------------------------------------------------------------------
def _read_cells_file(file: Path) -> pd.DataFrame:
    try:
        if file.name.endswith(".parquet"):
            cells = pd.read_parquet(file)
        else:
            cells = pd.read_csv(file, compression="infer", float_precision="round_trip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{file} could not be read as a cells table ({type(e).__name__}: {e}).") from None
    lacking = [c for c in _CELLS_REQUIRED if c not in cells.columns]
    if lacking:
        raise ValueError(f"{file} lacks required column(s) {lacking}; it has {list(cells.columns)}.")
    if len(cells) == 0:
        raise ValueError(
            f"{file} holds no cells (a header and no rows): nothing to read or align. Check that the Xenium run "
            "segmented cells in this region, or give the run folder of another region."
        )
    cells = cells.reset_index(drop=True)
    cells["cell_id"] = _decode_str(cells["cell_id"])
    for c in ("x_centroid", "y_centroid"):
        vals = pd.to_numeric(cells[c], errors="coerce")
        if vals.isna().any():
            raise ValueError(f"{file}: column {c!r} has {int(vals.isna().sum())} missing or non-numeric value(s).")
        cells[c] = vals.astype(np.float64)
    check_finite(cells, file, ("x_centroid", "y_centroid"), ids=cells["cell_id"], what="centroids")
    if not cells["cell_id"].is_unique:
        dup = cells["cell_id"][cells["cell_id"].duplicated()].unique()
        raise ValueError(f"{file}: 'cell_id' is not unique ({len(dup)} duplicated, e.g. {[str(v) for v in dup[:3]]}).")
    return cells


def _align_matrix(mat: ad.AnnData, cells: pd.DataFrame, cells_file: Path) -> sparse.csr_matrix:
    ids = cells["cell_id"].to_numpy()
    barcodes = mat.obs_names.to_numpy().astype(str)
    source = Path(mat.uns["source"])
    if len(barcodes) == len(ids) and np.array_equal(barcodes, ids):
        return mat.X
    pos = pd.Index(barcodes)
    if not pos.is_unique:
        raise ValueError(f"{source}: barcodes (cell ids) are not unique.")
    only_cells = int((~pd.Index(ids).isin(pos)).sum())
    only_matrix = int((~pos.isin(pd.Index(ids))).sum())
    if only_cells or only_matrix:
        raise ValueError(
            f"cell ids of {cells_file.name} ({len(ids)} cells) and {source.name} ({len(barcodes)} barcodes) do "
            f"not match: {only_cells} cells are missing from the matrix and {only_matrix} matrix barcodes are "
            f"missing from the cells file."
        )
    return mat.X[pos.get_indexer(ids)]


def _read_transcripts(file: Path):
    """Lazy transcripts with a unique index (``None`` for an empty parquet file: the models reject it)."""
    ddf = read_transcripts_parquet(file) if file.name.endswith(".parquet") else read_transcripts_csv(file)
    if ddf is None:
        warnings.warn(f"{file} holds no transcripts (no rows); the transcripts are not read.", stacklevel=3)
        return None
    columns = list(ddf.columns)
    coords = None  # read_transcripts_parquet names them x, y, z already
    if "x_location" in columns:
        coords = {"x": "x_location", "y": "y_location"}
        if "z_location" in columns:
            coords["z"] = "z_location"
    return parse_lazy_points(
        ddf,
        coordinates=coords,
        feature_key="feature_name",
        instance_key="cell_id" if "cell_id" in columns else None,
        transformations={XENIUM_CS: Identity()},
    )


def focus_files(path: Path) -> list[Path]:
    """The morphology focus image, one file per channel, of any XOA version (channel order).

    XOA 1.x: ``morphology_focus.ome.tif``; 2.x-3.x: ``morphology_focus/morphology_focus_0000.ome.tif`` ... (1 or 4
    files); 4.x: ``morphology_focus/ch0000_dapi.ome.tif``, ``ch0001_<stain>.ome.tif`` ...
    """
    folder = path / "morphology_focus"
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.name.endswith(".ome.tif") and not p.name.startswith("._"))
        v2 = [p for p in files if re.fullmatch(r"morphology_focus_\d{4}\.ome\.tif", p.name)]
        v4 = [p for p in files if re.fullmatch(r"ch\d{4}_.+\.ome\.tif", p.name)]
        if v2 or v4:
            return v2 or v4
    single = path / "morphology_focus.ome.tif"
    return [single] if single.is_file() else []


def _ome_channel_names(file: Path) -> list[str]:
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            xml = tif.ome_metadata or ""
    except Exception:  # names are a nicety; the image itself is read (and checked) elsewhere
        return []
    return re.findall(r"<Channel\b[^>]*\bName=\"([^\"]+)\"", xml)


def _channel_names(files: list[Path]) -> list[str]:
    if files[0].name.startswith("morphology_focus"):
        if len(files) == 1:
            return ["DAPI"]
        if len(files) == 4:
            return list(_FOCUS_CHANNELS_4)
    names = []
    for i, f in enumerate(files):
        ome = _ome_channel_names(f)
        if len(ome) == len(files):
            names.append(ome[i])
        elif len(ome) == 1:
            names.append(ome[0])
        else:
            names.append(f.name.removesuffix(".ome.tif").split("_", 1)[-1])
    return names if len(set(names)) == len(names) else [f"channel_{i}" for i in range(len(files))]


def _read_channels(files: list[Path]):
    import dask.array as da

    planes = []
    for file in files:
        # one channel per file (a multi-file OME-TIFF: each file's OME-XML lists the whole set)
        image = lazy_image(file, own_pages=len(files) > 1)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"{file}: expected a 2D (or channels x y x x) image, found shape {image.shape}.")
        planes.append(image)
    shapes = {p.shape[1:] for p in planes}
    if len(shapes) > 1:
        raise ValueError(f"the morphology channel files {[f.name for f in files]} differ in size: {sorted(shapes)}.")
    return da.concatenate(planes, axis=0) if len(planes) > 1 else planes[0]


def _read_morphology(path: Path, pixel_size: float) -> dict:
    found = {}
    focus = focus_files(path)
    if focus:
        found["focus"] = focus
    mip = find_first(path, ("morphology_mip.ome.tif",))
    if mip is not None:
        found["mip"] = [mip]
    images = {}
    for key, files in found.items():
        image = _read_channels(files)
        n_c = image.shape[0]
        names = _channel_names(files) if len(files) > 1 else ["DAPI"] if n_c == 1 else None
        if names is None and n_c == 4:
            names = list(_FOCUS_CHANNELS_4)
        images[f"{XENIUM_MORPHOLOGY}_{key}"] = Image2DModel.parse(
            image,
            dims=("c", "y", "x"),
            c_coords=names,
            scale_factors=[2, 2, 2, 2],
            chunks=(1, 4096, 4096),
            transformations={XENIUM_CS: Scale([pixel_size, pixel_size], axes=("x", "y"))},
        )
    return images


def morphology_thumbnail(path: Path, max_px: int = 2000) -> tuple[np.ndarray, float] | None:
    """A small uint8 RGB (grey) copy of the DAPI focus image for ``uns['spatial']``, and its downsampling factor.

    Reads the file's own pyramid level with at most ``max_px`` pixels on its long side (real XOA images are
    pyramidal OME-TIFFs, so this never decodes the full image), else strides through a level of at most 16384 px;
    ``None`` when there is no focus image or only a larger one without pyramid.
    """
    import tifffile

    files = focus_files(path)
    if not files:
        return None
    try:
        with tifffile.TiffFile(files[0]) as tif:
            levels = tif.series[0].levels
            full = levels[0].shape[-2:]
            level = next((lv for lv in levels if max(lv.shape[-2:]) <= max_px), levels[-1])
            if max(level.shape[-2:]) > 16384:
                return None
            arr = np.asarray(level.asarray())
    except Exception:  # a thumbnail is optional; _read_morphology reports unreadable images
        return None
    while arr.ndim > 2:
        arr = arr[0]
    step = int(np.ceil(max(arr.shape) / max_px))
    factor = full[-1] / arr.shape[-1] * step  # full-resolution pixels per thumbnail pixel
    arr = arr[::step, ::step].astype(np.float64)
    hi = np.percentile(arr, 99.5) if arr.size else 1.0
    grey = np.clip(arr / max(hi, 1e-9) * 255, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), float(factor)


def _read_minimal(path: Path, specs: dict | None, pixel_size: float, opts: dict) -> SpatialData:
    cells_file = find_first(path, _CELLS_FILES)
    if cells_file is None:
        raise missing(path, "Xenium cells table", _CELLS_FILES)
    matrix = find_first(path, (_MATRIX_H5,)) or find_first(path, (_MATRIX_DIR,), dirs=True)
    if matrix is None:
        raise missing(path, "Xenium cell-feature matrix", (_MATRIX_H5, _MATRIX_DIR + "/"))
    cells = _read_cells_file(cells_file)
    mat = read_feature_matrix(matrix)
    counts = _align_matrix(mat, cells, cells_file)
    uns = _uns(specs, pixel_size, "minimal", path)
    table = _xenium_table(counts, features_of(mat), cells, uns)
    return _assemble(path, table, opts, pixel_size, points={}, extra={}, minimal=True)


def _uns(specs: dict | None, pixel_size: float, layout: str, path: Path) -> dict:
    uns = {"layout": layout, "pixel_size": float(pixel_size), "path": str(path)}
    if specs is not None:
        for key in ("analysis_sw_version", "panel_name", "run_name", "region_name"):
            if key in specs and isinstance(specs[key], str | int | float):
                uns[key] = specs[key]
    return uns


def _assemble(
    path: Path, table: ad.AnnData, opts: dict, pixel_size: float, points: dict, extra: dict, minimal: bool
) -> SpatialData:
    """Cells element + table + optional elements; the minimal layout reads transcripts and images here."""
    shapes, images, labels = {}, {}, {}
    cells_el = _cells_element(table, opts["cells_as"], str(path))
    if opts["cells_as"] == "points":
        points = {XENIUM_CELLS: cells_el, **points}
    else:
        shapes[XENIUM_CELLS] = cells_el
    if opts["transcripts"]:  # both layouts: our reader gives the transcripts a unique index
        tx = find_first(path, _TRANSCRIPT_FILES)
        tx_points = _read_transcripts(tx) if tx is not None else None
        if tx_points is not None:
            points[XENIUM_TRANSCRIPTS] = tx_points
    if minimal and opts["images"]:
        images.update(_read_morphology(path, pixel_size))
    if minimal and opts["boundaries"]:
        for name in (XENIUM_CELL_BOUNDARIES, XENIUM_NUCLEUS_BOUNDARIES):
            stem = name.removeprefix(f"{XENIUM_CS}_")  # cell_boundaries, nucleus_boundaries
            file = find_first(path, (f"{stem}.parquet", f"{stem}.csv.gz", f"{stem}.csv"))
            if file is not None:
                shapes[name] = read_boundaries(file)
    for kind, elements in extra.items():
        {"shapes": shapes, "images": images, "labels": labels, "points": points}[kind].update(elements)
    table.uns["spatial"] = _spatial_uns(path, table, pixel_size if opts["images"] else None)
    return SpatialData(images=images, labels=labels, points=points, shapes=shapes, tables={XENIUM_TABLE: table})


#: longer side (px) of the blank ``hires`` canvas of a Xenium table without a morphology image
BLANK_CANVAS_PX = 1000


def _spatial_uns(path: Path, table: ad.AnnData, pixel_size: float | None) -> dict:
    """``uns['spatial']`` for scanpy/squidpy: cells (µm) on a small DAPI image (``tissue_hires_scalef`` = px/µm)."""
    from ._visium import spatial_uns

    area = pd.to_numeric(table.obs.get("cell_area", pd.Series(dtype=float)), errors="coerce").to_numpy()
    area = area[np.isfinite(area) & (area > 0)]
    diameter = float(2 * np.sqrt(np.median(area) / np.pi)) if len(area) else 10.0
    scalefactors = {"spot_diameter_fullres": diameter}
    images = {}
    thumb = morphology_thumbnail(path) if pixel_size is not None else None
    meta = {"source": str(path), "units": "um"}
    if thumb is not None:
        images["hires"], factor = thumb[0].transpose(2, 0, 1), thumb[1]
        scalefactors["tissue_hires_scalef"] = 1.0 / (pixel_size * factor)
    elif "spatial" in table.obsm and len(table.obsm["spatial"]):
        # no morphology image (a minimal download): a white canvas over the cells, so scanpy's spatial plots still
        # work with no extra arguments (scanpy stops with a bare StopIteration on a library without images)
        far = np.nanmax(np.asarray(table.obsm["spatial"], dtype=float), axis=0)
        far = np.where(np.isfinite(far) & (far > 0), far, 1.0) * 1.02
        scalef = min(1.0, BLANK_CANVAS_PX / float(far.max()))  # px per µm
        shape = np.maximum(np.ceil(far[::-1] * scalef).astype(int), 1)
        images["hires"] = np.full((3, *shape), 255, dtype=np.uint8)
        scalefactors["tissue_hires_scalef"] = scalef
        meta["hires_image"] = "blank canvas: the folder has no morphology image"
    library = str(table.uns.get(UNS_XENIUM_KEY, {}).get("region_name") or "xenium")
    return spatial_uns(library, images, scalefactors, meta)


def read_boundaries(file: Path):
    """Xenium cell or nucleus boundaries (``cell_id``, ``vertex_x``, ``vertex_y`` in µm; parquet or CSV) as polygons.

    One polygon per cell, index = ``cell_id``, in ``xenium`` (µm); a cell with several rings (XOA >= 2 nuclei, told
    apart by ``label_id``) becomes a MultiPolygon. Rings are closed if the file does not repeat the first vertex.
    """
    import geopandas as gpd
    import shapely

    cols = ["cell_id", "vertex_x", "vertex_y"]
    try:
        df = pd.read_parquet(file) if file.suffix == ".parquet" else pd.read_csv(file, compression="infer")
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{file} could not be read as Xenium boundaries ({type(e).__name__}: {e}).") from None
    lacking = [c for c in cols if c not in df.columns]
    if lacking:
        raise ValueError(f"{file} lacks required column(s) {lacking}; it has {list(df.columns)}.")
    ids = _decode_str(df["cell_id"])
    ring_key = ids + "\x00" + df["label_id"].astype(str) if "label_id" in df.columns else ids
    ring, _ = pd.factorize(ring_key, sort=False)
    order = np.argsort(ring, kind="stable")
    xy = df[["vertex_x", "vertex_y"]].to_numpy(np.float64)[order]
    ring = ring[order]
    try:
        rings = shapely.linearrings(xy, indices=ring)
    except (ValueError, shapely.errors.GEOSException) as e:
        raise ValueError(f"{file}: a boundary has fewer than 3 vertices ({e}).") from None
    ring_cell = pd.Index(ids.to_numpy()[order][np.r_[0, np.flatnonzero(np.diff(ring)) + 1]])
    cell, cells = pd.factorize(ring_cell, sort=False)
    polys = shapely.polygons(rings)
    if len(cells) < len(polys):
        geoms = shapely.multipolygons(polys, indices=cell)
    else:
        geoms = polys
    gdf = gpd.GeoDataFrame(geometry=geoms, index=pd.Index(cells.astype(str), name=None))
    return ShapesModel.parse(gdf, transformations={XENIUM_CS: Identity()})


# ----------------------------------------------------------------------------------------------------------------
# full layout: delegate to spatialdata_io.xenium, then rename
# ----------------------------------------------------------------------------------------------------------------
_FULL_REQUIRED = (_SPECS, "cells.zarr.zip", "cells.parquet", _MATRIX_H5)


def _is_full(path: Path) -> bool:
    return all((path / f).is_file() for f in _FULL_REQUIRED)


def _read_full(path: Path, specs: dict, pixel_size: float, opts: dict) -> SpatialData:
    import spatialdata_io

    has = {f: (path / f).exists() for f in ("cell_boundaries.parquet",)}
    version = str(specs.get("analysis_sw_version", ""))
    v2 = not version.startswith(("xenium-1.", "Xenium-1."))
    focus_ok = (path / "morphology_focus").is_dir() if v2 else (path / "morphology_focus.ome.tif").is_file()
    kwargs = {
        "cells_boundaries": opts["boundaries"] and has["cell_boundaries.parquet"],
        "nucleus_boundaries": opts["boundaries"] and (path / "nucleus_boundaries.parquet").exists(),
        "cells_as_circles": False,
        "cells_labels": opts["labels"],
        "nucleus_labels": opts["labels"],
        "transcripts": False,  # read by _read_transcripts (unique index), see _assemble
        "morphology_mip": opts["images"] and (path / "morphology_mip.ome.tif").is_file(),
        "morphology_focus": opts["images"] and focus_ok,
        "aligned_images": opts["images"],
        "cells_table": True,
        "gex_only": False,
    }
    try:
        with warnings.catch_warnings():
            # spatialdata_io's own intermediate object: its table annotates labels we may not read; harmless
            warnings.filterwarnings("ignore", message=".*(region_key|zarr v3|categorical|is annotating).*")
            raw = spatialdata_io.xenium(path, **kwargs)
    except Exception as e:  # a reader of many formats raises many types (BadZipFile, KeyError, AssertionError...)
        raise ValueError(
            f"spatialdata_io.xenium could not read the Xenium output folder {path} ({type(e).__name__}: {e}); "
            f"it holds: {folder_listing(path)}."
        ) from None
    io_table = raw.tables["table"]
    obs = io_table.obs.drop(columns=[c for c in ("region",) if c in io_table.obs.columns]).copy()
    obs["cell_id"] = _decode_str(obs["cell_id"])
    xy = np.asarray(io_table.obsm["spatial"], dtype=np.float64)
    check_finite(xy, path / "cells.parquet", ("x_centroid", "y_centroid"), ids=obs["cell_id"], what="centroids")
    obs.insert(1, "x_centroid", xy[:, 0])
    obs.insert(2, "y_centroid", xy[:, 1])
    features = pd.DataFrame(
        {
            "id": io_table.var["gene_ids"].astype(str).to_numpy(),
            "name": io_table.var_names.astype(str).to_numpy(),
            "feature_type": io_table.var["feature_types"].astype(str).to_numpy(),
        }
    )
    if "genome" in io_table.var.columns:
        features["genome"] = io_table.var["genome"].astype(str).to_numpy()
    counts = sparse.csr_matrix(io_table.X)
    if counts.nnz == 0 or np.all(counts.data == np.round(counts.data)):
        counts = sparse.csr_matrix((counts.data.astype(np.int32), counts.indices, counts.indptr), shape=counts.shape)
    table = _xenium_table(counts, features, obs.reset_index(drop=True), _uns(specs, pixel_size, "full", path))

    rename = {
        "images": {"morphology_focus": f"{XENIUM_MORPHOLOGY}_focus", "morphology_mip": f"{XENIUM_MORPHOLOGY}_mip"},
        "labels": {"cell_labels": XENIUM_CELL_LABELS, "nucleus_labels": XENIUM_NUCLEUS_LABELS},
        "shapes": {"cell_boundaries": XENIUM_CELL_BOUNDARIES, "nucleus_boundaries": XENIUM_NUCLEUS_BOUNDARIES},
        "points": {"transcripts": XENIUM_TRANSCRIPTS},
    }
    extra: dict[str, dict] = {k: {} for k in rename}
    for kind, mapping in rename.items():
        for name, element in getattr(raw, kind).items():
            new = mapping.get(name, f"{XENIUM_CS}_{name}")
            _to_xenium_cs(element, pixel_size)
            extra[kind][new] = element
    points = extra.pop("points")
    return _assemble(path, table, opts, pixel_size, points=points, extra=extra, minimal=False)


# ----------------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------------
def read_xenium(
    path: str | Path,
    *,
    cells_as: str = "circles",
    transcripts: bool = True,
    images: bool = True,
    boundaries: bool = True,
    labels: bool = False,
    pixel_size: float | None = None,
) -> SpatialData:
    """Read a 10x Xenium output folder (XOA 1.x-4.x) into :class:`~spatialdata.SpatialData` (``xenium``, µm).

    The layout is detected from the files present:

    * **full** Xenium Onboard Analysis output (``experiment.xenium``, ``cells.zarr.zip``, ``cells.parquet`` and
      ``cell_feature_matrix.h5`` all present): read with :func:`spatialdata_io.xenium`, then renamed to the names
      below, moved from its pixel system ``global`` to ``xenium`` (µm) and the table rebuilt as for the other
      layouts; should spatialdata-io fail on it (a version it does not know), a warning says so and the folder is
      read as below;
    * any other folder (a download, an older or newer XOA version): the cells table (``cells.parquet``,
      ``cells.csv.gz`` or ``cells.csv``; integer ids of XOA 1.0-1.2 or string ids), ``cell_feature_matrix.h5`` or
      the ``cell_feature_matrix/`` folder, and whichever of these exist: ``transcripts.parquet`` /
      ``transcripts.csv.gz``, ``cell_boundaries`` / ``nucleus_boundaries`` (``.parquet`` or ``.csv.gz``), the
      morphology focus image (XOA 1.x ``morphology_focus.ome.tif``; 2.x-3.x
      ``morphology_focus/morphology_focus_0000.ome.tif`` ... and 4.x ``morphology_focus/ch0000_dapi.ome.tif`` ...,
      one OME-TIFF per channel, stacked into one multichannel image), ``morphology_mip.ome.tif`` and
      ``experiment.xenium`` (pixel size, software version).

    All layouts give the same cells, table and transcripts. Inputs on disk are never modified.

    Parameters
    ----------
    path
        The Xenium output folder (or a folder holding it as ``outs/``).
    cells_as
        ``"circles"`` (radius ``sqrt(cell_area / pi)`` µm) or ``"points"`` for ``xenium_cells``.
    transcripts
        Read ``transcripts.parquet`` / ``.csv.gz`` (lazily, as dask) when present.
    images
        Read the morphology image(s) (and, in the full layout, aligned H&E/IF images) when present.
    boundaries
        Read cell and nucleus boundary polygons when present.
    labels
        Full layout: read the cell and nucleus segmentation label rasters (``xenium_cell_labels``,
        ``xenium_nucleus_labels``).
    pixel_size
        Morphology pixel size in µm per pixel, used only when the folder has no ``experiment.xenium`` (default
        0.2125 µm).

    Returns
    -------
    A SpatialData object with, in coordinate system ``xenium`` (µm):

    * ``xenium_cells``: circles (or points) at the cell centroids, index = ``cell_id``;
    * ``xenium_table``: cells x genes AnnData, CSR integer counts, ``var_names`` = gene symbols with
      ``var['gene_ids']``, ``var['feature_types']``, ``var['gene_symbols']``; obs = the cells table columns plus
      ``region`` / ``instance_id`` (= ``cell_id``) annotating ``xenium_cells``; ``obsm['spatial']`` = (x, y) µm;
      control / blank / unassigned features (``feature_type != "Gene Expression"`` or a name in
      ``XENIUM_CONTROL_PREFIXES``) are not in ``X`` but in ``obsm['control_counts']`` (sparse, columns named by
      ``uns['control_features']``); ``uns['xenium']`` holds the layout, ``pixel_size`` (µm/px) and
      software version;
    * ``xenium_transcripts`` (if present): lazy points ``x``, ``y`` (, ``z``) µm, categorical ``feature_name``,
      ``cell_id``, ``qv``, ...; a unique index (row number in the file, known dask divisions), so
      ``spatialdata.transform``, queries and ``render_points`` work on them lazily;
    * ``xenium_morphology_focus`` / ``xenium_morphology_mip`` (if present): multiscale images mapped to µm by
      ``Scale(pixel_size)``;
    * ``xenium_cell_boundaries``, ``xenium_nucleus_boundaries`` (if present): polygons (µm), index = ``cell_id``;
      ``sdata.align.apply`` aligns them like the cells; full layout only: optional labels;
    * ``xenium_table.uns['spatial']`` in the scanpy layout: a small DAPI image with ``tissue_hires_scalef`` in
      image pixels per µm and ``spot_diameter_fullres`` the median cell diameter (µm), so
      :func:`scanpy.pl.spatial` draws the cells on the morphology with no extra arguments.

    Raises
    ------
    FileNotFoundError
        The folder, the cells table or the cell-feature matrix is missing (the message lists the folder).
    ValueError
        A malformed file (named, with the problem), cell ids of the cells table and the matrix that do not match
        (with counts), or a bad argument.
    """
    if cells_as not in ("circles", "points"):
        raise ValueError(f"cells_as must be 'circles' or 'points', got {cells_as!r}.")
    path = check_folder(path, "Xenium output")
    check_folder_modality(path, "xenium")
    if find_first(path, _CELLS_FILES) is None and (path / "outs").is_dir():
        path = path / "outs"
    specs = _read_specs(path)
    ps = _pixel_size(specs, pixel_size, path / _SPECS)
    opts = {
        "cells_as": cells_as,
        "transcripts": transcripts,
        "images": images,
        "boundaries": boundaries,
        "labels": labels,
    }
    if specs is not None and _is_full(path):
        try:
            return _read_full(path, specs, ps, opts)
        except ValueError as err:  # a layout spatialdata_io does not know yet: read the files it is made of
            warnings.warn(f"{err} Reading its cells table, matrix, transcripts, boundaries and images directly.")
    return _read_minimal(path, specs, ps, opts)
