"""One gene at Visium HD bin level: Xenium cells binned next to the HD bins, on the bin grid."""

from __future__ import annotations

import numpy as np
from spatialdata import SpatialData

from ..tl import _data
from ..tl._bins import _bins, bin_cells
from ._plots import _new_axes, _save


def bins_gene(
    sdata: SpatialData,
    gene: str,
    bin_size: int = 16,
    *,
    binned=None,
    cmap: str = "viridis",
    layer: str | None = None,
    visium_layer: str | None = None,
    axes=None,
    save=None,
) -> np.ndarray:
    """One gene side by side at bin level: Xenium cells aggregated into the HD bins, and the HD bins.

    Each panel is the bin grid (``array_col`` across, ``array_row`` down) coloured by
    ``log1p(counts / library * median library)``; Xenium bins without aligned cells are blank.

    Parameters
    ----------
    sdata
        Aligned SpatialData with Visium HD bins (:func:`spatialdata_align.io.read_visium_hd`).
    gene
        Gene symbol measured by both modalities (any case).
    bin_size
        Bin size (µm).
    binned
        :func:`spatialdata_align.tl.bin_cells` result for this size, or its table name (default: computed).
    cmap
        Colour map.
    layer, visium_layer
        Count layers of the Xenium / HD tables (default ``X``).
    axes
        Two axes to draw on.
    save
        File to write.

    Returns
    -------
    The two axes (Xenium binned, Visium HD).
    """
    vis, _ = _bins(sdata, bin_size)
    if isinstance(binned, str):
        binned = sdata.tables[binned]
    binned = bin_cells(sdata, bin_size, genes=[gene], layer=layer, copy=True) if binned is None else binned
    gm = _data._match(_data._xenium_table(sdata), vis.table, [gene])
    name = str(gm["gene"].iloc[0])
    col = list(binned.var_names.str.upper()).index(name.upper())
    xv = _data.lognorm(binned.X[:, [col]], binned.obs["total_counts"].to_numpy()).ravel()
    xv[binned.obs["n_cells"].to_numpy() == 0] = np.nan
    g = _data.shared_counts(vis.table, gm["visium_var"], visium_layer)
    vv = _data.lognorm(g, _data.gene_totals(vis.table, visium_layer)).ravel()
    r = vis.table.obs["array_row"].to_numpy()
    c = vis.table.obs["array_col"].to_numpy()
    r0, c0 = r.min(), c.min()
    fig, axes = _new_axes(axes, 2, figsize=(12, 5.5), share=True)
    for ax, values, title in (
        (axes[0], xv, f"Xenium cells in {bin_size} µm bins: {name}"),
        (axes[1], vv, f"Visium HD {bin_size} µm bins: {name}"),
    ):
        grid = np.full((r.max() - r0 + 1, c.max() - c0 + 1), np.nan)
        grid[r - r0, c - c0] = values
        vmax = np.nanpercentile(values, 99) if np.isfinite(values).any() else 1.0  # each modality its own scale
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=max(vmax, 1e-9), interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="log1p normalised counts")
        ax.set_title(title)
        ax.set_xlabel("array_col")
        ax.set_ylabel("array_row")
    _save(fig, save)
    return axes
