"""Plots of aligned data (matplotlib). Every function returns its axes and can ``save=`` a file.

Everything spatial is drawn in the ``visium`` coordinate system (full-resolution pixels, y down,
as in the H&E), the hires image placed through its scale factor.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from spatialdata import SpatialData

from .. import _store
from .._constants import SHARED_REGION_KEY, VISIUM_CS, VISIUM_SPOTS, VISIUM_TARGET_ORDER, XENIUM_CELLS, XENIUM_CS
from .._elements import element_xy, image_in_cs
from ..tl import _data
from ..tl._compare import paired_expression

PX = "full-resolution px"
MAX_IMAGE_PIXELS = 4_000_000


def _save(fig, save) -> None:
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=150, bbox_inches="tight")


def _new_axes(ax, ncols: int = 1, figsize=None, share: bool = False):
    if ax is not None:
        axes = np.atleast_1d(ax)
        if len(axes) != ncols:
            raise ValueError(f"this plot draws {ncols} panel(s); got {len(axes)} axes.")
        return axes[0].figure, axes
    fig, axes = plt.subplots(
        1, ncols, figsize=figsize or (6.0 * ncols, 5.5), sharex=share, sharey=share, squeeze=False, layout="constrained"
    )
    return fig, axes[0]


def _rgb(values: np.ndarray) -> np.ndarray:
    """``(c, y, x)`` image values as a displayable ``(y, x, 3|1)`` array in ``[0, 1]``."""
    v = np.moveaxis(np.asarray(values), 0, -1)
    if v.shape[-1] > 3:
        v = v[..., :3]
    if np.issubdtype(v.dtype, np.integer):
        hi = 255.0 if v.max(initial=0) <= 255 else float(np.iinfo(v.dtype).max)
        v = v.astype(np.float64) / hi
    else:
        v = v.astype(np.float64)
        lo, hi = np.nanpercentile(v, 0.5), np.nanpercentile(v, 99.5)
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    v = np.clip(np.nan_to_num(v), 0, 1)
    return v[..., 0] if v.shape[-1] == 1 else v


def draw_image(ax: Axes, sdata: SpatialData, image: str | None, cs: str = VISIUM_CS, alpha: float = 1.0, **kw):
    """Draw an image element in coordinate system ``cs`` (pixel extents exact); no-op for ``None``."""
    if image is None:
        return None
    da = image_in_cs(sdata, image, cs, max_pixels=MAX_IMAGE_PIXELS)
    x, y = da.coords["x"].values, da.coords["y"].values
    dx = float(x[1] - x[0]) if len(x) > 1 else 1.0
    dy = float(y[1] - y[0]) if len(y) > 1 else 1.0
    extent = (x[0] - dx / 2, x[-1] + dx / 2, y[-1] + dy / 2, y[0] - dy / 2)
    rgb = _rgb(da.values)
    kw.setdefault("cmap", "gray")
    return ax.imshow(rgb, extent=extent, alpha=alpha, interpolation="nearest", **kw)


def _default_image(sdata: SpatialData, image):
    if image is False:
        return None
    if image is None:
        return next((name for name in VISIUM_TARGET_ORDER if name in sdata.images), None)
    if image not in sdata.images:
        raise KeyError(f"no image {image!r}; images present: {sorted(sdata.images)}.")
    return image


def circles(ax: Axes, xy: np.ndarray, radius, values=None, **kw) -> EllipseCollection:
    """Circles of radius ``radius`` (data units) at ``xy``, optionally colour-mapped by ``values``."""
    d = 2.0 * np.broadcast_to(np.asarray(radius, dtype=float), (len(xy),))
    coll = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData, **kw)
    if values is not None:
        coll.set_array(np.asarray(values, dtype=float))
    ax.add_collection(coll)
    return coll


def _frame(ax: Axes, xy_list, title: str) -> None:
    pts = np.concatenate([np.asarray(p, float).reshape(-1, 2) for p in xy_list if len(p)])
    if len(pts):
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.03 * float(max(hi - lo)) + 1.0
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(hi[1] + pad, lo[1] - pad)  # y down, as in the image
    ax.set_aspect("equal")
    ax.set_xlabel(f"x ({PX})")
    ax.set_ylabel(f"y ({PX})")
    ax.set_title(title)


def _subsample(n: int, max_n: int | None, seed: int = 0) -> np.ndarray:
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


# ---------------------------------------------------------------------------------------------- overlay
def overlay(
    sdata: SpatialData,
    *,
    image: str | bool | None = None,
    cells: str | None = None,
    spots: bool | None = None,
    in_tissue_only: bool = True,
    region: bool = True,
    max_cells: int | None = 200_000,
    cell_size: float = 0.5,
    ax: Axes | None = None,
    save=None,
) -> Axes:
    """Aligned Xenium cells and Visium spots over the H&E, in full-resolution pixels.

    Parameters
    ----------
    sdata
        Aligned SpatialData.
    image
        Background image (default the hires H&E when present; ``False`` for none).
    cells
        Cells element (default ``xenium_cells_aligned``, else ``xenium_cells`` via its affine).
    spots
        Draw the Visium spots (outlines, true size). ``None`` (default): when the object has them (a Visium HD object
        has bins instead, and is drawn without).
    in_tissue_only
        Draw only in-tissue spots.
    region
        Outline the stored shared region (``shared_region``) when present.
    max_cells
        Draw at most this many cells (a fixed random subset); ``None`` draws all.
    cell_size
        Marker size of the cells (points²).
    ax
        Axes to draw on.
    save
        File to write (format from its suffix).
    """
    fig, (ax,) = _new_axes(ax, 1, figsize=(7.5, 6.5))
    draw_image(ax, sdata, _default_image(sdata, image))
    xen = _data.xenium(sdata, VISIUM_CS, cells)
    keep = _subsample(len(xen.xy), max_cells)
    ax.scatter(xen.xy[keep, 0], xen.xy[keep, 1], s=cell_size, c="tab:blue", lw=0, rasterized=True)
    ax.scatter([], [], s=12, c="tab:blue", lw=0, label=f"Xenium cells ({xen.element}, n={len(xen.xy):,})")
    frame = [xen.xy]
    if spots is None:
        spots = VISIUM_SPOTS in sdata.shapes
    if spots:
        vis = _data.visium(sdata)
        sel = _data.in_tissue(vis) if in_tissue_only else np.ones(len(vis.xy), dtype=bool)
        r = vis.radius if vis.radius is not None else 27.5 / _data.um_per_px(sdata, vis)
        r = np.broadcast_to(r, (len(vis.xy),))[sel]
        circles(ax, vis.xy[sel], r, facecolors="none", edgecolors="tab:orange", linewidths=0.6)
        ax.scatter(
            [],
            [],
            s=30,
            facecolors="none",
            edgecolors="tab:orange",
            label=f"Visium spots ({'in tissue, ' if in_tissue_only else ''}n={int(sel.sum()):,})",
        )
        frame.append(vis.xy[sel])
    if region and SHARED_REGION_KEY in sdata.shapes:
        for geom in sdata.shapes[SHARED_REGION_KEY].geometry:
            for poly in getattr(geom, "geoms", [geom]):
                xs, ys = poly.exterior.xy
                ax.plot(xs, ys, color="tab:green", lw=1.2)
        ax.plot([], [], color="tab:green", lw=1.2, label="shared region")
    _frame(ax, frame, "Aligned Xenium cells and Visium spots over the H&E")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, save)
    return ax


# -------------------------------------------------------------------------------------------- landmarks
def landmarks(
    sdata: SpatialData,
    key: str = "landmarks",
    *,
    source: str | None = XENIUM_CELLS,
    image: str | bool | None = None,
    transform: str | bool | None = None,
    axes=None,
    save=None,
) -> np.ndarray:
    """The landmark pairs: source points (µm) next to target points over the H&E (full-res px).

    Parameters
    ----------
    sdata
        SpatialData holding a landmark set (``sdata.align.set_landmarks``).
    key
        Landmark set name.
    source
        Points/shapes drawn behind the source landmarks (default ``xenium_cells``; ``None`` none).
    image
        Target background (default the hires H&E; ``False`` none).
    transform
        Stored transform whose mapping of the source landmarks is drawn on the target panel, with
        the residual to each target landmark (default: the most recent one, if any; ``False``
        none).
    axes
        Two axes to draw on.
    save
        File to write.

    Returns
    -------
    The two axes (source, target).
    """
    src, dst = sdata.align.landmarks(key)
    fig, axes = _new_axes(axes, 2, figsize=(12, 5.5))
    a0, a1 = axes
    frame0 = [src]
    if source is not None:
        bg = element_xy(sdata, source, XENIUM_CS)
        keep = _subsample(len(bg), 100_000)
        a0.scatter(bg[keep, 0], bg[keep, 1], s=0.3, c="0.6", lw=0, rasterized=True)
        frame0.append(bg)
    a0.scatter(src[:, 0], src[:, 1], s=40, c="tab:red", marker="o", edgecolors="k", zorder=3)
    for i, (x, y) in enumerate(src):
        a0.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", color="tab:red", fontsize=9)
    pts = np.concatenate(frame0)
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.03 * float(max(hi - lo)) + 1.0
    a0.set_xlim(lo[0] - pad, hi[0] + pad)
    a0.set_ylim(hi[1] + pad, lo[1] - pad)
    a0.set_aspect("equal")
    a0.set_xlabel("x (µm)")
    a0.set_ylabel("y (µm)")
    a0.set_title(f"Source landmarks ({len(src)}, {XENIUM_CS}, µm)")
    im = draw_image(a1, sdata, _default_image(sdata, image))
    a1.scatter(dst[:, 0], dst[:, 1], s=40, c="tab:red", marker="o", edgecolors="k", zorder=3, label="target")
    for i, (x, y) in enumerate(dst):
        a1.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", color="tab:red", fontsize=9)
    title = f"Target landmarks ({VISIUM_CS}, {PX})"
    frame1 = [dst]
    if im is not None:  # show the whole image
        left, right, bottom, top = im.get_extent()
        frame1.append(np.array([[left, top], [right, bottom]]))
    tkey = None
    if transform is not False:
        tkey = transform if transform is not None else _store.default_key(sdata)
    if tkey is not None:
        mapped = sdata.align.transform_points(src, key=tkey)
        a1.scatter(mapped[:, 0], mapped[:, 1], s=50, c="tab:cyan", marker="x", zorder=4, label=f"source via {tkey}")
        for (x0, y0), (x1, y1) in zip(mapped, dst, strict=True):
            a1.plot([x0, x1], [y0, y1], color="tab:cyan", lw=0.8)
        res = np.linalg.norm(mapped - dst, axis=1)
        upp = _data.um_per_px(sdata)
        title += f"\nresidual via {tkey}: median {np.median(res) * upp:.1f} µm, max {res.max() * upp:.1f} µm"
        frame1.append(mapped)
        a1.legend(loc="upper right", fontsize=8)
    _frame(a1, frame1, title)
    _save(fig, save)
    return axes


# ----------------------------------------------------------------------------------------------- energy
def energy(sdata_or_reg, key: str | None = None, *, log: bool = True, ax: Axes | None = None, save=None) -> Axes:
    """The LDDMM energy trace: total, matching, regularisation and landmark terms per iteration.

    Parameters
    ----------
    sdata_or_reg
        A SpatialData with a stored LDDMM transform, or a
        :class:`~spatialdata_align.registration.Registration`.
    key
        Stored transform (default: the most recent).
    log
        Logarithmic energy axes (where the terms are positive).
    ax
        Axes to draw on.
    save
        File to write.
    """
    if isinstance(sdata_or_reg, SpatialData):
        reg = sdata_or_reg.align.get(key)
        name = key or _store.default_key(sdata_or_reg)
    else:
        reg, name = sdata_or_reg, key or "registration"
    e = reg.energy
    if e is None or len(e) == 0:
        raise ValueError(
            f"transform {name!r} has no energy trace (an affine has none; fit one with sdata.align.lddmm)."
        )
    fig, (ax,) = _new_axes(ax, 1, figsize=(7, 4.5))
    it = np.arange(len(e))
    terms = {c: np.asarray(e[c], dtype=float) for c in ("total", "match", "reg", "landmark") if c in e}
    terms = {c: v for c, v in terms.items() if np.any(v != 0)}
    # the matching term dominates: regularisation and landmark terms get their own (right) axis
    right = [c for c in ("reg", "landmark") if c in terms]
    ax_r = ax.twinx() if right else None
    styles = {"total": "k-", "match": "C0-", "reg": "C1-", "landmark": "C2-"}
    handles = []
    for col, v in terms.items():
        target = ax_r if col in right else ax
        handles += target.plot(it, v, styles[col], lw=1.2, label=col + (" (right axis)" if col in right else ""))
    if "level" in e:
        lev = np.asarray(e["level"])
        for i in np.flatnonzero(lev[1:] != lev[:-1]) + 1:
            ax.axvline(i - 0.5, color="0.5", ls="--", lw=0.8)
    for a, cols in ((ax, [c for c in terms if c not in right]), (ax_r, right)):
        if a is not None and log and cols and all(np.all(terms[c] > 0) for c in cols):
            a.set_yscale("log")
    ax.set_xlabel("iteration (all levels)")
    ax.set_ylabel("energy: total, matching")
    if ax_r is not None:
        ax_r.set_ylabel("energy: " + ", ".join(right))
    ax.set_title(f"LDDMM energy ({name}); dashed: new level")
    ax.legend(handles=handles, fontsize=8)
    _save(fig, save)
    return ax


# ------------------------------------------------------------------------------------------------ genes
def _gene_values(sdata: SpatialData, gene: str, layer=None, visium_layer=None):
    """Per-cell and per-spot log1p library-normalised expression of one shared gene."""
    xen = _data.xenium(sdata)
    vis = _data.visium(sdata)
    gm = _data._match(xen.table, vis.table, [gene])
    out = []
    for mod, col, lay in ((xen, "xenium_var", layer), (vis, "visium_var", visium_layer)):
        g = _data.shared_counts(mod.table, gm[col], lay)
        lib = _data.gene_totals(mod.table, lay)
        out.append(_data.lognorm(g, lib).ravel())
    return str(gm["gene"].iloc[0]), xen, vis, out[0], out[1]


def gene(
    sdata: SpatialData,
    gene: str,
    *,
    image: str | bool | None = None,
    in_tissue_only: bool = True,
    cmap: str = "viridis",
    max_cells: int | None = 200_000,
    cell_size: float = 1.0,
    layer: str | None = None,
    visium_layer: str | None = None,
    axes=None,
    save=None,
) -> np.ndarray:
    """One gene in both modalities side by side on the same aligned frame (full-resolution px).

    Left: aligned Xenium cells; right: Visium spots (true size). Values are
    ``log1p(counts / library * median library)`` per cell / spot, library = all non-control genes.

    Parameters
    ----------
    sdata
        Aligned SpatialData.
    gene
        Gene symbol measured by both modalities (any case).
    image
        Faint background (default the hires H&E; ``False`` none).
    in_tissue_only
        Draw only in-tissue spots.
    cmap
        Colour map.
    max_cells
        Draw at most this many cells (fixed random subset).
    cell_size
        Marker size of the cells (points²).
    layer, visium_layer
        Count layers of the Xenium / Visium tables (default ``X``).
    axes
        Two axes to draw on (they should share x and y).
    save
        File to write.

    Returns
    -------
    The two axes (Xenium, Visium).
    """
    name, xen, vis, xv, vv = _gene_values(sdata, gene, layer, visium_layer)
    fig, axes = _new_axes(axes, 2, figsize=(12, 5.5), share=True)
    img = _default_image(sdata, image)
    keep = _subsample(len(xen.xy), max_cells)
    order = keep[np.argsort(xv[keep], kind="stable")]  # high values on top
    draw_image(axes[0], sdata, img, alpha=0.35)
    sc = axes[0].scatter(xen.xy[order, 0], xen.xy[order, 1], c=xv[order], s=cell_size, cmap=cmap, lw=0, rasterized=True)
    fig.colorbar(sc, ax=axes[0], shrink=0.8, label="log1p normalised counts")
    sel = _data.in_tissue(vis) if in_tissue_only else np.ones(len(vis.xy), dtype=bool)
    r = vis.radius if vis.radius is not None else 27.5 / _data.um_per_px(sdata, vis)
    r = np.broadcast_to(r, (len(vis.xy),))[sel]
    draw_image(axes[1], sdata, img, alpha=0.35)
    coll = circles(axes[1], vis.xy[sel], r, values=vv[sel], cmap=cmap, linewidths=0)
    fig.colorbar(coll, ax=axes[1], shrink=0.8, label="log1p normalised counts")
    frame = [xen.xy, vis.xy[sel]]
    _frame(axes[0], frame, f"Xenium cells: {name} (n={len(xen.xy):,})")
    _frame(axes[1], frame, f"Visium spots: {name} (n={int(sel.sum()):,})")
    _save(fig, save)
    return axes


def compare(
    sdata: SpatialData,
    gene: str,
    *,
    radius: float | None = None,
    units: str = "um",
    min_cells: int = 1,
    in_tissue_only: bool = True,
    library: str = "all",
    ax: Axes | None = None,
    save=None,
) -> Axes:
    """Xenium pseudo-spot vs Visium spot expression of one gene (the data behind ``compare_genes``).

    Each point is one Visium spot compared by :func:`~spatialdata_align.tl.compare_genes` (same
    parameters); both axes are ``log1p`` library-normalised counts. The title gives Pearson and
    Spearman correlations and the number of spots.
    """
    from scipy.stats import pearsonr, spearmanr

    pe = paired_expression(
        sdata,
        [gene],
        radius=radius,
        units=units,
        min_cells=min_cells,
        in_tissue_only=in_tissue_only,
        library=library,
    )
    x, y = pe.xenium[:, 0], pe.visium[:, 0]
    fig, (ax,) = _new_axes(ax, 1, figsize=(5.5, 5))
    ax.scatter(x, y, s=8, alpha=0.6, c="tab:blue", lw=0)
    n = len(x)
    if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        r, rho = pearsonr(x, y)[0], spearmanr(x, y)[0]
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, slope * xs + icpt, "k--", lw=1)
        stats = f"Pearson r = {r:.2f}, Spearman ρ = {rho:.2f}, n = {n} spots"
    else:
        stats = f"n = {n} spots (correlation undefined)"
    ax.set_xlabel("Xenium pseudo-spot, log1p normalised counts")
    ax.set_ylabel("Visium spot, log1p normalised counts")
    ax.set_title(f"{pe.genes[0]}\n{stats}")
    _save(fig, save)
    return ax


def total_counts(
    sdata: SpatialData,
    *,
    in_tissue_only: bool = True,
    cmap: str = "magma",
    max_cells: int | None = 200_000,
    cell_size: float = 1.0,
    axes=None,
    save=None,
) -> np.ndarray:
    """Total counts per cell (Xenium) and per spot (Visium), side by side on the aligned frame.

    Colour: ``log10(1 + total counts)`` over the non-control genes of each modality.

    Returns
    -------
    The two axes (Xenium, Visium).
    """
    xen = _data.xenium(sdata)
    vis = _data.visium(sdata)
    xt = np.log10(1 + _data.gene_totals(xen.table))
    vt = np.log10(1 + _data.gene_totals(vis.table))
    fig, axes = _new_axes(axes, 2, figsize=(12, 5.5), share=True)
    keep = _subsample(len(xen.xy), max_cells)
    sc = axes[0].scatter(xen.xy[keep, 0], xen.xy[keep, 1], c=xt[keep], s=cell_size, cmap=cmap, lw=0, rasterized=True)
    fig.colorbar(sc, ax=axes[0], shrink=0.8, label="log10(1 + total counts)")
    sel = _data.in_tissue(vis) if in_tissue_only else np.ones(len(vis.xy), dtype=bool)
    r = vis.radius if vis.radius is not None else 27.5 / _data.um_per_px(sdata, vis)
    coll = circles(axes[1], vis.xy[sel], np.broadcast_to(r, (len(vis.xy),))[sel], values=vt[sel], cmap=cmap)
    fig.colorbar(coll, ax=axes[1], shrink=0.8, label="log10(1 + total UMIs)")
    frame = [xen.xy, vis.xy[sel]]
    _frame(axes[0], frame, f"Xenium: total counts per cell (median {np.median(10**xt - 1):.0f})")
    _frame(axes[1], frame, f"Visium: total UMIs per spot (median {np.median(10 ** vt[sel] - 1):.0f})")
    _save(fig, save)
    return axes


__all__ = ["compare", "energy", "gene", "landmarks", "overlay", "total_counts"]
