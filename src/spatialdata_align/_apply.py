"""Materialising aligned copies of elements (``sdata.align.apply``).

Aligned elements carry only native transformations (``Identity`` or a pixel-grid scale +
translation into the output coordinate system), so every spatialdata tool works on them.
"""

from __future__ import annotations

import logging

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel, get_table_keys
from spatialdata.transformations import Identity, get_transformation

from . import _store
from ._constants import ALIGNED_SUFFIX, SPATIAL_KEY
from ._elements import (
    annotating_tables,
    apply_affine,
    element_kind,
    image_in_cs,
    image_levels,
    parse_lazy_points,
    to_cs_matrix,
)
from .registration import Registration
from .registration._warp import DEFAULT_CHUNK, Grid, Levels, TransformMap, warp_levels

logger = logging.getLogger(__name__)


def _mapper(reg: Registration, m_pre: np.ndarray, direction: str):
    """``f(xy_intrinsic) -> xy_out``: element intrinsic → input cs → registration."""
    identity = np.array_equal(m_pre, np.eye(3))

    def f(xy: np.ndarray) -> np.ndarray:  # (both convert to float64)
        return reg.transform_points(xy if identity else apply_affine(m_pre, xy), direction)

    return f


#: points transformed at a time inside a partition. The temporaries of one chunk (~15 float64 / index arrays) stay
#: in the processor's cache: reading and mapping the 26M transcripts of the 168k-cell bundle takes 2.8 s two
#: partitions at a time with chunks of 65536 points, 4.3 s with chunks of 1M (``python
#: benchmarks/bench_transcripts.py --transform FILE``, 2026-12-03; the mapping alone 0.7 vs 5.2-7.2 s).
POINT_CHUNK = 65_536


def _mapped_dtype(col) -> np.dtype:
    """The dtype of a mapped coordinate column.

    The column's own when it is a numpy float (float32 stays float32: the precision the coordinates were given in),
    else float64 (integer pixel positions do not stay integers).
    """
    dt = col.dtype
    return dt if isinstance(dt, np.dtype) and dt.kind == "f" else np.dtype(np.float64)


def _transform_partition(df, reg: Registration, m_pre: np.ndarray, direction: str):
    """The partition with ``x``, ``y`` mapped (same dtypes); the other columns are shared, not copied."""
    if len(df) == 0:
        return df.astype({c: _mapped_dtype(df[c]) for c in ("x", "y")})
    f = _mapper(reg, m_pre, direction)
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    new_x, new_y = np.empty(len(df), _mapped_dtype(df["x"])), np.empty(len(df), _mapped_dtype(df["y"]))
    xy = np.empty((min(len(df), POINT_CHUNK), 2), dtype=np.float64)
    for s in range(0, len(df), POINT_CHUNK):
        e = min(s + POINT_CHUNK, len(df))
        block = xy[: e - s]
        block[:, 0] = x[s:e]
        block[:, 1] = y[s:e]
        mapped = f(block)
        new_x[s:e] = mapped[:, 0]
        new_y[s:e] = mapped[:, 1]
    columns = {c: df[c] for c in df.columns}
    columns["x"], columns["y"] = new_x, new_y
    return pd.DataFrame(columns, index=df.index, copy=False)


def _points(el, reg, m_pre, direction, out_cs):
    meta = el._meta.astype({c: _mapped_dtype(el._meta[c]) for c in ("x", "y")})
    ddf = el.map_partitions(_transform_partition, reg, m_pre, direction, meta=meta)
    ddf.attrs.clear()
    feature_key = el.attrs.get("spatialdata_attrs", {}).get("feature_key")
    instance_key = el.attrs.get("spatialdata_attrs", {}).get("instance_key")
    kw = {}
    if feature_key is not None:
        kw["feature_key"] = feature_key
    if instance_key is not None:
        kw["instance_key"] = instance_key
    return parse_lazy_points(ddf, transformations={out_cs: Identity()}, **kw)


def _local_scale(reg: Registration, m_pre: np.ndarray, direction: str) -> float:
    lin = reg.affine[:2, :2] @ m_pre[:2, :2]
    s = abs(np.linalg.det(lin)) ** 0.5
    return (
        s
        if direction == "forward"
        else abs(np.linalg.det(m_pre[:2, :2])) ** 0.5 / abs(np.linalg.det(reg.affine[:2, :2])) ** 0.5
    )


def _shapes(el, reg, m_pre, direction, out_cs):
    f = _mapper(reg, m_pre, direction)
    gdf = el.copy()
    geom = gdf.geometry
    if len(geom) and (geom.geom_type == "Point").all():
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
        out = f(xy)
        gdf = gpd.GeoDataFrame(gdf.drop(columns="geometry"), geometry=gpd.points_from_xy(out[:, 0], out[:, 1]))
        if "radius" in gdf.columns:
            gdf["radius"] = gdf["radius"].to_numpy(dtype=float) * _local_scale(reg, m_pre, direction)
    else:
        gdf = gpd.GeoDataFrame(gdf.drop(columns="geometry"), geometry=shapely.transform(geom.values, f))
    gdf.index = el.index
    gdf.attrs = {}
    return ShapesModel.parse(gdf, transformations={out_cs: Identity()})


def pyramid_factors(shape, chunk: int = DEFAULT_CHUNK) -> list[int] | None:
    """Scale factors (2 each) until the longer side fits one ``chunk``; ``None`` if it already does."""
    side, factors = max(int(s) for s in shape), []
    while side > chunk and len(factors) < 12:
        factors.append(2)
        side //= 2
    return factors or None


def _element_extent(el_shape: tuple[int, int], m_pre: np.ndarray) -> np.ndarray:
    """Points along the pixel edges of an image (intrinsic ``[0, nx] x [0, ny]``), in its input cs."""
    ny, nx = el_shape
    corners = np.array([[0.0, 0.0], [nx, 0.0], [nx, ny], [0.0, ny]])
    edges = np.concatenate([np.linspace(corners[i], corners[(i + 1) % 4], 50) for i in range(4)])
    return apply_affine(m_pre, edges)


def _grid_from(sdata, grid, out_cs: str, direction: str, reg, edges_in, dx_in: float, pixel_size):
    """Output pixel-centre coordinates: a given grid, an image element's grid, or the mapped input extent."""
    if isinstance(grid, tuple):
        return np.asarray(grid[0], float), np.asarray(grid[1], float)
    if isinstance(grid, str):
        da = image_in_cs(sdata, grid, out_cs, lazy=True)
        return da.coords["x"].values, da.coords["y"].values
    if grid is not None:
        raise TypeError(f"grid must be an image element name or an (x, y) tuple of pixel centres, got {type(grid)}.")
    # a grid covering the mapped input extent, at the input's resolution unless pixel_size is given
    mapped = reg.transform_points(edges_in, direction)
    if pixel_size is None:
        pixel_size = dx_in * _local_scale(reg, np.eye(3), direction)
    lo, hi = mapped.min(0), mapped.max(0)
    nx = max(int(np.ceil((hi[0] - lo[0]) / pixel_size)), 2)
    ny = max(int(np.ceil((hi[1] - lo[1]) / pixel_size)), 2)
    return lo[0] + (np.arange(nx) + 0.5) * pixel_size, lo[1] + (np.arange(ny) + 0.5) * pixel_size


def _cap(gx: np.ndarray, gy: np.ndarray, max_pixels: int | None, element: str) -> tuple[np.ndarray, np.ndarray]:
    """Coarsen the output grid (same extent) to at most ``max_pixels`` pixels, saying so."""
    n = gx.size * gy.size
    if max_pixels is None or n <= max_pixels:
        return gx, gy
    f = (n / max_pixels) ** 0.5
    dx, dy = (gx[1] - gx[0]) * f, (gy[1] - gy[0]) * f
    x0, y0 = gx[0] - (gx[1] - gx[0]) / 2, gy[0] - (gy[1] - gy[0]) / 2
    nx = max(int((gx.size * (gx[1] - gx[0])) // dx), 2)
    ny = max(int((gy.size * (gy[1] - gy[0])) // dy), 2)
    logger.warning(
        "max_pixels=%d: the aligned %r is %d x %d pixels of %.4g x %.4g instead of %d x %d of %.4g x %.4g",
        max_pixels,
        element,
        nx,
        ny,
        dx,
        dy,
        gx.size,
        gy.size,
        gx[1] - gx[0],
        gy[1] - gy[0],
    )
    return x0 + (np.arange(nx) + 0.5) * dx, y0 + (np.arange(ny) + 0.5) * dy


def _image(sdata, element, reg, direction, in_cs, out_cs, grid, pixel_size, *, max_pixels, level, chunk, map_step):
    """The aligned image: lazy (dask), at native resolution unless told otherwise, a pyramid when large."""
    import dask.array as da

    el = sdata[element]
    levels = [lv.transpose("c", "y", "x") for lv in image_levels(el)]
    base = levels[0]
    shape0 = (base.sizes["y"], base.sizes["x"])
    m_pre = to_cs_matrix(el, in_cs, element)  # level-0 intrinsic -> input cs
    dx_in = abs(np.linalg.det(m_pre[:2, :2])) ** 0.5
    gx, gy = _grid_from(sdata, grid, out_cs, direction, reg, _element_extent(shape0, m_pre), dx_in, pixel_size)
    gx, gy = _cap(gx, gy, max_pixels, element)
    arrays = [
        lv.data if isinstance(lv.data, da.Array) else da.from_array(lv.data, chunks=(lv.shape[0], chunk, chunk))
        for lv in levels
    ]
    # output point (out cs) -> registration -> input cs -> level-0 intrinsic -> level-0 pixel indices
    to_index = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]]) @ np.linalg.inv(m_pre)
    inputs = Levels(
        arrays,
        np.arange(shape0[1]) + 0.5,
        np.arange(shape0[0]) + 0.5,
        list(base.coords["c"].values),
        [(shape0[1] / a.shape[2], shape0[0] / a.shape[1]) for a in arrays],
    )
    back = "inverse" if direction == "forward" else "forward"
    data = warp_levels(
        inputs,
        TransformMap(reg, back, to_index),
        Grid.from_coords(gx, gy),
        level=level,
        fill=0,
        dtype=base.dtype,
        chunk=chunk,
        map_step=map_step,
    )
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=inputs.channels,
        scale_factors=pyramid_factors(data.shape[1:], chunk),
        chunks=(data.shape[0], chunk, chunk),
        transformations={out_cs: _store.grid_transformation(gx, gy)},
    )


def spatial_uns_of(sdata, cs: str, skip: set[str] = frozenset()) -> dict | None:
    """``uns['spatial']`` (scanpy layout) of a table whose element lives in ``cs`` natively (e.g. the Visium spots).

    Its images and scale factors describe that coordinate system (full-resolution pixels for ``visium``), so
    positions mapped into ``cs`` are drawn on them by :func:`scanpy.pl.spatial` and
    ``squidpy.pl.spatial_scatter``.
    """
    for tname, table in sdata.tables.items():
        if tname in skip or not isinstance(table.uns.get(SPATIAL_KEY), dict) or not table.uns[SPATIAL_KEY]:
            continue
        regions = table.uns.get(TableModel.ATTRS_KEY, {}).get(TableModel.REGION_KEY)
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        for r in regions:
            if r in sdata and cs in get_transformation(sdata[r], get_all=True):
                m = to_cs_matrix(sdata[r], cs, r)
                if np.allclose(m, np.eye(3)):  # the element's own frame is cs: its images are cs images
                    return table.uns[SPATIAL_KEY]
    return None


#: obs columns holding positions in the input frame (Xenium's cell centroids, µm): renamed in an aligned copy
_POSITION_COLUMNS = ("x_centroid", "y_centroid")


def _table_copy(
    sdata, tname, f_xy, region_name: str | None, out_cs: str | None = None, in_cs: str | None = None
) -> ad.AnnData:
    table = sdata.tables[tname]
    new = table.copy()
    if SPATIAL_KEY in new.obsm:
        new.obsm[SPATIAL_KEY] = f_xy(np.asarray(new.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2])
    if in_cs is not None:
        # positions of the input frame under their usual names would read as the copy's own (obsm is in the output
        # frame): the copy names their frame
        new.obs = new.obs.rename(columns={c: f"{c}_{in_cs}" for c in _POSITION_COLUMNS if c in new.obs.columns})
    if out_cs is not None:
        # the original's scanpy images/scale factors describe its own frame: take those of the output frame
        new.uns.pop(SPATIAL_KEY, None)
        spatial = spatial_uns_of(sdata, out_cs, skip={tname})
        if spatial is not None:
            new.uns[SPATIAL_KEY] = {lib: dict(v) for lib, v in spatial.items()}
    if region_name is not None:
        _, region_key, instance_key = get_table_keys(table)
        new.obs[region_key] = region_name
        new.obs[region_key] = new.obs[region_key].astype("category")
        new.uns.pop(TableModel.ATTRS_KEY, None)
        new = TableModel.parse(new, region=region_name, region_key=region_key, instance_key=instance_key)
    return new


def apply(
    sdata: SpatialData,
    element: str,
    *,
    key: str,
    inverse: bool,
    name: str | None,
    tables: bool,
    grid,
    pixel_size,
    max_pixels: int | None = None,
    level: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    map_step: int | None = None,
) -> str:
    entry = _store.get_entry(sdata, key)
    reg = _store.load_registration(sdata, key)
    direction = "inverse" if inverse else "forward"
    in_cs, out_cs = (entry["target_cs"], entry["source_cs"]) if inverse else (entry["source_cs"], entry["target_cs"])
    # the output system too when the element fitted in it is here but no longer in it (its system was renamed): the
    # copy would land alone in a new, empty system. (Absent with its element, it is made: a store applied elsewhere.)
    out_element = entry.get("source_element" if inverse else "target_element")
    lacking = [in_cs] if in_cs not in sdata.coordinate_systems else []
    if out_cs not in sdata.coordinate_systems and out_element is not None and out_element in sdata:
        lacking.append(out_cs)
    if lacking:
        raise KeyError(
            f"stored transform {key!r} maps {entry['source_cs']!r} to {entry['target_cs']!r}, but this SpatialData "
            f"has no coordinate system {lacking[0]!r} (it has {sorted(sdata.coordinate_systems)}): "
            "sdata.rename_coordinate_systems renamed it (sdata.align keeps the names it was fitted in; rename them "
            "back first), or filter_by_coordinate_system / spatialdata.transform dropped it (apply on the object "
            "it came from)."
        )
    kind = element_kind(sdata, element)
    name = name or f"{element}{ALIGNED_SUFFIX}"
    if name == element:
        raise ValueError("the aligned element needs a new name (name == element).")
    if kind == "table":
        region, _, _ = get_table_keys(sdata.tables[element])
        region = region if isinstance(region, str) else region[0]
        m_pre = to_cs_matrix(sdata[region], in_cs, region)
        aligned_region = f"{region}{ALIGNED_SUFFIX}"
        sdata.tables[name] = _table_copy(
            sdata,
            element,
            _mapper(reg, m_pre, direction),
            aligned_region if aligned_region in sdata else None,
            out_cs,
            in_cs,
        )
        _store.record_applied(sdata, key, {element: name})
        return name
    el = sdata[element]
    m_pre = to_cs_matrix(el, in_cs, element)
    if kind == "points":
        sdata.points[name] = _points(el, reg, m_pre, direction, out_cs)
    elif kind == "shapes":
        sdata.shapes[name] = _shapes(el, reg, m_pre, direction, out_cs)
    elif kind == "image":
        sdata.images[name] = _image(
            sdata,
            element,
            reg,
            direction,
            in_cs,
            out_cs,
            grid,
            pixel_size,
            max_pixels=max_pixels,
            level=level,
            chunk=chunk,
            map_step=map_step,
        )
    else:
        raise TypeError(f"element {element!r} is {kind}; apply supports points, shapes, images and tables.")
    applied = {element: name}
    if tables and kind in ("shapes", "points"):
        for tname in annotating_tables(sdata, element):
            tnew = f"{tname}{ALIGNED_SUFFIX}" if name == f"{element}{ALIGNED_SUFFIX}" else f"{tname}_{name}"
            sdata.tables[tnew] = _table_copy(sdata, tname, _mapper(reg, m_pre, direction), name, out_cs, in_cs)
            applied[tname] = tnew
    _store.record_applied(sdata, key, applied)
    _store.sync_global(sdata)
    logger.info("aligned %s -> %s (%s, transform %r)", element, name, direction, key)
    return name
