"""Placing landmark pairs by clicking on a matplotlib figure (Jupyter, no desktop GUI needed)."""

from __future__ import annotations

import numpy as np
from matplotlib.backend_bases import MouseButton
from spatialdata import SpatialData

from .._constants import VISIUM_CS, XENIUM_CELLS, XENIUM_CS
from .._elements import element_kind, element_xy
from ._plots import _subsample, draw_image

_HELP = "left-click: place a point   right-click: remove the panel's last point   (pairs match by number)"


class LandmarkAnnotator:
    """Interactive landmark placement on a two-panel figure (source left, target right).

    Created by :func:`annotate_landmarks`. Left-click in a panel places the next point of that
    panel; right-click removes that panel's last point. Point ``i`` of the source panel pairs with
    point ``i`` of the target panel. Clicks made while the toolbar's zoom or pan tool is active are
    ignored, so you can zoom in between clicks.

    Attributes
    ----------
    fig
        The figure.
    ax_source, ax_target
        Its two panels, in the source (e.g. Xenium µm) and target (e.g. Visium full-res px)
        coordinate systems.
    """

    def __init__(
        self,
        sdata: SpatialData,
        source: str,
        target: str,
        *,
        key: str,
        source_cs: str,
        target_cs: str,
        store: bool,
        max_points: int,
        figsize,
    ):
        import matplotlib.pyplot as plt

        self.sdata = sdata
        self.key = key
        self.source_cs = source_cs
        self.target_cs = target_cs
        self.store_on_change = store
        self._src: list[tuple[float, float]] = []
        self._dst: list[tuple[float, float]] = []
        node = sdata.attrs.get("spatialdata_align", {}) if isinstance(sdata.attrs, dict) else {}
        if key in (node.get("landmarks") or {}):
            s, d = sdata.align.landmarks(key)
            self._src = [tuple(map(float, p)) for p in s]
            self._dst = [tuple(map(float, p)) for p in d]
        self.fig, (self.ax_source, self.ax_target) = plt.subplots(1, 2, figsize=figsize, layout="constrained")
        self._draw_background(self.ax_source, source, source_cs, max_points)
        self._draw_background(self.ax_target, target, target_cs, max_points)
        units = {XENIUM_CS: "µm", VISIUM_CS: "full-resolution px"}
        for ax, name, cs in ((self.ax_source, source, source_cs), (self.ax_target, target, target_cs)):
            ax.set_aspect("equal")
            ax.set_xlabel(f"x ({units.get(cs, cs)})")
            ax.set_ylabel(f"y ({units.get(cs, cs)})")
            ax.set_title(f"{name} ({cs})")
            ax.set_autoscale_on(False)
        self._artists = {
            "src": self.ax_source.scatter([], [], s=60, c="tab:red", edgecolors="k", zorder=5),
            "dst": self.ax_target.scatter([], [], s=60, c="tab:red", edgecolors="k", zorder=5),
        }
        self._labels: list = []
        self._cid = self.fig.canvas.mpl_connect("button_press_event", self._on_click)
        self._redraw()

    # ------------------------------------------------------------------ drawing
    def _draw_background(self, ax, name: str, cs: str, max_points: int) -> None:
        kind = element_kind(self.sdata, name)
        if kind == "image":
            draw_image(ax, self.sdata, name, cs)
            ax.set_ylim(*sorted(ax.get_ylim(), reverse=True))
        elif kind in ("points", "shapes"):
            xy = element_xy(self.sdata, name, cs)
            keep = _subsample(len(xy), max_points)
            ax.scatter(xy[keep, 0], xy[keep, 1], s=0.5, c="0.45", lw=0, rasterized=True)
            lo, hi = xy.min(0), xy.max(0)
            pad = 0.03 * float(max(hi - lo)) + 1.0
            ax.set_xlim(lo[0] - pad, hi[0] + pad)
            ax.set_ylim(hi[1] + pad, lo[1] - pad)  # y down, like the image
        else:
            raise TypeError(f"element {name!r} is {kind}; show an image, points or shapes element.")

    def _redraw(self) -> None:
        for t in self._labels:
            t.remove()
        self._labels = []
        for pts, art, ax in ((self._src, "src", self.ax_source), (self._dst, "dst", self.ax_target)):
            xy = np.asarray(pts, dtype=float).reshape(-1, 2)
            self._artists[art].set_offsets(xy)
            for i, (x, y) in enumerate(xy):
                self._labels.append(
                    ax.annotate(
                        str(i),
                        (x, y),
                        xytext=(5, 5),
                        textcoords="offset points",
                        color="tab:red",
                        fontsize=10,
                        fontweight="bold",
                    )
                )
        n = self.n_pairs
        pending = "source" if len(self._src) < len(self._dst) else "target" if len(self._dst) < len(self._src) else None
        status = f"{n} pair(s) complete" + (f"; next: point {n} in the {pending} panel" if pending else "")
        self.fig.suptitle(f"{status}\n{_HELP}", fontsize=9)
        self.fig.canvas.draw_idle()

    # ------------------------------------------------------------------ events
    def _on_click(self, event) -> None:
        toolbar = getattr(self.fig.canvas, "toolbar", None)
        if toolbar is not None and getattr(toolbar, "mode", ""):
            return
        if event.inaxes is None or event.xdata is None:
            return
        if event.inaxes is self.ax_source:
            pts = self._src
        elif event.inaxes is self.ax_target:
            pts = self._dst
        else:
            return
        before = self.n_pairs
        if event.button == MouseButton.LEFT:
            pts.append((float(event.xdata), float(event.ydata)))
        elif event.button == MouseButton.RIGHT and pts:
            pts.pop()
        else:
            return
        if self.store_on_change and self.n_pairs != before and self.n_pairs > 0:
            self.store()
        self._redraw()

    # ------------------------------------------------------------------ results
    @property
    def n_pairs(self) -> int:
        """Number of complete pairs."""
        return min(len(self._src), len(self._dst))

    @property
    def landmarks(self) -> tuple[np.ndarray, np.ndarray]:
        """The complete pairs ``(source_xy, target_xy)``, each ``(n, 2)`` ``(x, y)`` in its coordinate system."""
        n = self.n_pairs
        return np.asarray(self._src[:n], dtype=float).reshape(-1, 2), np.asarray(self._dst[:n], dtype=float).reshape(
            -1, 2
        )

    def store(self) -> tuple[np.ndarray, np.ndarray]:
        """Store the complete pairs in ``sdata`` with ``sdata.align.set_landmarks`` (set ``key``)."""
        src, dst = self.landmarks
        if len(src) == 0:
            raise ValueError("no complete landmark pair yet: click a point in each panel first.")
        return self.sdata.align.set_landmarks(
            source=src, target=dst, source_cs=self.source_cs, target_cs=self.target_cs, key=self.key
        )

    def disconnect(self) -> None:
        """Stop listening to clicks."""
        self.fig.canvas.mpl_disconnect(self._cid)

    def __repr__(self) -> str:
        counts = f"{len(self._src)} source / {len(self._dst)} target points"
        return f"<LandmarkAnnotator {self.key!r}: {self.n_pairs} pair(s), {counts}>"


def annotate_landmarks(
    sdata: SpatialData,
    source: str = XENIUM_CELLS,
    target: str | None = None,
    *,
    key: str = "landmarks",
    source_cs: str = XENIUM_CS,
    target_cs: str = VISIUM_CS,
    store: bool = True,
    max_points: int = 100_000,
    figsize=(12, 6),
) -> LandmarkAnnotator:
    """Place landmark pairs by clicking on a matplotlib figure (works in Jupyter without a desktop GUI).

    The figure shows ``source`` (left, e.g. Xenium cells in µm) and ``target`` (right, e.g. the
    H&E in full-resolution pixels). Left-click places the next point of a panel, right-click removes
    that panel's last point; point ``i`` on the left pairs with point ``i`` on the right. Landmarks
    already stored under ``key`` are loaded first, so a session can be resumed.

    In Jupyter, enable an interactive backend first: ``%matplotlib widget`` (needs ``ipympl``);
    outside Jupyter any interactive backend (``QtAgg``, ``TkAgg``) works. Use the toolbar's zoom to
    place points precisely: clicks are ignored while zoom or pan is active.

    Parameters
    ----------
    sdata
        The SpatialData object.
    source, target
        Elements shown in the two panels (images, points or shapes); ``target`` defaults to the best Visium
        image present (:func:`spatialdata_align.io.registration_target`).
    key
        Landmark set name (as in ``sdata.align.set_landmarks``).
    source_cs, target_cs
        Coordinate systems of the two panels.
    store
        Store the pairs in ``sdata`` (``sdata.align.set_landmarks(..., key=key)``) every time a
        pair is completed or removed. With ``False`` call :meth:`LandmarkAnnotator.store` yourself.
    max_points
        Largest number of points/cells drawn per panel (a fixed random subset).
    figsize
        Figure size (inches).

    Returns
    -------
    The :class:`LandmarkAnnotator`; ``.landmarks`` gives the ``(source_xy, target_xy)`` arrays.

    Examples
    --------
    >>> %matplotlib widget  # doctest: +SKIP
    >>> ann = sda.pl.annotate_landmarks(sdata)  # doctest: +SKIP
    >>> # ... click pairs ...
    >>> src, dst = ann.landmarks  # doctest: +SKIP
    >>> sdata.align.affine("xenium_cells")  # doctest: +SKIP
    """
    from ..io import registration_target

    target = target or registration_target(sdata)
    for name, cs in ((source, source_cs), (target, target_cs)):
        element_kind(sdata, name)
        if cs not in sdata.coordinate_systems:
            raise KeyError(f"no coordinate system {cs!r}; this SpatialData has {sdata.coordinate_systems}.")
    return LandmarkAnnotator(
        sdata,
        source,
        target,
        key=key,
        source_cs=source_cs,
        target_cs=target_cs,
        store=store,
        max_points=max_points,
        figsize=figsize,
    )
