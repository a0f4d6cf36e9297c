"""Xenium pseudo-spots on the Visium spot footprints and the per-gene comparison of the two modalities."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from scipy.stats import ConstantInputWarning, pearsonr, rankdata
from spatialdata import SpatialData
from spatialdata.models import TableModel, get_table_keys

from .._constants import (
    INSTANCE_KEY,
    PSEUDO_SPOTS_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_COMPARE_KEY,
    VISIUM_CS,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._elements import with_uns
from . import _data

logger = logging.getLogger(__name__)

#: ``uns`` key of a pseudo-spot AnnData holding how it was built
UNS_PSEUDO_KEY = "sda_pseudo_spots"


def _radius_px(sdata: SpatialData, vis: _data.Modality, radius, units: str) -> np.ndarray:
    if units not in ("um", "px"):
        raise ValueError(f"units must be 'um' (micrometres) or 'px' (full-resolution pixels), got {units!r}.")
    n = vis.table.n_obs
    if radius is None:
        if vis.radius is not None:
            return vis.radius.astype(np.float64)
        return np.full(n, VISIUM_SPOT_DIAMETER_UM / 2 / _data.um_per_px(sdata, vis))
    r = float(radius)
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"radius must be a positive number, got {radius!r}.")
    if units == "um":
        r /= _data.um_per_px(sdata, vis)
    return np.full(n, r)


def pseudo_spots(
    sdata: SpatialData,
    *,
    radius: float | None = None,
    units: str = "um",
    genes=None,
    layer: str | None = None,
    key_added: str = PSEUDO_SPOTS_KEY,
    copy: bool = False,
) -> ad.AnnData | None:
    """Aggregate the aligned Xenium cells into the Visium spot footprints.

    A cell joins a spot when its centre, in the ``visium`` frame, lies within ``radius`` of the
    spot centre (by default the spot's own radius, 27.5 µm, so the 55 µm spot). Counts of the genes
    both modalities measure (:func:`shared_genes`) are summed over those cells. The neighbour search is
    a KD-tree (:class:`scipy.spatial.cKDTree`) and the aggregation one sparse matrix product:
    ``benchmarks/bench_tl.py`` measures it against :func:`spatialdata.aggregate`.

    Aligned cells are ``xenium_cells_aligned`` / ``xenium_table_aligned`` when present, else
    ``xenium_cells`` / ``xenium_table`` through their native transformation into ``visium``.

    Parameters
    ----------
    sdata
        SpatialData with Visium spots/table and aligned Xenium cells.
    radius
        Aggregation radius around each spot centre; ``None`` uses each spot's radius.
    units
        Units of ``radius``: ``"um"`` (micrometres) or ``"px"`` (full-resolution pixels).
    genes
        Symbols to aggregate (default: every shared gene).
    layer
        Xenium table layer holding counts (default ``X``).
    key_added
        Name of the table written to ``sdata`` (annotating ``visium_spots``).
    copy
        Return the AnnData instead of writing it (scanpy's convention).

    Returns
    -------
    ``None``, having written table ``key_added`` (the only change made to ``sdata``), or with ``copy=True``
    the AnnData: one row per Visium spot, in the order of ``visium_table`` (``obs_names`` = its
    barcodes), one variable per shared gene (``var["xenium_var"]``, ``var["visium_var"]``: the
    variables summed). ``X``: summed Xenium counts (sparse, float32). ``obs``: ``n_cells``,
    ``total_counts`` (all non-control Xenium genes of those cells: the pseudo-spot library size),
    ``in_tissue`` (when Visium has it), ``region``/``instance_id`` (the spot). ``obsm["spatial"]``:
    spot centres (full-resolution pixels). ``uns["sda_pseudo_spots"]``: radius (px and µm) and the
    elements used.
    """
    if not copy:
        _key(key_added)
    vis = _data.visium(sdata, VISIUM_CS)
    xen = _data.xenium(sdata, VISIUM_CS)
    r = _radius_px(sdata, vis, radius, units)
    gm = _data._match(xen.table, vis.table, genes)
    n_spots, n_cells = vis.table.n_obs, xen.table.n_obs
    if n_cells:
        lists = cKDTree(xen.xy).query_ball_point(vis.xy, r, return_sorted=False)
        lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n_spots)
        cols = np.fromiter((c for x in lists for c in x), dtype=np.int64, count=int(lens.sum()))
    else:
        lens, cols = np.zeros(n_spots, dtype=np.int64), np.zeros(0, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    S = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(n_spots, n_cells))
    P = sp.csr_matrix(S @ _data.shared_counts(xen.table, gm["xenium_var"], layer))
    P.sort_indices()
    totals = S @ _data.gene_totals(xen.table, layer)
    _, _, v_instance = get_table_keys(vis.table)
    obs = pd.DataFrame(
        {
            "n_cells": lens.astype(np.int64),
            "total_counts": np.asarray(totals, dtype=np.float64),
            REGION_KEY: pd.Categorical([vis.element] * n_spots),
            INSTANCE_KEY: vis.table.obs[v_instance].to_numpy(),
        },
        index=vis.table.obs_names.copy(),
    )
    if "in_tissue" in vis.table.obs:
        obs.insert(2, "in_tissue", vis.table.obs["in_tissue"].to_numpy())
    var = pd.DataFrame(
        {"xenium_var": [";".join(v) for v in gm["xenium_var"]], "visium_var": [";".join(v) for v in gm["visium_var"]]},
        index=pd.Index(gm["gene"].tolist(), name=None),
    )
    upp = _data.um_per_px(sdata, vis)
    uns = {
        UNS_PSEUDO_KEY: {
            "radius_px": float(np.median(r)),
            "radius_um": float(np.median(r) * upp),
            "cells_element": xen.element,
            "cells_table": xen.table_name,
            "spots_element": vis.element,
        }
    }
    out = ad.AnnData(X=P.astype(np.float32), obs=obs, var=var, obsm={SPATIAL_KEY: vis.xy.copy()}, uns=uns)
    logger.info("pseudo-spots: %d cells into %d spots (%d genes)", int(lens.sum()), n_spots, out.n_vars)
    if copy:
        return out
    sdata.tables[_key(key_added)] = TableModel.parse(
        out, region=vis.element, region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
    return None


def _key(key_added) -> str:
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must name where the result goes (or pass copy=True), got {key_added!r}.")
    return key_added


# ---------------------------------------------------------------------------------------- comparison
@dataclass
class Paired:
    """Spot-level expression of shared genes in both modalities, after normalisation and log1p."""

    genes: list[str]
    barcodes: pd.Index
    xy: np.ndarray  #: spot centres, full-resolution pixels
    xenium: np.ndarray  #: (n_spots, n_genes) log1p library-normalised pseudo-spot expression
    visium: np.ndarray  #: (n_spots, n_genes) log1p library-normalised spot expression
    xenium_counts: np.ndarray
    visium_counts: np.ndarray
    n_cells: np.ndarray


def paired_expression(
    sdata: SpatialData,
    genes=None,
    *,
    radius: float | None = None,
    units: str = "um",
    min_cells: int = 1,
    in_tissue_only: bool = True,
    library: str = "all",
    layer: str | None = None,
    visium_layer: str | None = None,
    pseudo: ad.AnnData | None = None,
) -> Paired:
    """The spots compared by :func:`compare_genes` and both modalities' normalised expression there.

    Parameters are those of :func:`compare_genes`.
    """
    if library not in ("all", "shared"):
        raise ValueError(f"library must be 'all' (every gene of each modality) or 'shared', got {library!r}.")
    vis = _data.visium(sdata, VISIUM_CS)
    if isinstance(pseudo, str):
        if pseudo not in sdata.tables:
            raise KeyError(f"no table {pseudo!r} of pseudo-spots; tables present: {sorted(sdata.tables)}.")
        pseudo = sdata.tables[pseudo]
    if pseudo is None:
        pseudo = pseudo_spots(sdata, radius=radius, units=units, layer=layer, copy=True)
    xenium_table = _data._xenium_table(sdata) if genes is not None else None
    return paired_from(vis, pseudo, genes, xenium_table, min_cells, in_tissue_only, library, visium_layer)


def paired_from(
    vis: _data.Modality,
    pseudo: ad.AnnData,
    genes=None,
    xenium_table: ad.AnnData | None = None,
    min_cells: int = 1,
    in_tissue_only: bool = True,
    library: str = "all",
    visium_layer: str | None = None,
) -> Paired:
    """:class:`Paired` expression of Xenium aggregates (``pseudo``: one row per ``vis`` row) and ``vis``.

    The shared core of :func:`paired_expression` (Visium spots) and :func:`spatialdata_align.tl.compare_bins`
    (Visium HD bins).
    """
    missing = vis.table.obs_names.difference(pseudo.obs_names)
    if len(missing):
        raise ValueError(
            f"pseudo lacks {len(missing)} rows of {vis.table_name!r} (e.g. {missing[:3].tolist()}); build it with "
            "sda.tl.pseudo_spots (or sda.tl.bin_cells) on this object."
        )
    pseudo = pseudo[vis.table.obs_names]
    gm = pd.DataFrame(
        {"gene": pseudo.var_names.astype(str), "visium_var": [v.split(";") for v in pseudo.var["visium_var"]]}
    )
    V = _data.shared_counts(vis.table, gm["visium_var"], visium_layer)
    V = sp.csr_matrix(V)
    P = sp.csr_matrix(pseudo.X)
    if library == "all":
        xlib = pseudo.obs["total_counts"].to_numpy(dtype=np.float64)
        vlib = _data.gene_totals(vis.table, visium_layer)
    else:
        xlib = np.asarray(P.sum(1)).ravel().astype(np.float64)
        vlib = np.asarray(V.sum(1)).ravel().astype(np.float64)
    n_cells = pseudo.obs["n_cells"].to_numpy()
    used = (n_cells >= max(int(min_cells), 1)) & (xlib > 0) & (vlib > 0)
    if in_tissue_only:
        used &= _data.in_tissue(vis)
    rows = np.flatnonzero(used)
    if genes is not None:
        want = _data._match(xenium_table, vis.table, genes)["gene"].str.upper().tolist()
        pos = pd.Index(pseudo.var_names.str.upper())
        cols = pos.get_indexer(want)
        if (cols < 0).any():
            raise KeyError(f"genes {np.asarray(want)[cols < 0].tolist()} are not in the pseudo-spots.")
    else:
        cols = np.arange(pseudo.n_vars)
    Pu, Vu = P[rows][:, cols], V[rows][:, cols]
    return Paired(
        genes=[str(g) for g in pseudo.var_names[cols]],
        barcodes=vis.table.obs_names[rows],
        xy=vis.xy[rows],
        xenium=_data.lognorm(Pu, xlib[rows]),
        visium=_data.lognorm(Vu, vlib[rows]),
        xenium_counts=Pu.toarray(),
        visium_counts=Vu.toarray(),
        n_cells=n_cells[rows],
    )


def _column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b`` (NaN for constant columns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return np.asarray(pearsonr(a, b, axis=0).statistic, dtype=np.float64)


def compare_genes(
    sdata: SpatialData,
    genes=None,
    *,
    radius: float | None = None,
    units: str = "um",
    min_cells: int = 1,
    in_tissue_only: bool = True,
    library: str = "all",
    layer: str | None = None,
    visium_layer: str | None = None,
    pseudo: ad.AnnData | str | None = None,
    key_added: str = UNS_COMPARE_KEY,
    copy: bool = False,
) -> pd.DataFrame | None:
    """Per-gene agreement between Xenium pseudo-spots and Visium spots.

    For every gene measured by both modalities (:func:`shared_genes`: case-insensitive symbols,
    Visium uniqueness suffixes folded, Xenium controls excluded, duplicated symbols summed) the
    Xenium cells are aggregated into the Visium spot footprints (:func:`pseudo_spots`) and both
    modalities are library-size normalised (each spot scaled to the median library of the spots
    compared) and ``log1p``-transformed before correlating across spots.

    Spots compared: in tissue (``in_tissue_only``), holding at least ``min_cells`` aligned cells and
    a non-zero library in both modalities.

    The table is written to ``visium_table.uns["sda_compare_genes"]`` (``key_added``), the only change made
    to ``sdata`` (copy-on-write: a new ``visium_table`` object sharing the matrices, so objects derived from
    the same data are untouched); ``copy=True`` returns it instead.

    Parameters
    ----------
    sdata
        SpatialData with Visium spots/table and aligned Xenium cells.
    genes
        Symbols to compare (any case); ``None``: every shared gene.
    radius, units
        Pseudo-spot radius and its units (``"um"`` or ``"px"``); default: the spot radius (27.5 µm).
    min_cells
        Fewest aligned cells a spot needs to be compared.
    in_tissue_only
        Compare only in-tissue spots.
    library
        Library size per spot: ``"all"`` (all non-control genes of each modality, the usual
        ``normalize_total``) or ``"shared"`` (shared genes only).
    layer, visium_layer
        Layers holding counts in the Xenium / Visium tables (default ``X``).
    pseudo
        Pseudo-spots already built with :func:`pseudo_spots`: the AnnData or the name of its table
        (default: built here).
    key_added
        ``visium_table.uns`` key for the result.
    copy
        Return the table instead of writing it (scanpy's convention).

    Returns
    -------
    ``None`` (written to ``visium_table.uns[key_added]``) or, with ``copy=True``, a DataFrame, one row per
    gene, sorted by decreasing Pearson correlation (undefined last), with
    columns ``gene``, ``n_spots`` (spots compared), ``pearson``, ``spearman`` (of the log-normalised
    values across spots), ``xenium_detection`` / ``visium_detection`` (fraction of those spots with
    a count > 0) and ``xenium_mean`` / ``visium_mean`` (mean log-normalised expression).
    """
    if not copy:
        _key(key_added)
    pe = paired_expression(
        sdata,
        genes,
        radius=radius,
        units=units,
        min_cells=min_cells,
        in_tissue_only=in_tissue_only,
        library=library,
        layer=layer,
        visium_layer=visium_layer,
        pseudo=pseudo,
    )
    df = comparison_table(pe)
    if copy:
        return df
    vis = _data.visium(sdata)
    sdata.tables[vis.table_name] = with_uns(vis.table, _key(key_added), df)
    return None


def comparison_table(pe: Paired) -> pd.DataFrame:
    """Per-gene correlations of :class:`Paired` expression, sorted (the table :func:`compare_genes` returns)."""
    n = len(pe.barcodes)
    if n >= 3:
        pearson = _column_pearson(pe.xenium, pe.visium)
        # Spearman = Pearson of the ranks; rounded first so values equal up to floating-point noise
        # (c1/L1 == c2/L2) tie (scipy.stats.spearmanr would correlate every gene with every other)
        spearman = _column_pearson(rankdata(np.round(pe.xenium, 10), axis=0), rankdata(np.round(pe.visium, 10), axis=0))
    else:
        pearson = spearman = np.full(len(pe.genes), np.nan)
    df = pd.DataFrame(
        {
            "gene": pe.genes,
            "n_spots": np.full(len(pe.genes), n, dtype=np.int64),
            "pearson": pearson,
            "spearman": spearman,
            "xenium_detection": (pe.xenium_counts > 0).mean(0) if n else np.nan,
            "visium_detection": (pe.visium_counts > 0).mean(0) if n else np.nan,
            "xenium_mean": pe.xenium.mean(0) if n else np.nan,
            "visium_mean": pe.visium.mean(0) if n else np.nan,
        }
    )
    df = df.sort_values(["pearson", "gene"], ascending=[False, True], na_position="last", kind="stable")
    df = df.reset_index(drop=True)
    if n < 3:
        logger.warning("compare_genes: only %d spots hold aligned cells; correlations are undefined.", n)
    return df
