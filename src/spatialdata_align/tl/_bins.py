"""Xenium cells aggregated into Visium HD bins, and the per-gene comparison at bin level.

The spot-level tools (:func:`~spatialdata_align.tl.pseudo_spots`, :func:`~spatialdata_align.tl.compare_genes`)
compare Xenium with Visium spots; here the Visium side is the square bins of one size read by
:func:`spatialdata_align.io.read_visium_hd`, and the correlations come from the same code
(:func:`spatialdata_align.tl._compare.paired_from` and ``comparison_table``).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import TableModel, get_table_keys

from .._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_HD_BINS,
    VISIUM_HD_TABLE,
)
from .._elements import with_uns
from . import _data
from ._compare import _key, comparison_table, paired_from

logger = logging.getLogger(__name__)

#: ``uns`` key of a bin aggregate AnnData, and of the HD table holding the comparison
UNS_BINS_KEY = "sda_bins"
UNS_COMPARE_BINS_KEY = "sda_compare_bins"
#: table written by :func:`bin_cells` (annotates the bins), formatted with the bin size
BINNED_CELLS_KEY = "xenium_bins_{:03d}um"


def hd_bin_sizes(sdata: SpatialData) -> list[int]:
    """The Visium HD bin sizes (µm) present in ``sdata`` (as ``visium_hd_bins_<size>um`` with their tables)."""
    prefix, suffix = VISIUM_HD_BINS.split("{")[0], "um"
    sizes = []
    for name in sdata.shapes:
        if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix) : -len(suffix)].isdigit():
            size = int(name[len(prefix) : -len(suffix)])
            if VISIUM_HD_TABLE.format(size) in sdata.tables:
                sizes.append(size)
    return sorted(sizes)


def _bins(sdata: SpatialData, bin_size: int) -> tuple[_data.Modality, float]:
    """The bins of one size in ``visium`` and their side (full-resolution pixels)."""
    name, table = VISIUM_HD_BINS.format(int(bin_size)), VISIUM_HD_TABLE.format(int(bin_size))
    if name not in sdata.shapes or table not in sdata.tables:
        raise ValueError(
            f"no {bin_size} µm Visium HD bins ({name!r} with table {table!r}); bin sizes present: "
            f"{hd_bin_sizes(sdata) or 'none'}. Read them with sda.io.read_visium_hd(path, bins=({bin_size},))."
        )
    vis = _data.modality(sdata, name, table, VISIUM_CS)
    sf = vis.table.uns.get(UNS_VISIUM_KEY, {}).get("scalefactors", {})
    if "spot_diameter_fullres" not in sf:
        raise ValueError(f"{table}.uns[{UNS_VISIUM_KEY!r}] has no scale factors (spot_diameter_fullres).")
    return vis, float(sf["spot_diameter_fullres"])


def bin_cells(
    sdata: SpatialData,
    bin_size: int = 16,
    *,
    genes=None,
    layer: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Aggregate the aligned Xenium cells into the Visium HD bins of one size.

    A cell joins the bin whose square holds its centre (in the ``visium`` frame: the bin with the nearest centre,
    if the centre lies within half a side of it on both axes). Counts of the genes both modalities measure are
    summed, as in :func:`~spatialdata_align.tl.pseudo_spots`.

    Parameters
    ----------
    sdata
        SpatialData with Visium HD bins (:func:`spatialdata_align.io.read_visium_hd`) and aligned Xenium cells
        (``xenium_cells_aligned``, else ``xenium_cells`` through its affine).
    bin_size
        Bin size (µm) to aggregate into, e.g. 8 or 16.
    genes
        Symbols to aggregate (default: every shared gene).
    layer
        Xenium table layer holding counts (default ``X``).
    key_added
        Name of the table written, annotating the bins (default ``xenium_bins_<size>um``).
    copy
        Return the AnnData instead of writing it (scanpy's convention).

    Returns
    -------
    ``None`` (table ``key_added`` written, the only change made to ``sdata``) or, with ``copy=True``, AnnData,
    one row per bin in the order of ``visium_hd_table_<size>um`` (``obs_names`` = its barcodes), one
    variable per shared gene (``var["xenium_var"]``, ``var["visium_var"]``). ``X``: summed Xenium counts (sparse,
    float32). ``obs``: ``n_cells``, ``total_counts`` (all non-control genes of those cells), ``in_tissue``,
    ``region`` / ``instance_id``. ``obsm["spatial"]``: bin centres (full-resolution pixels).
    """
    vis, side = _bins(sdata, bin_size)
    xen = _data.xenium(sdata, VISIUM_CS)
    gm = _data._match(xen.table, vis.table, genes)
    n_bins, n_cells = vis.table.n_obs, xen.table.n_obs
    idx, inside = _cell_bins(xen, vis, side)
    cells = np.flatnonzero(inside)
    S = sp.csr_matrix((np.ones(len(cells), np.float32), (idx[inside], cells)), shape=(n_bins, n_cells))
    P = sp.csr_matrix(S @ _data.shared_counts(xen.table, gm["xenium_var"], layer))
    P.sort_indices()
    _, _, instance = get_table_keys(vis.table)
    obs = pd.DataFrame(
        {
            "n_cells": np.asarray(S.sum(1)).ravel().astype(np.int64),
            "total_counts": np.asarray(S @ _data.gene_totals(xen.table, layer), dtype=np.float64),
            "in_tissue": _data.in_tissue(vis).astype(np.int64),
            REGION_KEY: pd.Categorical([vis.element] * n_bins),
            INSTANCE_KEY: vis.table.obs[instance].to_numpy(),
        },
        index=vis.table.obs_names.copy(),
    )
    var = pd.DataFrame(
        {"xenium_var": [";".join(v) for v in gm["xenium_var"]], "visium_var": [";".join(v) for v in gm["visium_var"]]},
        index=pd.Index(gm["gene"].tolist(), name=None),
    )
    uns = {UNS_BINS_KEY: {"bin_size_um": int(bin_size), "cells_element": xen.element, "bins_element": vis.element}}
    out = ad.AnnData(X=P.astype(np.float32), obs=obs, var=var, obsm={SPATIAL_KEY: vis.xy.copy()}, uns=uns)
    logger.info("bin_cells: %d of %d cells into %d bins of %d µm", len(cells), n_cells, n_bins, bin_size)
    if copy:
        return out
    key = _key(BINNED_CELLS_KEY.format(int(bin_size)) if key_added is None else key_added)
    sdata.tables[key] = TableModel.parse(out, region=vis.element, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return None


def _cell_bins(xen, vis, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Per aligned cell (``xen`` rows): the index of the nearest bin of ``vis`` and whether the cell lies in it."""
    n_cells = len(xen.xy)
    if not (n_cells and len(vis.xy)):
        return np.zeros(n_cells, dtype=np.int64), np.zeros(n_cells, dtype=bool)
    _, idx = cKDTree(vis.xy).query(xen.xy, k=1)
    return idx, (np.abs(xen.xy - vis.xy[idx]) <= side / 2).all(axis=1)


def cells_in_tissue_bins(sdata: SpatialData, bin_size: int = 16) -> pd.Index:
    """The aligned Xenium cells (their table's ``obs_names``) that lie in an in-tissue Visium HD bin of ``bin_size``.

    What the tissue both sections cover means for Visium HD (cells beyond the capture area, or over bins outside the
    tissue, are not shared); :func:`bin_cells`' assignment of cells to bins.
    """
    vis, side = _bins(sdata, bin_size)
    xen = _data.xenium(sdata, VISIUM_CS)
    idx, inside = _cell_bins(xen, vis, side)
    if len(vis.xy):
        inside &= _data.in_tissue(vis)[idx]
    return xen.table.obs_names[inside]


def compare_bins(
    sdata: SpatialData,
    bin_size: int = 16,
    genes=None,
    *,
    min_cells: int = 1,
    in_tissue_only: bool = True,
    library: str = "all",
    layer: str | None = None,
    visium_layer: str | None = None,
    binned: ad.AnnData | str | None = None,
    key_added: str = UNS_COMPARE_BINS_KEY,
    copy: bool = False,
) -> pd.DataFrame | None:
    """Per-gene agreement between Xenium cells aggregated into Visium HD bins and the HD bins themselves.

    The bin-level counterpart of :func:`~spatialdata_align.tl.compare_genes`: the same gene matching,
    normalisation (each bin scaled to the median library, ``log1p``) and correlations (Pearson, Spearman across
    the bins holding at least ``min_cells`` aligned cells and counts in both modalities).

    Parameters
    ----------
    sdata
        SpatialData with Visium HD bins and aligned Xenium cells.
    bin_size
        Bin size (µm) compared, e.g. 16 (8 µm bins hold a fraction of a cell: noisy).
    genes
        Symbols to compare (default: every shared gene).
    min_cells, in_tissue_only, library, layer, visium_layer
        As in :func:`~spatialdata_align.tl.compare_genes`.
    binned
        The result of :func:`bin_cells` for this size, or the name of its table (default: computed here).
    key_added
        ``visium_hd_table_<size>um.uns`` key for the result (written copy-on-write: a new table object).
    copy
        Return the table instead of writing it (scanpy's convention).

    Returns
    -------
    ``None`` or, with ``copy=True``, a DataFrame, one row per gene sorted by decreasing Pearson correlation, with
    the columns of :func:`~spatialdata_align.tl.compare_genes` (``n_spots`` counts the bins compared) and
    ``bin_size_um``.
    """
    if library not in ("all", "shared"):
        raise ValueError(f"library must be 'all' (every gene of each modality) or 'shared', got {library!r}.")
    if not copy:
        _key(key_added)
    vis, _ = _bins(sdata, bin_size)
    if isinstance(binned, str):
        if binned not in sdata.tables:
            raise KeyError(f"no table {binned!r} of binned cells; tables present: {sorted(sdata.tables)}.")
        binned = sdata.tables[binned]
    if binned is None:
        binned = bin_cells(sdata, bin_size, layer=layer, copy=True)
    xenium_table = _data._xenium_table(sdata) if genes is not None else None
    pe = paired_from(vis, binned, genes, xenium_table, min_cells, in_tissue_only, library, visium_layer)
    df = comparison_table(pe)
    df.insert(2, "bin_size_um", int(bin_size))
    if copy:
        return df
    sdata.tables[vis.table_name] = with_uns(vis.table, key_added, df)
    return None
