"""Reading positions and rasters out of SpatialData elements in a chosen coordinate system.

One place for: which element kinds exist, how to get ``(x, y)`` of points/shapes in a coordinate
system, how to get an image with physical pixel-centre coordinates, and which table annotates an
element. Everything returns plain numpy/xarray so the engine never sees SpatialData.
"""

from __future__ import annotations

import copy
import logging
import warnings

import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from spatialdata import SpatialData, get_element_annotators, get_pyramid_levels
from spatialdata.models import (
    Image2DModel,
    Labels2DModel,
    PointsModel,
    ShapesModel,
    TableModel,
    get_model,
    get_table_keys,
)
from spatialdata.transformations import Identity, get_transformation, set_transformation

from ._constants import REGION_KEY  # noqa: F401  (re-exported for callers)
from .registration._utils import apply_affine

_XY = ("x", "y")

logger = logging.getLogger(__name__)


def parse_lazy_points(ddf, *, coordinates=None, feature_key=None, instance_key=None, transformations=None):
    """``PointsModel.parse`` for a lazy, partition-wise dask frame (read from parquet or mapped partition-wise).

    A frame already in the points layout (``x``, ``y`` numeric columns, ``feature_key`` categorical with known
    categories, no ``coordinates`` to rename) keeps its partitions as they are: it gets spatialdata's attributes and
    transformations and is validated by :meth:`PointsModel.validate`. ``PointsModel.parse`` would select the
    coordinate columns and assign every other column back, two copies of every partition each time it is computed
    (the 26M transcripts of the 168k-cell bundle are computed for their original and their aligned copy when written).
    Other frames go through ``PointsModel.parse``.

    dask gives each partition its own RangeIndex; the row order is what matters here, so spatialdata's
    warning about a non-monotonic index (unknown divisions) is silenced for this call only. ``sort=False``
    skips spatialdata's check of the index, which would compute the whole frame (read and transform every
    partition) just to decide that warning: parsing stays lazy.
    """
    if coordinates is None and _points_layout(ddf, feature_key):
        attrs = {}
        if feature_key is not None:
            attrs[PointsModel.FEATURE_KEY] = feature_key
        if instance_key is not None:
            if instance_key not in ddf.columns:
                raise ValueError(f"instance_key {instance_key!r} is not a column of the points ({list(ddf.columns)}).")
            attrs[PointsModel.INSTANCE_KEY] = instance_key
        if attrs:
            ddf.attrs[PointsModel.ATTRS_KEY] = attrs
        set_transformation(ddf, dict(transformations or {"global": Identity()}), set_all=True)
        PointsModel.validate(ddf)
        return ddf
    kwargs = {"coordinates": coordinates, "feature_key": feature_key, "instance_key": instance_key}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The index of the dataframe is not monotonic")
        return PointsModel.parse(ddf, sort=False, transformations=transformations, **kwargs)


def _points_layout(ddf, feature_key) -> bool:
    """Whether a dask frame is already laid out as ``PointsModel.parse`` would leave it."""
    numeric = (np.int32, np.int64, np.float32, np.float64)
    if not all(c in ddf.columns and ddf[c].dtype in numeric for c in ("x", "y")):
        return False
    if "z" in ddf.columns and ddf["z"].dtype not in numeric:
        return False
    if feature_key is None:
        return True
    dtype = ddf.dtypes.get(feature_key)
    return isinstance(dtype, pd.CategoricalDtype) and ddf[feature_key].cat.known


def with_transformations(element, transformations: dict):
    """A shallow copy of ``element`` (data shared, never copied) mapped by exactly ``transformations``.

    The original keeps its own transformations: spatialdata keeps them in ``attrs`` dicts that plain
    shallow copies share (dask frames, DataArrays, every scale of a DataTree), so the copy gets its own.
    """
    if isinstance(element, gpd.GeoDataFrame):
        new = element.copy(deep=False)
    elif isinstance(element, dd.DataFrame):
        new = element.copy()
    elif isinstance(element, xr.DataArray):
        new = element.copy(deep=False)
    else:  # DataTree (multiscale image or labels)
        new = element.copy(deep=False)
        for node in new.subtree:
            for var in node.data_vars:
                node[var].attrs["transform"] = copy.deepcopy(dict(node[var].attrs.get("transform", {})))
    if not isinstance(element, xr.DataTree):
        new.attrs["transform"] = copy.deepcopy(dict(element.attrs.get("transform", {})))
    set_transformation(new, copy.deepcopy(dict(transformations)), set_all=True)
    return new


def _copy_dicts(d):
    """Copy nested dicts (the containers), sharing their leaves (arrays, frames)."""
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in d.items()}


def shallow_table(table, obs=None, uns=None):
    """A new AnnData sharing ``table``'s matrices (never copied) with its own ``obs`` and ``uns`` containers.

    Used for copy-on-write edits: changing the new table's ``obs`` columns or ``uns`` keys leaves
    ``table`` (and every object sharing it) unchanged.
    """
    import anndata as ad

    return ad.AnnData(
        X=table.X,
        obs=table.obs.copy() if obs is None else obs,
        var=table.var.copy(),
        uns=_copy_dicts(dict(table.uns)) if uns is None else uns,
        obsm=dict(table.obsm),
        varm=dict(table.varm),
        layers=dict(table.layers),
        obsp=dict(table.obsp),
        varp=dict(table.varp),
        raw=table.raw,
    )


def with_obs_column(table, column: str, values):
    """:func:`shallow_table` with ``obs[column] = values``."""
    obs = table.obs.copy()
    obs[column] = values
    return shallow_table(table, obs=obs)


def with_uns(table, key: str, value):
    """:func:`shallow_table` with ``uns[key] = value``."""
    uns = _copy_dicts(dict(table.uns))
    uns[key] = value
    return shallow_table(table, uns=uns)


def element_kind(sdata: SpatialData, name: str) -> str:
    """Return ``"image"``, ``"labels"``, ``"points"``, ``"shapes"`` or ``"table"`` for element ``name``.

    Raises
    ------
    KeyError
        ``name`` is not an element of ``sdata``; the message lists the elements that exist.
    """
    if name not in sdata:
        raise KeyError(f"no element {name!r} in this SpatialData; it holds: {sorted(_all_names(sdata))}.")
    el = sdata[name]
    model = get_model(el)
    if model is Image2DModel or model.__name__.startswith("Image"):
        return "image"
    if model is Labels2DModel or model.__name__.startswith("Labels"):
        return "labels"
    if model is PointsModel:
        return "points"
    if model is ShapesModel:
        return "shapes"
    if model is TableModel:
        return "table"
    raise TypeError(f"element {name!r} has unsupported model {model.__name__}.")


def _all_names(sdata: SpatialData) -> list[str]:
    return [name for _, name, _ in sdata.gen_elements()]


def check_cs(sdata: SpatialData, cs: str, what: str = "coordinate system") -> str:
    """Raise a clear error if ``cs`` is not a coordinate system of ``sdata``."""
    if cs not in sdata.coordinate_systems:
        raise KeyError(f"no {what} {cs!r}; this SpatialData has coordinate systems {sdata.coordinate_systems}.")
    return cs


def element_cs(element) -> list[str]:
    """Coordinate systems an element is mapped to."""
    return list(get_transformation(element, get_all=True).keys())


def to_cs_matrix(element, cs: str, name: str = "element") -> np.ndarray:
    """``(3, 3)`` affine from the element's intrinsic ``(x, y)`` to coordinate system ``cs``."""
    transforms = get_transformation(element, get_all=True)
    if cs not in transforms:
        raise KeyError(f"{name!r} is not mapped to coordinate system {cs!r}; it is mapped to {sorted(transforms)}.")
    return np.asarray(transforms[cs].to_affine_matrix(input_axes=_XY, output_axes=_XY), dtype=np.float64)


def shapes_xy(gdf) -> np.ndarray:
    """Centres of a shapes GeoDataFrame (circle centres or polygon centroids) in intrinsic units."""
    geom = gdf.geometry
    if len(geom) and (geom.geom_type == "Point").all():
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
    c = geom.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)


def points_xy(ddf) -> np.ndarray:
    """``(x, y)`` of a points element (computes the dask frame's two columns)."""
    return ddf[["x", "y"]].compute().to_numpy(dtype=np.float64)


def element_xy(sdata: SpatialData, name: str, cs: str) -> np.ndarray:
    """Positions ``(N, 2)`` of a points or shapes element in coordinate system ``cs``.

    The same positions as :func:`spatialdata.get_centroids` (circle centres, polygon centroids, points),
    kept here because it is much faster on the cell counts this package handles:
    ``benchmarks/bench_tl.py`` measures 0.19 s against 3.0 s for 100k circles.
    """
    kind = element_kind(sdata, name)
    el = sdata[name]
    if kind == "shapes":
        xy = shapes_xy(el)
    elif kind == "points":
        xy = points_xy(el)
    else:
        raise TypeError(f"element {name!r} is a {kind}, not points or shapes.")
    return apply_affine(to_cs_matrix(el, cs, name), xy)


def image_levels(image) -> list:
    """The levels of a (possibly multiscale) image, finest first (:func:`spatialdata.get_pyramid_levels`)."""
    return [image] if isinstance(image, xr.DataArray) else list(get_pyramid_levels(image))


def pick_scale(image, max_pixels: int | None = None) -> xr.DataArray:
    """The finest level of a (possibly multiscale) image with at most ``max_pixels`` pixels.

    Without ``max_pixels`` the finest level is returned; if no level is small enough, the coarsest.
    """
    levels = image_levels(image)
    if max_pixels is None:
        return levels[0]
    return next((da for da in levels if da.sizes["y"] * da.sizes["x"] <= max_pixels), levels[-1])


def image_in_cs(
    sdata: SpatialData, name: str, cs: str, *, max_pixels: int | None = None, lazy: bool = False
) -> xr.DataArray:
    """An image element as a ``(c, y, x)`` DataArray with pixel-centre coordinates in ``cs``.

    Only axis-aligned transformations (scale + translation) are supported here; rotated images
    must be resampled first (e.g. with :func:`spatialdata.transform`). ``max_pixels`` reads the
    finest pyramid level of at most that many pixels (logged when it is not the finest);
    ``lazy=True`` keeps dask-backed data lazy instead of loading it.
    """
    kind = element_kind(sdata, name)
    if kind != "image":
        raise TypeError(f"element {name!r} is a {kind}, not an image.")
    el = sdata[name]
    m = to_cs_matrix(el, cs, name)
    da = pick_scale(el, max_pixels)
    base = pick_scale(el, None)
    if da.sizes["x"] != base.sizes["x"]:
        logger.info(
            "image %r read at %d x %d pixels (a pyramid level below its %d x %d), at most %d pixels asked",
            name,
            da.sizes["x"],
            da.sizes["y"],
            base.sizes["x"],
            base.sizes["y"],
            max_pixels,
        )
    if abs(m[0, 1]) > 1e-12 or abs(m[1, 0]) > 1e-12 or m[0, 0] <= 0 or m[1, 1] <= 0:
        raise ValueError(
            f"image {name!r} is rotated, sheared or flipped in {cs!r}; resample it to an axis-aligned grid first."
        )
    # pixel centres of this level in the level-0 intrinsic frame, then into cs
    fy = base.sizes["y"] / da.sizes["y"]
    fx = base.sizes["x"] / da.sizes["x"]
    x = m[0, 0] * (np.arange(da.sizes["x"]) + 0.5) * fx + m[0, 2]
    y = m[1, 1] * (np.arange(da.sizes["y"]) + 0.5) * fy + m[1, 2]
    return xr.DataArray(
        da.transpose("c", "y", "x").data if lazy else np.asarray(da.transpose("c", "y", "x").values),
        dims=("c", "y", "x"),
        coords={"c": da.coords["c"].values, "y": y, "x": x},
        name=name,
    )


def annotating_tables(sdata: SpatialData, element_name: str) -> list[str]:
    """Names of the tables annotating ``element_name`` (exactly that region), sorted.

    :func:`spatialdata.get_element_annotators` (0.7.x) tests ``element_name in region``, which for a table with one
    region (a string) is a substring test: ``xenium_cells`` matched the table of ``xenium_cells_aligned``, so
    re-applying an alignment mapped the aligned table a second time and a user's table of the aligned copy could
    stand in for the cells' own. Its candidates are kept only when a region equals the name.
    """
    out = []
    for name in get_element_annotators(sdata, element_name):
        region = get_table_keys(sdata.tables[name])[0]
        if element_name in ([region] if isinstance(region, str) else list(region)):
            out.append(name)
    return sorted(out)
