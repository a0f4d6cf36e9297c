"""The tissue both modalities cover (``shared_region``) and restricting a SpatialData to it (``subset_shared``)."""

from __future__ import annotations

import copy
import logging
import warnings

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree
from spatialdata import SpatialData, bounding_box_query
from spatialdata.models import ShapesModel, get_table_keys
from spatialdata.transformations import Identity, get_transformation, set_transformation

from .. import _store
from .._constants import ALIGNED_SUFFIX, MATCH_WEIGHT_KEY, SHARED_REGION_KEY, VISIUM_CS
from .._elements import apply_affine, shapes_xy, to_cs_matrix
from . import _data

logger = logging.getLogger(__name__)

#: with ``min_cells=None`` a spot joins the shared region when its lattice cell holds at least this
#: fraction of the median number of cells over the in-tissue spots that hold any
AUTO_MIN_FRACTION = 0.1


def _lattice_vectors(spots: np.ndarray, pitch: float) -> np.ndarray | None:
    """The three nearest-neighbour vectors of the spot lattice (``(3, 2)``), or ``None`` if unclear."""
    k = min(7, len(spots))
    d, idx = cKDTree(spots).query(spots, k=k)
    vec = (spots[idx[:, 1:]] - spots[:, None, :])[d[:, 1:] < 1.3 * pitch]
    if len(vec) < 6:
        return None
    ang = np.arctan2(vec[:, 1], vec[:, 0])
    flip = ang < 0
    vec[flip] *= -1  # directions modulo 180 degrees
    ang = np.where(flip, ang + np.pi, ang)
    phi = np.angle(np.mean(np.exp(3j * ang))) / 3.0  # the three directions are ~60 degrees apart
    out = []
    for j in range(3):
        ref = phi + j * np.pi / 3
        diff = np.angle(np.exp(2j * (ang - ref))) / 2  # angular distance modulo 180 degrees
        sel = np.abs(diff) < np.pi / 6
        if sel.sum() < 2:
            return None
        v = vec[sel]
        v = np.where((v @ np.array([np.cos(ref), np.sin(ref)]) < 0)[:, None], -v, v)
        out.append(np.median(v, axis=0))
    return np.asarray(out)


def _lattice_cells(spots: np.ndarray) -> tuple[np.ndarray, float]:
    """Voronoi cell of every spot (hexagons on a Visium lattice) and the lattice pitch.

    The lattice is completed with ghost spots one step beyond every spot, so spots on the edge of
    the tissue get whole hexagons too; cells are clipped to the disk circumscribing a hexagon
    (radius ``pitch / sqrt(3)``) so an irregular layout cannot run off to the envelope.
    """
    if len(spots) < 2:
        raise ValueError(f"need at least 2 Visium spots to find the spot lattice, got {len(spots)}.")
    d, _ = cKDTree(spots).query(spots, k=2)
    pitch = float(np.median(d[:, 1]))
    if not np.isfinite(pitch) or pitch <= 0:
        raise ValueError("Visium spots coincide: cannot find the spot lattice pitch.")
    vectors = _lattice_vectors(spots, pitch)
    allpts = spots
    if vectors is not None:
        steps = np.concatenate([vectors, -vectors])
        ghosts = (spots[:, None, :] + steps[None]).reshape(-1, 2)
        dist, _ = cKDTree(spots).query(ghosts)
        ghosts = ghosts[dist > 0.5 * pitch]
        if len(ghosts):  # one ghost per lattice site reached from several spots
            keep = np.ones(len(ghosts), dtype=bool)
            for i, j in sorted(cKDTree(ghosts).query_pairs(0.5 * pitch)):
                if keep[i]:
                    keep[j] = False
            ghosts = ghosts[keep]
            allpts = np.vstack([spots, ghosts])
    circum = pitch / np.sqrt(3.0) * 1.02
    pts = shapely.points(spots)
    try:
        vor = shapely.voronoi_polygons(shapely.MultiPoint(allpts), ordered=True)
        cells = np.asarray(shapely.get_parts(vor), dtype=object)[: len(spots)]
        if len(cells) != len(spots):  # pragma: no cover - defensive
            raise TypeError
    except TypeError:  # pragma: no cover - shapely < 2.1 / GEOS < 3.12: match cells to spots
        vor = np.asarray(shapely.get_parts(shapely.voronoi_polygons(shapely.MultiPoint(allpts))), dtype=object)
        poly_idx, pt_idx = shapely.STRtree(pts).query(vor, predicate="contains")
        cells = np.empty(len(spots), dtype=object)
        cells[pt_idx] = vor[poly_idx]
    disks = shapely.buffer(pts, circum, quad_segs=16)
    return shapely.intersection(cells, disks), pitch


def spot_cell_counts(sdata: SpatialData, *, use_match_weight: bool = False, cs: str = VISIUM_CS):
    """Cells (or summed match weight) in the lattice cell of every Visium spot.

    Returns ``(vis, xen, counts, assignment, pitch)``: the two modalities, per-spot count (Visium
    table order), the spot index of every cell (``-1`` outside the lattice) and the pitch (``cs`` units).
    """
    vis = _data.visium(sdata, cs)
    xen = _data.xenium(sdata, cs)
    d, _ = cKDTree(vis.xy).query(vis.xy, k=2)
    pitch = float(np.median(d[:, 1]))
    circum = pitch / np.sqrt(3.0) * 1.0001
    dist, idx = cKDTree(vis.xy).query(xen.xy, distance_upper_bound=circum)
    idx = np.where(np.isfinite(dist), idx, -1)
    if use_match_weight:
        w = _match_weight(sdata, xen)
    else:
        w = np.ones(len(idx))
    ok = idx >= 0
    counts = np.bincount(idx[ok], weights=w[ok], minlength=vis.table.n_obs)
    return vis, xen, counts, idx, pitch


def _match_weight(sdata: SpatialData, xen: _data.Modality) -> np.ndarray:
    for table in (xen.table, *(sdata.tables[t] for t in sdata.tables if t != xen.table_name)):
        if MATCH_WEIGHT_KEY in table.obs and table.n_obs == xen.table.n_obs:
            return np.clip(table.obs[MATCH_WEIGHT_KEY].to_numpy(dtype=np.float64), 0.0, 1.0)
    raise ValueError(
        f"use_match_weight=True needs the per-cell match weight obs[{MATCH_WEIGHT_KEY!r}] in "
        f"{xen.table_name!r}; it is written by sdata.align.lddmm(...)."
    )


def shared_region(
    sdata: SpatialData,
    *,
    min_cells: float | None = None,
    use_match_weight: bool = False,
    in_tissue_only: bool = True,
    key_added: str = SHARED_REGION_KEY,
    copy: bool = False,
) -> shapely.Polygon | shapely.MultiPolygon | None:
    """The tissue covered by both modalities, in the ``visium`` coordinate system (full-res pixels).

    The region is the union of the lattice cells (the hexagonal Voronoi cells, pitch 100 µm) of the
    in-tissue Visium spots whose lattice cell holds aligned Xenium cells. Aligned cells are
    ``xenium_cells_aligned`` when present (``sdata.align.apply``), else ``xenium_cells`` through
    its native affine into ``visium``. A cell belongs to the lattice cell of its nearest spot.

    Parameters
    ----------
    sdata
        SpatialData with the Visium spots/table and aligned Xenium cells.
    min_cells
        Fewest cells (or summed match weight) a spot's lattice cell needs. ``None``: 10 % of the
        median over the in-tissue spots holding any cell, and at least 1 cell without weights.
    use_match_weight
        Count each cell by its match confidence ``obs["align_match_weight"]`` (from
        ``sdata.align.lddmm``), so poorly matched cells weigh less.
    in_tissue_only
        Use only spots with ``obs["in_tissue"] == 1`` (the column is optional).
    key_added
        Name of the Shapes element written to ``sdata`` (one (multi)polygon in ``visium``, with
        columns ``n_spots``, ``n_cells`` and ``area_um2``). This is the only change made to ``sdata``.
    copy
        Return the region instead of writing it (scanpy's convention).

    Returns
    -------
    ``None`` (written to ``sdata[key_added]``) or, with ``copy=True``, the shared region as a shapely
    ``Polygon`` / ``MultiPolygon`` in full-resolution pixels.
    """
    if not copy and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"key_added must name the Shapes element to write (or pass copy=True), got {key_added!r}.")
    vis, _, counts, assignment, _ = spot_cell_counts(sdata, use_match_weight=use_match_weight)
    tissue = _data.in_tissue(vis) if in_tissue_only else np.ones(vis.table.n_obs, dtype=bool)
    if min_cells is None:
        occupied = counts[tissue & (counts > 0)]
        min_cells = AUTO_MIN_FRACTION * float(np.median(occupied)) if len(occupied) else 1.0
        if not use_match_weight:
            min_cells = max(min_cells, 1.0)
    selected = tissue & (counts >= min_cells) & (counts > 0)
    if not selected.any():
        raise ValueError(
            f"the modalities share no tissue: {int((assignment >= 0).sum())} of {len(assignment)} aligned Xenium "
            f"cells fall on the Visium spot lattice, none on {int(tissue.sum())} in-tissue spots with >= {min_cells:g} "
            "cells. Check the alignment (sda.pl.overlay)."
        )
    lattice, _ = _lattice_cells(vis.xy)
    region = shapely.make_valid(shapely.union_all(lattice[selected]))
    if region.geom_type == "GeometryCollection":  # pragma: no cover - make_valid leftovers
        region = shapely.union_all([g for g in shapely.get_parts(region) if g.geom_type in ("Polygon", "MultiPolygon")])
    n_cells = float(counts[selected].sum())
    logger.info("shared region: %d spots, %.0f cells", int(selected.sum()), n_cells)
    if copy:
        return region
    upp = _data.um_per_px(sdata, vis)
    gdf = gpd.GeoDataFrame(
        {"n_spots": [int(selected.sum())], "n_cells": [n_cells], "area_um2": [float(region.area) * upp**2]},
        geometry=[region],
    )
    sdata.shapes[key_added] = ShapesModel.parse(gdf, transformations={VISIUM_CS: Identity()})
    return None


# ---------------------------------------------------------------------------------------- subsetting
def _as_region(sdata: SpatialData, region, cs: str, key: str):
    """``(geometry, name_to_carry)`` from the ``region`` argument of :func:`subset_shared`."""
    if region is None:
        if key in sdata.shapes:
            region = key
        else:
            geom = shared_region(sdata, copy=True)
            return geom, None
    if isinstance(region, str):
        if region not in sdata.shapes:
            raise KeyError(f"no shapes element {region!r} to subset by; shapes present: {sorted(sdata.shapes)}.")
        gdf = sdata.shapes[region]
        m = to_cs_matrix(gdf, cs, region)
        if "radius" in gdf.columns:
            geoms = shapely.buffer(gdf.geometry.values, gdf["radius"].to_numpy(dtype=float))
        else:
            geoms = gdf.geometry.values
        geom = shapely.union_all(geoms)
        mat = [m[0, 0], m[0, 1], m[1, 0], m[1, 1], m[0, 2], m[1, 2]]
        return shapely.affinity.affine_transform(geom, mat), region
    if isinstance(region, shapely.Polygon | shapely.MultiPolygon):
        return region, None
    try:
        arr = None if isinstance(region, shapely.Geometry) else np.asarray(region, dtype=float)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.shape == (4,):
        xmin, ymin, xmax, ymax = arr
        if not (xmax > xmin and ymax > ymin):
            raise ValueError(f"bounding box must be (xmin, ymin, xmax, ymax) with max > min, got {arr.tolist()}.")
        return shapely.box(xmin, ymin, xmax, ymax), None
    raise TypeError(
        "region must be None (the stored shared region), the name of a Shapes element, a shapely "
        f"Polygon/MultiPolygon or a bounding box (xmin, ymin, xmax, ymax); got {type(region).__name__}."
    )


def _points_partition(df, m, prepared):
    if len(df) == 0:
        return df
    xy = apply_affine(m, df[["x", "y"]].to_numpy(dtype=np.float64))
    return df[shapely.contains_xy(prepared, xy[:, 0], xy[:, 1])]


def _subset_points(el, m, prepared):
    out = el.map_partitions(_points_partition, m, prepared, meta=el._meta)
    out.attrs.update(copy.deepcopy(dict(el.attrs)))
    return out


def _subset_shapes(gdf, mask):
    if not mask.any():
        return None
    out = gdf.loc[mask].copy()
    set_transformation(out, copy.deepcopy(get_transformation(gdf, get_all=True)), set_all=True)
    return out


def _filter_table(table, kept: dict[str, pd.Index], dropped: set[str]):
    region, region_key, instance_key = get_table_keys(table)
    regions = [region] if isinstance(region, str) else list(region or [])
    if not regions or not any(r in kept or r in dropped for r in regions):
        return table.copy()
    obs = table.obs
    keep = np.zeros(table.n_obs, dtype=bool)
    reg_col = obs[region_key].astype(str).to_numpy()
    inst = obs[instance_key]
    for r in regions:
        rows = reg_col == r
        if r in kept:
            keep |= rows & inst.isin(kept[r]).to_numpy()
        elif r not in dropped:
            keep |= rows
    if not keep.any():
        return None
    out = table[keep].copy()
    if len(set(reg_col[keep])) < len(regions):  # an annotated element lost every row: it no longer annotates it
        if isinstance(out.obs[region_key].dtype, pd.CategoricalDtype):
            out.obs[region_key] = out.obs[region_key].cat.remove_unused_categories()
        SpatialData.update_annotated_regions_metadata(out)
    return out


def subset_shared(
    sdata: SpatialData,
    region=None,
    *,
    cs: str = VISIUM_CS,
    key: str = SHARED_REGION_KEY,
) -> SpatialData:
    """A new SpatialData with both modalities (elements and their tables) restricted to a region.

    The input is not modified. Membership rules:

    * shapes (cells, spots, boundaries): a geometry is kept when its centre (circle centre or
      polygon centroid) mapped into ``cs`` lies in the region. An element ``X`` that has an aligned
      copy ``X_aligned`` keeps exactly the instances its aligned copy keeps, so ``xenium_cells`` and
      ``xenium_cells_aligned`` (and their tables) stay row-for-row consistent.
    * points (transcripts): points inside the region, through their own transformation into
      ``cs`` (lazy: filtered partition by partition when computed).
    * images and labels: cropped to the region's bounding box with
      :func:`spatialdata.bounding_box_query` (as spatialdata's polygon query does).
    * tables: rows annotating kept instances; tables annotating no spatial element are copied.
    * the alignment's own elements (velocity field, match weight, landmarks), the region element
      and ``sdata.attrs`` are carried over unchanged so ``sdata.align`` keeps working; other
      elements not mapped to ``cs`` are carried over unfiltered with a warning.

    Shapes and points are tested with vectorised shapely containment rather than
    :func:`spatialdata.polygon_query`, which buffers every circle into a polygon and tests it in a
    Python loop: on 100k cells / 4k spots this takes 0.3 s against 4.7 s
    (``benchmarks/bench_tl.py``), and the gap widens with more cell elements or a more complex region.

    Parameters
    ----------
    sdata
        The SpatialData to subset.
    region
        ``None``: the Shapes element ``key`` (written by :func:`shared_region`; computed on the fly,
        without writing to ``sdata``, if absent); the name of a Shapes element (union of its
        geometries); a shapely ``Polygon`` / ``MultiPolygon`` in ``cs``; or a bounding box
        ``(xmin, ymin, xmax, ymax)`` in ``cs`` units (full-resolution pixels for ``visium``).
    cs
        Coordinate system of the region.
    key
        Name of the stored shared region.

    Returns
    -------
    The restricted SpatialData (the region is included as Shapes element ``key``).
    """
    if cs not in sdata.coordinate_systems:
        raise KeyError(f"no coordinate system {cs!r}; this SpatialData has {sdata.coordinate_systems}.")
    geom, carry_name = _as_region(sdata, region, cs, key)
    if geom.is_empty:
        raise ValueError("the region is empty.")
    prepared = shapely.from_wkb(shapely.to_wkb(geom))  # a prepared copy; the caller's geometry is untouched
    shapely.prepare(prepared)
    own = _store.own_elements(sdata)
    carried = own | ({carry_name} if carry_name else set())
    minx, miny, maxx, maxy = geom.bounds
    out: dict[str, dict] = {"images": {}, "labels": {}, "points": {}, "shapes": {}}
    kept: dict[str, pd.Index] = {}
    dropped: set[str] = set()
    unmapped: list[str] = []
    # shapes: aligned copies first, so originals can follow their aligned copy
    shape_names = sorted(sdata.shapes, key=lambda n: not n.endswith(ALIGNED_SUFFIX))
    masks: dict[str, pd.Series] = {}
    for name in shape_names:
        gdf = sdata.shapes[name]
        if name in carried:
            out["shapes"][name] = gdf.copy()
            continue
        twin = f"{name}{ALIGNED_SUFFIX}"
        if twin in masks and masks[twin].index.equals(gdf.index):
            mask = masks[twin].to_numpy()
        elif _data.in_cs(gdf, cs):
            xy = apply_affine(to_cs_matrix(gdf, cs, name), shapes_xy(gdf))
            mask = shapely.contains_xy(prepared, xy[:, 0], xy[:, 1])
        else:
            unmapped.append(name)
            out["shapes"][name] = gdf.copy()
            continue
        masks[name] = pd.Series(mask, index=gdf.index)
        sub = _subset_shapes(gdf, mask)
        if sub is None:
            dropped.add(name)
        else:
            out["shapes"][name] = sub
            kept[name] = sub.index
    for name, el in sdata.points.items():
        if name in carried:
            out["points"][name] = el
        elif _data.in_cs(el, cs):
            out["points"][name] = _subset_points(el, to_cs_matrix(el, cs, name), prepared)
        else:
            unmapped.append(name)
            out["points"][name] = el
    for kind in ("images", "labels"):
        for name, el in getattr(sdata, kind).items():
            if name in carried:
                out[kind][name] = el
            elif _data.in_cs(el, cs):
                q = bounding_box_query(
                    el,
                    axes=("x", "y"),
                    min_coordinate=[minx, miny],
                    max_coordinate=[maxx, maxy],
                    target_coordinate_system=cs,
                )
                if q is None:
                    dropped.add(name)
                else:
                    out[kind][name] = q
            else:
                unmapped.append(name)
                out[kind][name] = el
    if unmapped:
        warnings.warn(
            f"elements not mapped to coordinate system {cs!r} were kept unfiltered: {sorted(unmapped)}.", stacklevel=2
        )
    tables = {}
    for tname, table in sdata.tables.items():
        t = _filter_table(table, kept, dropped)
        if t is not None:
            tables[tname] = t
    if carry_name is None and key not in out["shapes"] and region is None:
        upp = _data.um_per_px(sdata)
        gdf = gpd.GeoDataFrame({"area_um2": [float(geom.area) * upp**2]}, geometry=[geom])
        out["shapes"][key] = ShapesModel.parse(gdf, transformations={cs: Identity()})
    logger.info("subset_shared: kept %s", {n: len(v) for n, v in kept.items()} | {"dropped": sorted(dropped)})
    return SpatialData(**out, tables=tables, attrs=copy.deepcopy(dict(sdata.attrs)))
