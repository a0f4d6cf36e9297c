"""Source channels beyond the cell density: cell-type densities and shared-gene expression fields.

Pure numpy/scipy (no SpatialData): the accessor hands over arrays.

* :func:`celltype_channels`: one density per cell type (e.g. expression clusters), so the contrast model can
  learn that different cell types look different in the H&E.
* :func:`expression_features`: the expression of the genes both platforms measure, as a smoothed field over the
  source (e.g. Xenium cells) and as values at the target's spots (e.g. Visium), in common coordinates: per-location
  composition over the shared genes (so each platform's sensitivity and the spot's cell count cancel), log-scaled,
  projected on the leading principal components of the source field. The engine compares them spot by spot
  (:class:`~spatialdata_align.registration._data.SpotTerm`) with a per-component affine calibration.

And one target channel set: :func:`stain_densities`, an RGB H&E as haematoxylin and eosin optical densities.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import xarray as xr

from ._rasterize import rasterize


def _log_composition(counts, scale: float) -> np.ndarray:
    """``log1p(scale * counts / total)`` per row (rows with no counts stay 0)."""
    c = counts.toarray() if sp.issparse(counts) else np.asarray(counts, dtype=float)
    tot = c.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(tot > 0, c / np.maximum(tot, 1e-12), 0.0)
    return np.log1p(scale * frac)


def expression_features(
    cell_xy,
    cell_counts,
    spot_counts,
    grid: xr.DataArray,
    *,
    n_components: int = 6,
    blur: float = 25.0,
    min_cells: float = 2.0,
) -> tuple[xr.DataArray, np.ndarray, dict]:
    """Shared-gene expression as a source feature image and matching values at target spots.

    Parameters
    ----------
    cell_xy
        ``(N, 2)`` source cell positions ``(x, y)`` (source units, e.g. µm).
    cell_counts
        ``(N, G)`` counts of the ``G`` shared genes per cell (dense or sparse).
    spot_counts
        ``(S, G)`` counts of the same genes, same order, per target spot.
    grid
        Image whose ``x``/``y`` pixel-centre coordinates define the source feature grid (e.g. the density raster).
    n_components
        Principal components kept.
    blur
        Standard deviation (source units) of the Gaussian that turns cells into a field; about a Visium spot's
        footprint (a 55 µm disc has a standard deviation of 19 µm per axis) plus some capture diffusion.
    min_cells
        Locations of the field with fewer cells under the blur than this are left at 0 (no tissue).

    Returns
    -------
    ``(features, spot_values, info)``: the ``(k, y, x)`` source feature image (0 outside tissue), the ``(S, k)``
    spot values, and ``info`` (explained variance ratios, loadings, genes kept).
    """
    xy = np.asarray(cell_xy, dtype=float)
    counts = sp.csr_matrix(cell_counts, dtype=np.float64)
    spots = sp.csr_matrix(spot_counts, dtype=np.float64)
    if counts.shape[0] != xy.shape[0] or counts.shape[1] != spots.shape[1]:
        raise ValueError(
            f"cell_counts {counts.shape} must have one row per cell ({xy.shape[0]}) and the columns of spot_counts "
            f"{spots.shape}."
        )
    x, y = np.asarray(grid.x.values, float), np.asarray(grid.y.values, float)
    dx = float(x[1] - x[0])
    extent = (x[0] - dx / 2, x[-1] + dx / 2, y[0] - dx / 2, y[-1] + dx / 2)
    g = counts.shape[1]
    # genes detected on both sides
    keep = np.flatnonzero((np.asarray(counts.sum(0)).ravel() > 0) & (np.asarray(spots.sum(0)).ravel() > 0))
    if keep.size < 2:
        raise ValueError("fewer than 2 shared genes are detected on both platforms; no expression features.")
    counts, spots = counts[:, keep], spots[:, keep]
    field = rasterize(xy, weights=counts, dx=dx, blur=blur, extent=extent).values  # (G, ny, nx)
    ncell = rasterize(xy, dx=dx, blur=blur, extent=extent).values[0]
    tissue = ncell * (2 * np.pi * (blur / dx) ** 2) >= min_cells  # cells under the blur footprint
    scale = float(keep.size)
    flat = np.moveaxis(field, 0, -1)[tissue]  # (P, G)
    src = _log_composition(flat, scale)
    spot = _log_composition(spots, scale)
    mean = src.mean(axis=0)
    _, sv, vt = np.linalg.svd(src - mean, full_matrices=False)
    k = int(min(n_components, vt.shape[0]))
    load = vt[:k].T  # (G, k)
    feat = np.zeros((k, *tissue.shape))
    feat[:, tissue] = ((src - mean) @ load).T
    spot_vals = (spot - mean) @ load
    ratio = (sv**2 / np.sum(sv**2))[:k]
    out = xr.DataArray(feat, dims=("c", "y", "x"), coords={"c": np.arange(k), "y": y, "x": x}, name="expression")
    return out, spot_vals, {"explained_variance_ratio": ratio, "loadings": load, "genes": keep, "n_genes": g}


def celltype_channels(cell_xy, labels, grid: xr.DataArray, *, blur: float | None = None) -> xr.DataArray:
    """The total cell density followed by one density channel per cell type (or cluster).

    Every label's cells are rasterised on ``grid``'s pixels (mass-conserving, blurred like the density), so the
    engine's contrast model can learn that different cell types look different in the H&E. Channel 0 is the
    total density (the engine's tissue occupancy uses it).

    Parameters
    ----------
    cell_xy
        ``(N, 2)`` cell positions ``(x, y)`` (source units).
    labels
        ``(N,)`` cell-type labels (any hashable values; e.g. k-means clusters of the expression).
    grid
        Image whose ``x``/``y`` pixel-centre coordinates define the raster (e.g. the density raster).
    blur
        As :func:`~spatialdata_align.registration.rasterize`.

    Returns
    -------
    The ``(1 + n_types, y, x)`` image, channels ``["density", "type_<label>", ...]``.
    """
    xy = np.asarray(cell_xy, dtype=float)
    lab = np.asarray(labels)
    if lab.shape != (xy.shape[0],):
        raise ValueError(f"labels must have one entry per cell ({xy.shape[0]}), got shape {lab.shape}.")
    types, codes = np.unique(lab, return_inverse=True)
    x, y = np.asarray(grid.x.values, float), np.asarray(grid.y.values, float)
    dx = float(x[1] - x[0])
    extent = (x[0] - dx / 2, x[-1] + dx / 2, y[0] - dx / 2, y[-1] + dx / 2)
    onehot = sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), len(types)))
    dens = rasterize(xy, dx=dx, blur=blur, extent=extent).values
    per_type = rasterize(xy, weights=onehot, dx=dx, blur=blur, extent=extent).values
    return xr.DataArray(
        np.concatenate([dens, per_type]),
        dims=("c", "y", "x"),
        coords={"c": ["density", *[f"type_{t}" for t in types]], "y": y, "x": x},
        name="density",
    )


#: the lowest intensity an 8-bit channel resolves, as a fraction of white: the floor of the optical density
_OD_FLOOR = 1.0 / 255.0


def stain_densities(image) -> xr.DataArray:
    """An RGB H&E image as haematoxylin and eosin optical densities (colour deconvolution).

    Light through a stained section follows Beer-Lambert's law: each channel's optical density
    ``OD = -ln(I / I_white)`` is a sum of the stains' densities, each stain with its own absorption colour. Solving
    for the densities with the stain vectors of Ruifrok & Johnston (haematoxylin, eosin, DAB; scikit-image's
    :data:`skimage.color.rgb_from_hed`) gives two channels in which nuclei and cytoplasm/stroma are separate and
    linear in the amount of stain, which the contrast model of :func:`~spatialdata_align.registration.lddmm`
    relates to cell densities better than the raw colours (``docs/accuracy.md``: on 45 synthetic pairs of six
    tissue families and the twin sections the mean of the per-pair median errors fell from 24.9 to 22.9 µm on the
    21-pair corpus and from 30.1 to 27.1 µm on 24 pairs generated afresh).

    Unlike :func:`skimage.color.rgb2hed` the optical density is floored at one 8-bit level (``1/255`` of white, not
    ``1e-6``) and negative densities are kept (not clipped to 0): measured on the same pairs, ``rgb2hed`` gave
    24.2 and 28.4 µm, where near-black pixels (up to 13.8 in optical density against 5.5 here) and the lost
    negative part cost accuracy.

    Parameters
    ----------
    image
        ``(3, y, x)`` RGB image (channel first, as spatialdata stores images): a :class:`xarray.DataArray` or an
        array, integers (``uint8``: 255 is white; other integer types: their maximum) or floats in ``[0, 1]``.

    Returns
    -------
    ``(2, y, x)`` float32 :class:`xarray.DataArray`, channels ``haematoxylin`` and ``eosin`` (the coordinates
    of ``image`` kept).
    """
    from skimage.color import rgb_from_hed

    da = image if isinstance(image, xr.DataArray) else xr.DataArray(np.asarray(image), dims=("c", "y", "x"))
    if da.ndim != 3 or da.shape[0] != 3:
        raise ValueError(f"stain_densities needs a (3, y, x) RGB image, got shape {tuple(da.shape)}.")
    v = np.asarray(da.values)
    if np.issubdtype(v.dtype, np.integer):
        rgb = v.astype(np.float32) / float(np.iinfo(v.dtype).max)
    else:
        rgb = v.astype(np.float32)
        if np.nanmax(rgb) > 1.0 + 1e-6:
            raise ValueError("a float RGB image must lie in [0, 1] (white = 1); scale it or pass the integer image.")
    od = -np.log(np.clip(rgb, _OD_FLOOR, 1.0))
    # OD (per pixel, a row vector over R, G, B) = densities @ rgb_from_hed: solve for the densities
    dens = np.einsum("kc,cyx->kyx", np.linalg.inv(rgb_from_hed).T.astype(np.float32), od)[:2]
    coords = {k: da.coords[k].values for k in ("y", "x") if k in da.coords}
    return xr.DataArray(
        dens.astype(np.float32),
        dims=("c", "y", "x"),
        coords={"c": ["haematoxylin", "eosin"], **coords},
        attrs=dict(da.attrs),
        name="stains",
    )
