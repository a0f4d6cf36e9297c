"""The ``sdata.align`` accessor: argument checking and delegation, no numerical logic.

Importing :mod:`spatialdata_align` registers it once on :class:`spatialdata.SpatialData` (the way
spatialdata-plot registers ``sdata.pl``), through a small caching descriptor rather than any
private xarray machinery.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import PointsModel
from spatialdata.transformations import Identity

from . import _apply, _checks, _store
from ._constants import MATCH_WEIGHT_KEY, VISIUM_CS, XENIUM_CS
from ._elements import (
    annotating_tables,
    check_cs,
    element_cs,
    element_kind,
    element_xy,
    image_in_cs,
    with_obs_column,
)
from .io import registration_target, visium_scalefactors
from .registration import (
    AffineFit,
    InitResult,
    Registration,
    auto_init,
    celltype_channels,
    expression_features,
    fit_affine,
    lddmm,
    rasterize,
    stain_densities,
)
from .registration import _lddmm as _engine
from .registration._landmarks import AFFINE_SHAPE_PRIOR
from .registration._utils import check_points

logger = logging.getLogger(__name__)

#: source channels of sdata.align.lddmm (and so of `spatialdata-align run`): see its docstring. Cell-type channels
#: (3 types) beat the density alone on 8 of 13 synthetic pairs (docs/accuracy.md, ablation) at 1.5x the cost per
#: iteration; 6 types cost 2.5x for no further gain
DEFAULT_CHANNELS = "celltypes"
DEFAULT_N_TYPES = 3

#: target channels of sdata.align.lddmm (and so of `spatialdata-align run`): an RGB H&E as haematoxylin and eosin
#: optical densities (colour deconvolution, :func:`~spatialdata_align.registration.stain_densities`). Against the raw
#: RGB: mean of the per-pair median errors 24.9 -> 22.9 µm on the 21-pair corpus, 30.1 -> 27.1 µm on 24 fresh pairs
#: (docs/accuracy.md, "The H&E as stain densities")
DEFAULT_TARGET_CHANNELS = "stains"
#: default source raster pixel size (µm) for LDDMM and automatic initialisation
DEFAULT_DX = 20.0
#: largest target image (pixels) read for registration; finer levels/images are block-averaged
MAX_TARGET_PIXELS = 4_000_000

#: a source with fewer cells than this per mm² of tissue (:func:`cells_per_mm2`) is optimised longer by
#: sdata.align.lddmm (:data:`SPARSE_OPTIMISATION`), unless ``tol`` or ``max_iter`` is given. The boundary between the
#: issue's two density classes (~900 and >= 2000 cells/mm²); on the validation corpus 100 µm bins measure 0.9-1.0x
#: the generators' density (sections at 900 read 811-983, at 2000 read 1772-1945)
SPARSE_CELLS_PER_MM2 = 1500.0
#: the longer optimisation of sparse sources: a 4x tighter convergence tolerance and higher caps per level (the
#: defaults are ``tol=0.02``, ``max_iter=(200, 100, 50)``). On sparse sections the fit was still improving when the
#: default test stopped it: 16 fresh pairs at 900 cells/mm² (seeds 3 and 6, eight families) mean median 23.6 -> 22.3
#: µm, 14 of 16 better (brain-arch 15.7 -> 11.6 and 14.2 -> 10.9), at 1.3-4.9x the time; 8 pairs generated after
#: the rule was fixed (seed 7 at 900) 25.3 -> 22.5 µm, 5 of 8 better; at 2000 cells/mm² (seed 3) mixed (mean 28.7 ->
#: 28.0, two pairs worse by more than 1 µm), so dense sources keep the defaults (docs/accuracy.md, "Sparse sources are
#: optimised longer")
SPARSE_OPTIMISATION = {"tol": 0.005, "max_iter": (400, 300, 300)}
#: bin side (µm) of :func:`cells_per_mm2`: large enough that sparse tissue (~300 cells/mm² in fat) leaves few bins empty
DENSITY_BIN_UM = 100.0


def cells_per_mm2(xy_um: np.ndarray, bin_um: float = DENSITY_BIN_UM) -> float:
    """Cells per mm² of tissue: the number of cells over the area of the ``bin_um`` µm bins holding at least one.

    ``xy_um``: ``(N, 2)`` cell positions in µm. The tissue's own area, not its bounding box's (holes, fat, the
    outline), to within a bin along the edge.
    """
    xy = np.asarray(xy_um, dtype=float)
    if not len(xy):
        return 0.0
    ij = np.floor((xy - xy.min(axis=0)) / float(bin_um)).astype(np.int64)
    occupied = len(np.unique(ij[:, 0] * (int(ij[:, 1].max()) + 1) + ij[:, 1]))
    return len(xy) / (occupied * float(bin_um) ** 2 / 1e6)


def optimisation_defaults(xy_um: np.ndarray, n_levels: int = 3) -> tuple[dict, float]:
    """``(tol/max_iter keyword arguments, cells per mm²)`` for a source: :data:`SPARSE_OPTIMISATION` if it is sparse.

    ``{}`` (the engine's own defaults) for a source with at least :data:`SPARSE_CELLS_PER_MM2` cells per mm²
    (:func:`cells_per_mm2`). ``n_levels``: the number of levels (``scales``); the first keeps the first cap, the
    others the second.
    """
    density = cells_per_mm2(xy_um)
    if density >= SPARSE_CELLS_PER_MM2:
        return {}, density
    caps = SPARSE_OPTIMISATION["max_iter"]
    return {"tol": SPARSE_OPTIMISATION["tol"], "max_iter": (caps[0],) + (caps[1],) * (n_levels - 1)}, density


#: below this score margin over the best other orientation, an automatic initialisation is reported as ambiguous.
#: On the 31 cached pairs of the validation corpus (six families, 700-9000 cells/mm², seeds 0-2) every initialisation
#: more than 100 µm off (13) had a margin <= 0.117, and 10 of the 18 good ones a margin >= 0.162; 0.15 warns on all 13
#: wrong ones and on 8 good ones. The previous 0.05 warned on 4 of the 13. Held out (seed 3 of the six families at 900
#: and 2000 cells/mm², generated afresh): 0.15 warns on 4 of the 6 wrong ones (0.05: 3) and on 3 of the 6 good ones
#: (0.05: none); adipose's two wrong ones scored a refined margin of 0.31-0.35 (every refined competitor was of the
#: same wrong, mirrored orientation), but a coarse margin of 0.012-0.053. The smaller of the two margins is compared:
#: held out, all 6 wrong ones are then named and the same 3 good ones; on the 31 cached pairs 13 of 13 and 9 of 18.
AMBIGUOUS_MARGIN = 0.15


def _known_scale(sd: SpatialData, scs: str, tcs: str) -> float | None:
    """Visium full-resolution px per Xenium µm from the scale factors (None when not the Xenium → Visium pair)."""
    if scs != XENIUM_CS or tcs != VISIUM_CS:
        return None
    try:
        um_per_px = float(visium_scalefactors(sd).get("um_per_px", np.nan))
    except (KeyError, ValueError, TypeError):
        return None
    return 1.0 / um_per_px if np.isfinite(um_per_px) and um_per_px > 0 else None


#: expression components compared by the automatic initialisation (:func:`spot_expression`)
EXPRESSION_COMPONENTS = 3
#: fewest in-tissue Visium spots for the expression to take part in the automatic initialisation
MIN_EXPRESSION_SPOTS = 10


def spot_expression(sd: SpatialData, source: str, scs: str, tcs: str, grid) -> dict:
    """Shared-gene expression for :func:`~spatialdata_align.registration.auto_init`'s expression agreement.

    The cells of ``source`` (with the table annotating them) and the in-tissue Visium spots in ``tcs``, summed over
    the genes both measured (:func:`spatialdata_align.tl.shared_genes`' matching), as
    :func:`~spatialdata_align.registration.expression_features` on the raster ``grid``. Returns the keyword
    arguments ``target_spots``, ``spot_values``, ``source_features``, or ``{}`` when there is nothing to compare
    (no table annotating the cells, no Visium spots, e.g. Visium HD, fewer than :data:`MIN_EXPRESSION_SPOTS` of them
    in tissue, fewer than 2 shared genes).
    """
    from .tl import _data

    try:
        xen = _data.modality(sd, source, None, scs)
        vis = _data.visium(sd, tcs)
        genes = _data._match(xen.table, vis.table)
        keep = np.flatnonzero(_data.in_tissue(vis))
        if keep.size < MIN_EXPRESSION_SPOTS:
            raise ValueError(f"{keep.size} in-tissue Visium spots")
        x = _data.shared_counts(xen.table, genes["xenium_var"])
        v = _data.shared_counts(vis.table, genes["visium_var"])[keep]
        features, values, _ = expression_features(xen.xy, x, v, grid, n_components=EXPRESSION_COMPONENTS)
    except (KeyError, ValueError) as err:
        logger.info("no expression agreement for the automatic initialisation of %r (%s).", source, err)
        return {}
    return {"target_spots": vis.xy[keep], "spot_values": values, "source_features": features}


#: tolerance (µm) of the landmark term: the map passes within a few µm of each landmark pair the affine came from.
#: Smaller than the clicks' own noise (8-15 µm in the validation corpus) on purpose: on the corpus the median error
#: fell on 15 of 25 pairs with 3 µm (mean median 46.5 -> 44.1 µm), less with 8 µm, not at all with 15 µm
LANDMARK_SIGMA_UM = 3.0


def landmark_sigma(affine) -> float:
    """The landmark term's tolerance in target units: :data:`LANDMARK_SIGMA_UM` µm through ``affine``'s scale."""
    return LANDMARK_SIGMA_UM * float(np.sqrt(abs(np.linalg.det(np.asarray(affine)[:2, :2]))))


def _landmark_set(init_method: str | None, landmarks: bool | str) -> str | None:
    """Which landmark set the LDDMM's landmark term uses (``None``: no term)."""
    if landmarks is False or landmarks is None:
        return None
    if landmarks == "auto":
        if init_method and str(init_method).startswith("landmarks:"):
            return str(init_method).split(":", 1)[1]
        return None
    return "landmarks" if landmarks is True else str(landmarks)


def source_image(
    sd: SpatialData,
    source: str,
    scs: str,
    *,
    dx: float = DEFAULT_DX,
    blur: float | None = None,
    channels: str = DEFAULT_CHANNELS,
    n_types: int = DEFAULT_N_TYPES,
    xy: np.ndarray | None = None,
):
    """The LDDMM source image of an element: its density, or the density and one density per cell type.

    One function for the fit (:meth:`AlignAccessor.lddmm`) and for the held-out refits of the accuracy estimate
    (:func:`spatialdata_align._report.assess_alignment`), so the estimate measures the pipeline that was run.

    Returns
    -------
    ``(image, used)``: the ``(c, y, x)`` raster (µm grid) and the channels actually used (``"density"`` when
    ``"celltypes"`` was asked for but no table annotates ``source``).
    """
    if channels not in ("density", "celltypes"):
        raise ValueError(f"channels must be 'density' or 'celltypes', got {channels!r}.")
    xy = element_xy(sd, source, scs) if xy is None else xy
    img = rasterize(xy, dx=dx, blur=blur)
    if channels == "density":
        return img, "density"
    from .tl._data import cell_type_labels, modality

    try:
        mod = modality(sd, source, None, scs)  # positions row-aligned with the table annotating the cells
    except (KeyError, ValueError) as err:
        logger.info("cell-type channels unavailable for %r (%s); aligning the cell density alone.", source, err)
        return img, "density"
    return celltype_channels(mod.xy, cell_type_labels(mod.table, n_types), img, blur=blur), "celltypes"


def target_image(sd: SpatialData, target: str, tcs: str, *, target_channels: str = DEFAULT_TARGET_CHANNELS):
    """The LDDMM target image of an image element: an 8-bit RGB image (an H&E) as stain densities, or as it is.

    One function for the fit (:meth:`AlignAccessor.lddmm`) and for the held-out refits of the accuracy estimate
    (:func:`spatialdata_align._report.assess_alignment`), so the estimate measures the pipeline that was run.

    Returns
    -------
    ``(image, used)``: the ``(c, y, x)`` image in ``tcs`` (at most :data:`MAX_TARGET_PIXELS` pixels) and the channels
    actually used (``"raw"`` when ``"stains"`` was asked for but the image is not 8-bit RGB, e.g. a fluorescence
    image).
    """
    if target_channels not in ("stains", "raw"):
        raise ValueError(f"target_channels must be 'stains' or 'raw', got {target_channels!r}.")
    img = image_in_cs(sd, target, tcs, max_pixels=MAX_TARGET_PIXELS)
    if target_channels == "raw":
        return img, "raw"
    if img.sizes["c"] != 3 or img.dtype != np.uint8:
        logger.info(
            "target %r is not an 8-bit RGB image (%d channels, %s); registering its channels as they are.",
            target,
            img.sizes["c"],
            img.dtype,
        )
        return img, "raw"
    return stain_densities(img), "stains"


def _infer_cs(sdata: SpatialData, element: str, given: str | None, default: str) -> str:
    if given is not None:
        return check_cs(sdata, given)
    systems = element_cs(sdata[element])
    if default in systems:
        return default
    native = [s for s in systems if not s.startswith(f"{default}_")]
    if len(native) == 1:
        return native[0]
    raise ValueError(f"element {element!r} is in several coordinate systems {systems}; pass the one to use.")


def _warn_landmark_coverage(src, xy, kind: str, lm_key: str, shape_prior: float = 0.0) -> None:
    """Warn when the landmark fit extrapolates far at the source's points (the report's coverage check)."""
    from .registration._quality import Thresholds, landmark_extrapolation

    if len(src) < 2 or len(xy) == 0:
        return
    ext = landmark_extrapolation(src, xy, kind=kind, shape_prior=shape_prior)
    q95, limit = float(np.percentile(ext, 95)), Thresholds().extrapolation_check
    if q95 > limit:
        warnings.warn(
            f"landmark set {lm_key!r} leaves part of the tissue far from its landmarks: at 5% of the points the fit "
            f"extrapolates to {q95:.1f}x the landmarks' own placement error (limit {limit:g}), and neither the "
            "held-out landmark errors nor (in featureless tissue) the images can correct it there. Fix: add "
            "landmarks in the tissue farthest from the others (the report's confidence map outlines it).",
            _checks.LandmarkCoverageWarning,
            stacklevel=3,
        )


class AlignAccessor:
    """Alignment of two modalities inside one SpatialData object (``sdata.align``).

    The usual sequence is::

        sdata.align.set_landmarks(source=xy_um, target=xy_px)
        sdata.align.affine(source="xenium_cells", target="visium_hires_image")
        reg = sdata.align.lddmm(source="xenium_cells", target="visium_hires_image")
        sdata.align.apply("xenium_cells")          # -> "xenium_cells_aligned" in "visium"

    Transforms are stored inside the object (:mod:`spatialdata_align._store`) and survive
    ``sdata.write`` / ``spatialdata.read_zarr``.
    """

    def __init__(self, sdata: SpatialData):
        self._sdata = sdata

    # ------------------------------------------------------------------------ introspection
    @property
    def transforms(self) -> pd.DataFrame:
        """The stored transforms, one row per key."""
        return _store.transforms_table(self._sdata)

    def get(self, key: str | None = None) -> Registration:
        """Rebuild a stored transform as a :class:`~spatialdata_align.registration.Registration`.

        ``key=None`` takes the most recently fitted one.
        """
        return _store.load_registration(self._sdata, self._key(key))

    def remove(self, key: str) -> None:
        """Remove a stored transform, its field arrays and the native affines it registered.

        Elements it materialised with :meth:`apply` are kept. Copy-on-write: objects this one was derived
        from (or that were derived from it) are not changed.
        """
        _store.remove_registration(self._sdata, key)

    def set_global(self, cs: str | None = VISIUM_CS) -> list[str]:
        """Expose a coordinate system (by default the aligned Visium frame) also as ``"global"``.

        spatialdata's and spatialdata-plot's defaults use the coordinate system ``"global"``, which the 10x
        readers do not create; spatialdata-plot 0.4.0 even needs it to draw more than 10,000 shapes. This gives
        every element mapped to ``cs`` the same transformation into ``"global"`` (copy-on-write), and keeps it
        so for elements that later writes of ``sdata.align`` map into ``cs`` (aligned copies, native affines).
        ``cs=None`` withdraws it.

        Returns
        -------
        The names of the elements whose transformations changed.
        """
        if cs is not None:
            check_cs(self._sdata, cs)
        return _store.set_global(self._sdata, cs)

    def ngff(self, key: str | None = None) -> dict:
        """The stored transform as an OME-NGFF 0.6 coordinate transformation (JSON-ready dict).

        An ``affine``, or for a non-linear transform a ``bijection`` whose ``forward`` is
        ``sequence[displacements, affine]`` and ``inverse`` ``sequence[affine, displacements]``; the
        ``displacements`` ``path`` names the field arrays inside this object's zarr store (see
        :mod:`spatialdata_align.ngff`).
        """
        return _store.get_entry(self._sdata, self._key(key))["ngff"]

    def export_ngff(self, path, key: str | None = None, *, overwrite: bool = False):
        """Write a stored transform as a standalone OME-Zarr 0.6 container.

        See :func:`~spatialdata_align.ngff.write_transform` for the layout. Other tools, and other
        SpatialData objects of the same sections (:meth:`import_ngff`), can then use it. Returns the
        container path.
        """
        from . import ngff

        key = self._key(key)
        entry = _store.get_entry(self._sdata, key)
        provenance = {
            k: entry.get(k) for k in ("kind", "source_element", "target_element", "params", "package_version")
        }
        return ngff.write_transform(
            self.get(key),
            path,
            source_cs=entry["source_cs"],
            target_cs=entry["target_cs"],
            name=key,
            overwrite=overwrite,
            attributes={"provenance": provenance},
        )

    def import_ngff(
        self,
        path,
        *,
        name: str | None = None,
        key: str | None = None,
        source_cs: str | None = None,
        target_cs: str | None = None,
        native: bool = True,
    ) -> Registration:
        """Store a transform read from a standalone OME-Zarr 0.6 container (:meth:`export_ngff`).

        Parameters
        ----------
        path
            The container.
        name
            Which transformation of the container (default: its only one).
        key
            Storage key (default: the transformation's name).
        source_cs, target_cs
            Coordinate systems of this object it maps between (default: the container's names).
        native
            Register the affine part natively on the elements of ``source_cs`` (as :meth:`affine` does)
            when the transform is an affine.

        Returns
        -------
        The stored :class:`~spatialdata_align.registration.Registration`.
        """
        from . import ngff

        reg, info = ngff.read_transform(path, name)
        scs = check_cs(self._sdata, source_cs or info["source_cs"])
        tcs = check_cs(self._sdata, target_cs or info["target_cs"])
        prov = (info.get("attributes") or {}).get("provenance") or {}
        kind = prov.get("kind") or ("affine" if reg.is_affine else "lddmm")
        _, stored = _store.store_registration(
            self._sdata,
            reg,
            key=key or info["name"] or f"{scs}_to_{tcs}_{kind}",
            kind=kind,
            source_cs=scs,
            target_cs=tcs,
            source_element=None,
            target_element=None,
            extra={"method": f"imported:{path}"},
            native=native and reg.is_affine,
        )
        return stored

    def _key(self, key: str | None) -> str:
        if key is not None:
            _store.get_entry(self._sdata, key)
            return key
        default = _store.default_key(self._sdata)
        if not default:
            raise ValueError(_store.no_default(self._sdata))
        return default

    # ------------------------------------------------------------------------ landmarks
    def set_landmarks(
        self,
        source=None,
        target=None,
        *,
        source_cs: str = XENIUM_CS,
        target_cs: str = VISIUM_CS,
        key: str = "landmarks",
        names=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Store matched landmark pairs as Points elements (or register pairs already placed).

        Parameters
        ----------
        source, target
            ``(N, 2)`` arrays of ``(x, y)`` in the source / target coordinate systems (e.g. Xenium
            µm and Visium full-resolution pixels), DataFrames with ``x``/``y`` columns, or the
            names of Points (or Shapes circles, as older napari-spatialdata versions save them)
            elements that already hold them (e.g. placed in napari-spatialdata; pairs are matched by
            row order).
        source_cs, target_cs
            Coordinate systems of the two sides.
        key
            Name of the landmark set; array inputs become Points elements ``<key>_<source_cs>`` and
            ``<key>_<target_cs>``.
        names
            Optional labels, one per pair (stored in a ``landmark`` column).

        Returns
        -------
        ``(source_xy, target_xy)`` arrays in their coordinate systems.
        """
        sd = self._sdata
        check_cs(sd, source_cs)
        check_cs(sd, target_cs)
        if source is None or target is None:
            raise ValueError("pass both source and target landmarks (arrays or Points element names).")
        src, src_el = self._landmark_side(source, source_cs, f"{key}_{source_cs}", "source")
        dst, dst_el = self._landmark_side(target, target_cs, f"{key}_{target_cs}", "target")
        if src.shape[0] != dst.shape[0]:
            raise ValueError(
                f"landmarks must be matched pairs: {src.shape[0]} source points ({src_el}) vs "
                f"{dst.shape[0]} target points ({dst_el})."
            )
        if names is None:
            names = [str(i) for i in range(src.shape[0])]
        elif len(names) != src.shape[0]:
            raise ValueError(f"names has {len(names)} entries for {src.shape[0]} landmark pairs.")
        for xy, el, cs, given in ((src, src_el, source_cs, source), (dst, dst_el, target_cs, target)):
            if not isinstance(given, str):
                df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "landmark": [str(n) for n in names]})
                sd.points[el] = PointsModel.parse(df, transformations={cs: Identity()})
        _store.set_landmark_set(
            sd,
            key,
            {"source_element": src_el, "target_element": dst_el, "source_cs": source_cs, "target_cs": target_cs},
        )
        return src, dst

    def _landmark_side(self, value, cs: str, default_name: str, side: str) -> tuple[np.ndarray, str]:
        if isinstance(value, str):
            kind = element_kind(self._sdata, value)
            if kind not in ("points", "shapes"):
                raise TypeError(
                    f"{side} landmarks element {value!r} is of kind {kind!r}, not points or shapes (circles)."
                )
            return element_xy(self._sdata, value, cs), value
        if isinstance(value, pd.DataFrame):
            missing = {"x", "y"} - set(value.columns)
            if missing:
                raise ValueError(f"{side} landmarks DataFrame lacks columns {sorted(missing)}.")
            value = value[["x", "y"]].to_numpy(dtype=float)
        return check_points(value, f"{side} landmarks", min_points=1), default_name

    def landmarks(self, key: str = "landmarks") -> tuple[np.ndarray, np.ndarray]:
        """The stored landmark pairs ``(source_xy, target_xy)`` of set ``key``."""
        node = _store.root(self._sdata)["landmarks"]
        if key not in node:
            raise KeyError(
                f"no landmark set {key!r}; stored sets: {sorted(node) or 'none'}. "
                "Place them with sdata.align.set_landmarks(source=..., target=...)."
            )
        e = node[key]
        src = element_xy(self._sdata, e["source_element"], e["source_cs"])
        dst = element_xy(self._sdata, e["target_element"], e["target_cs"])
        if src.shape[0] != dst.shape[0]:
            raise ValueError(
                f"landmark set {key!r} is unmatched: {src.shape[0]} points in {e['source_element']!r} vs "
                f"{dst.shape[0]} in {e['target_element']!r}."
            )
        return src, dst

    # ------------------------------------------------------------------------ affine
    def affine(
        self,
        source: str = "xenium_cells",
        target: str | None = None,
        *,
        landmarks: bool | str = True,
        auto: bool = False,
        kind: str = "affine",
        key: str | None = None,
        source_cs: str | None = None,
        target_cs: str | None = None,
        dx: float = 30.0,
        flip: bool | None = None,
        shape_prior: float = AFFINE_SHAPE_PRIOR,
        expression: bool = True,
    ) -> AffineFit | InitResult:
        """Fit a source→target affine and register it as a native spatialdata ``Affine``.

        Every element of the source coordinate system gets a transformation into the target one,
        so ``spatialdata.transform(..., to_coordinate_system=target_cs)``, queries and
        spatialdata-plot show the affine-aligned data.

        Parameters
        ----------
        source
            Points/shapes element to align (e.g. ``"xenium_cells"``).
        target
            Element of the target coordinate system (an image for ``auto=True``); default: the best Visium image
            present (:func:`spatialdata_align.io.registration_target`).
        landmarks
            ``True`` uses the landmark set ``"landmarks"``, a string names another set.
        auto
            Find the affine without landmarks (:func:`~spatialdata_align.registration.auto_init`
            on the rasterised source and the target image). From Xenium µm to the Visium frame the scale is
            known from the Visium scale factors, and the search then lets the Xenium section cover only part
            of the Visium tissue.
        kind
            ``"affine"``, ``"similarity"`` or ``"rigid"`` (landmark fits). ``"rigid"`` from Xenium µm to the Visium
            frame is a rotation and translation at the scale the Visium scale factors give (px per µm), not 1.
        key
            Name under which the transform is stored (default ``<source_cs>_to_<target_cs>_affine``).
        source_cs, target_cs
            Coordinate systems (default: inferred from the elements).
        dx
            Raster pixel size (source units) for ``auto=True``.
        flip
            A mirrored fit (a reflection: the section mounted upside down, or landmarks saved as (y, x)):
            ``True`` accepts it, ``False`` refuses it (the automatic search then tries proper rotations only),
            ``None`` (default) accepts it with a :class:`~spatialdata_align._checks.PlausibilityWarning`.
        shape_prior
            Landmark affines (source units, µm for Xenium): draws the affine's stretch and shear towards the best
            rotation + uniform scale where the landmarks spread little (three landmarks near a line); ``0`` gives
            the plain least-squares affine. See :func:`~spatialdata_align.registration.fit_affine`.
        expression
            ``auto=True``: let the expression of the genes both platforms measured (cells of ``source`` against the
            Visium spots, :func:`spot_expression`) help choose among the candidate orientations; ignored when either
            table is missing. ``False``: the images alone.

        Returns
        -------
        The landmark fit (:class:`~spatialdata_align.registration.AffineFit`, with per-landmark
        residuals) or the automatic initialisation
        (:class:`~spatialdata_align.registration.InitResult`).
        """
        sd = self._sdata
        target = target or registration_target(sd)
        element_kind(sd, source)
        element_kind(sd, target)
        scs = _infer_cs(sd, source, source_cs, XENIUM_CS)
        tcs = _infer_cs(sd, target, target_cs, VISIUM_CS)
        if auto:
            src_img = rasterize(element_xy(sd, source, scs), dx=dx)
            tgt_img = image_in_cs(sd, target, tcs, max_pixels=MAX_TARGET_PIXELS)
            scale = _known_scale(sd, scs, tcs)
            spots = spot_expression(sd, source, scs, tcs, src_img) if expression else {}
            fit: AffineFit | InitResult = auto_init(
                src_img, tgt_img, reflection=None if flip is not False else False, scale=scale, **spots
            )
            extra = {
                "method": "auto",
                "score": float(fit.score),
                "expression_r": fit.expression_r,
                "known_scale": scale,
                "margin": fit.margin,
                "coarse_margin": fit.coarse_margin,
            }
            # the refined candidates' margin, or the coarse search's when that is smaller (every refined competitor
            # may share one wrong orientation); nan (nothing to compare) is not ambiguous
            finite = [m for m in (fit.margin, fit.coarse_margin) if np.isfinite(m)]
            margin = min(finite) if finite else float("nan")
            if margin < AMBIGUOUS_MARGIN:
                # a soft finding: warned here, and in a pipeline run recorded for the report's verdict
                evidence = "outlines and densities" + (" and the shared-gene expression" if spots else "")
                _checks.soft_warning(
                    _checks.Finding(
                        "ambiguous_init",
                        f"the automatic initialisation is ambiguous: another orientation (mirrored, or rotated by "
                        f"more than 20°) scores within {margin:.3f} of the chosen one, so the tissue {evidence} "
                        "cannot tell them apart.",
                        "place 3-6 landmarks (--landmarks; Python: sdata.align.set_landmarks(...) then "
                        "sdata.align.affine()), or check the overlay in the report.",
                    )
                )
        else:
            if landmarks is False:
                raise ValueError("pass landmarks=True (or a landmark set name) or auto=True.")
            lm_key = "landmarks" if landmarks is True else str(landmarks)
            src, dst = self.landmarks(lm_key)
            known = _known_scale(sd, scs, tcs) if kind == "rigid" else None
            if known is not None:
                # rigid in physical units: rotation + translation between Xenium µm and Visium px at the scale factors'
                # px per µm (a rigid fit in the raw units would force 1 px = 1 µm)
                phys = fit_affine(src, dst / known, kind="rigid", shape_prior=shape_prior)
                to_px = np.diag([known, known, 1.0])
                fit = dataclasses.replace(
                    phys, matrix=to_px @ phys.matrix, residuals=phys.residuals * known, dst=np.asarray(dst, float)
                )
            else:
                fit = fit_affine(src, dst, kind=kind, shape_prior=shape_prior)
            extra = {
                "method": f"landmarks:{lm_key}",
                "kind": kind,
                "shape_prior": float(shape_prior),
                "residuals": fit.residuals.tolist(),
            }
            _warn_landmark_coverage(src, element_xy(sd, source, scs), kind, lm_key, shape_prior)
        if fit.reflection and not flip:
            _checks.reflection("the automatic search" if auto else f"landmark set {lm_key!r}", refuse=flip is False)
        reg = Registration.from_affine(fit.matrix, source_units="um", target_units="px")
        key = key or f"{scs}_to_{tcs}_affine"
        _store.store_registration(
            sd,
            reg,
            key=key,
            kind="affine",
            source_cs=scs,
            target_cs=tcs,
            source_element=source,
            target_element=target,
            extra=extra,
        )
        return fit

    # ------------------------------------------------------------------------ lddmm
    def lddmm(
        self,
        source: str = "xenium_cells",
        target: str | None = None,
        *,
        init: str | np.ndarray | None = None,
        landmarks: bool | str = "auto",
        key: str | None = None,
        source_cs: str | None = None,
        target_cs: str | None = None,
        dx: float = DEFAULT_DX,
        blur: float | None = None,
        match_weight_key: str = MATCH_WEIGHT_KEY,
        channels: str = DEFAULT_CHANNELS,
        n_types: int = DEFAULT_N_TYPES,
        target_channels: str = DEFAULT_TARGET_CHANNELS,
        target_blur: float | None = None,
        **params: Any,
    ) -> Registration:
        """Refine the affine with a diffeomorphic (LDDMM) registration and store the result.

        The source element's positions are rasterised into a density image (pixel ``dx`` µm) and
        registered onto the target image (e.g. the H&E) with
        :func:`~spatialdata_align.registration.lddmm`, starting from the stored affine.

        Parameters
        ----------
        source, target
            Points/shapes element and image element (default: the best Visium image present,
            :func:`spatialdata_align.io.registration_target`).
        init
            Key of the stored affine to start from (default ``<source_cs>_to_<target_cs>_affine``),
            or a ``(3, 3)`` matrix.
        landmarks
            Landmark term (the map is pulled through matched landmark pairs, with tolerance ``sigma_p``; default
            :data:`LANDMARK_SIGMA_UM` µm): ``"auto"`` (default) uses the landmark set the initial affine was fitted
            from, if it was; ``True`` the set ``"landmarks"``; a string names a set; ``False`` leaves the term out.
            On the validation corpus the term lowered the median error on 15 of 25 pairs (``docs/accuracy.md``):
            the images alone cannot pin a smooth warp in uniform tissue, and a few clicks can.
        key
            Storage key (default ``<source_cs>_to_<target_cs>_lddmm``).
        source_cs, target_cs
            Coordinate systems (default: inferred from the elements).
        dx, blur
            Raster pixel size and blur (source units).
        match_weight_key
            ``obs`` column receiving each source cell's match weight in the tables annotating
            ``source``.
        channels
            Source image: ``"celltypes"`` (default: the density plus one density per cell type, k-means clusters
            of the expression in the table annotating ``source``, :func:`~spatialdata_align.tl.cell_type_labels`;
            each type gets its own colours in the contrast model; without such a table, the density alone) or
            ``"density"`` (all cells in one channel).
        n_types
            Number of cell types for ``channels="celltypes"``.
        target_channels
            Target image: ``"stains"`` (default: an 8-bit RGB image, an H&E, as haematoxylin and eosin optical
            densities, :func:`~spatialdata_align.registration.stain_densities`; other images as they are) or
            ``"raw"`` (the image's own channels, e.g. R, G, B). Stored with the fit (``"raw"`` when the image was not
            RGB), so the accuracy estimate's refits repeat it.
        target_blur
            Gaussian blur of the target image (µm, standard deviation; ``target_blur`` of
            :func:`~spatialdata_align.registration.lddmm`). Default: the source raster's own blur (``blur``, or
            ``dx``), so that the cell densities and the H&E are compared at the same resolution; ``0``: none. Stored
            with the fit's parameters (the accuracy estimate's refits repeat it). On 43 synthetic pairs of six tissue
            families the mean median error fell from 26.9 to 22.9 µm (20 pairs better, none worse), on 28 pairs held
            out from that choice from 20.0 to 19.1 µm (5 better, 3 worse; ``docs/accuracy.md``).
        **params
            Passed to :func:`~spatialdata_align.registration.lddmm` (``a``, ``sigma_r``,
            ``scales``, ``max_iter``, ``progress``, ...). Without ``tol`` and ``max_iter``, a sparse source (fewer
            than :data:`SPARSE_CELLS_PER_MM2` cells per mm² of tissue, :func:`cells_per_mm2`) is optimised longer
            (:data:`SPARSE_OPTIMISATION`: ``tol=0.005``, ``max_iter=(400, 300, 300)``); the fit's ``params`` record
            what was used, the stored entry ``sparse_optimisation`` whether the rule applied and ``cells_per_mm2``
            the density it saw.

        Returns
        -------
        The stored :class:`~spatialdata_align.registration.Registration`: the fitted map in its stored,
        sampled form (affine + displacement fields on grids covering both sections, see
        :meth:`~spatialdata_align.registration.Registration.to_displacement`), which is what
        :meth:`get`, :meth:`apply` and :meth:`transform_points` use and what any OME-NGFF reader of the
        written store computes. It differs from the fitted flow by a small fraction of a µm.
        """
        sd = self._sdata
        target = target or registration_target(sd)
        element_kind(sd, source)
        if element_kind(sd, target) != "image":
            raise TypeError(f"target {target!r} must be an image element for LDDMM.")
        scs = _infer_cs(sd, source, source_cs, XENIUM_CS)
        tcs = _infer_cs(sd, target, target_cs, VISIUM_CS)
        entry_method = None
        init_fit: dict[str, Any] = {"init_kind": None, "init_shape_prior": None}
        if init is None or isinstance(init, str):
            init_key = init or f"{scs}_to_{tcs}_affine"
            try:
                entry = _store.get_entry(sd, init_key)
            except KeyError as err:
                raise ValueError(
                    f"no affine {init_key!r} to start from: call sdata.align.affine(source={source!r}, "
                    f"target={target!r}) first, or pass init=<3x3 matrix>."
                ) from err
            A0 = np.asarray(entry["affine"])
            entry_method = entry.get("method")
            # the landmark fit's model, so the accuracy estimate's refits can repeat it
            init_fit = {"init_kind": entry.get("kind"), "init_shape_prior": entry.get("shape_prior")}
        else:
            A0 = np.asarray(init, dtype=float)
        xy = element_xy(sd, source, scs)
        src_img, used = source_image(sd, source, scs, dx=dx, blur=blur, channels=channels, n_types=n_types, xy=xy)
        tgt_img, tgt_used = target_image(sd, target, tcs, target_channels=target_channels)
        kw = {"contrast_degree": 3, "source_units": "um", "target_units": "px"}
        kw["target_blur"] = float((dx if blur is None else blur) if target_blur is None else target_blur)
        kw.update(params)
        sparse, density = {}, None
        if "tol" not in params and "max_iter" not in params and kw.get("source_units") == "um":
            n_levels = np.size(params.get("scales", inspect.signature(_engine.lddmm).parameters["scales"].default))
            sparse, density = optimisation_defaults(xy, n_levels)
            kw.update(sparse)
            longer = "; optimised longer" if sparse else ""
            logger.info("source %r: %.0f cells per mm² of tissue%s", source, density, longer)
        lm_key = _landmark_set(entry_method, landmarks)
        if lm_key is not None:
            src_lm, dst_lm = self.landmarks(lm_key)
            kw.update(source_landmarks=src_lm, target_landmarks=dst_lm)
            # the tolerance in µm on the source side, in target units through the initial affine's scale
            kw.setdefault("sigma_p", landmark_sigma(A0))
        fitted = lddmm(src_img, tgt_img, affine=A0, **kw)
        key = key or f"{scs}_to_{tcs}_lddmm"
        _, reg = _store.store_registration(
            sd,
            fitted,
            key=key,
            kind="lddmm",
            source_cs=scs,
            target_cs=tcs,
            source_element=source,
            target_element=target,
            extra={
                "dx": float(dx),
                "blur": None if blur is None else float(blur),
                "init": init if isinstance(init, str) else None,
                "channels": used,
                "n_types": int(n_types),
                "target_channels": tgt_used,
                "landmark_set": lm_key,
                "sparse_optimisation": bool(sparse),
                "cells_per_mm2": None if density is None else round(float(density), 1),
                **init_fit,
            },
            native=False,
        )
        # per-cell match confidence in the tables annotating the source element
        if reg.match_weight is not None:
            weights = reg.match_weight_at(xy)
            for tname in annotating_tables(sd, source):
                table = sd.tables[tname]
                if table.n_obs == len(weights):
                    sd.tables[tname] = with_obs_column(table, match_weight_key, weights)
                else:  # pragma: no cover - tables annotating several regions
                    warnings.warn(f"table {tname!r} does not match {source!r} row for row; no match weight.")
        return reg

    # ------------------------------------------------------------------------ apply
    def apply(
        self,
        element: str,
        *,
        key: str | None = None,
        inverse: bool = False,
        name: str | None = None,
        tables: bool = True,
        grid: str | tuple | None = None,
        pixel_size: float | None = None,
        max_pixels: int | None = None,
        level: int | None = None,
        chunk: int = 1024,
        map_step: int | None = None,
    ) -> str:
        """Materialise an aligned copy of an element in the other coordinate system.

        Parameters
        ----------
        element
            A points (e.g. transcripts), shapes (cells, boundaries, spots) or image element, or a
            table (its ``obsm["spatial"]``).
        key
            Stored transform to apply (default: the most recently fitted).
        inverse
            Map target elements back to the source coordinate system.
        name
            Name of the new element (default ``<element>_aligned``).
        tables
            Also write ``<table>_aligned`` copies of tables annotating ``element``, annotating the
            aligned element, with ``obsm["spatial"]`` transformed (the input frame's position columns of
            ``obs``, Xenium's ``x_centroid`` / ``y_centroid`` in µm, renamed ``x_centroid_<input system>``).
        grid
            Images only: output grid, as the name of an image element of the output coordinate
            system (e.g. ``"visium_hires_image"``) or ``(x, y)`` pixel-centre arrays. Default: a grid
            covering the mapped image at its native resolution.
        pixel_size
            Images only: output pixel size (output units) when no grid is given.
        max_pixels
            Images only: an explicit cap on the output's pixel count; a larger grid is coarsened
            (same extent) with a logged warning. Default: no cap.
        level
            Images only: pyramid level of a multiscale image to read; default the coarsest whose
            pixels are no larger than the output's (level 0 at native resolution).
        chunk
            Images only: output chunk size (pixels per side).
        map_step
            Images only: evaluate the transform exactly every ``map_step`` output pixels and
            interpolate in between (default: chosen so the interpolation error stays below 0.01 input
            pixels; ``1``: every pixel). See :meth:`~spatialdata_align.registration.Registration.warp_image`.

        Returns
        -------
        The name of the new element. Points are transformed lazily (partition by partition); images
        are warped lazily, block by block over the output chunks, each block reading only the input
        window it needs, and come out as a dask-backed (multiscale when large) image with the input's
        dtype, written chunk by chunk by ``sdata.write``.
        """
        key = self._key(key)
        return _apply.apply(
            self._sdata,
            element,
            key=key,
            inverse=inverse,
            name=name,
            tables=tables,
            grid=grid,
            pixel_size=pixel_size,
            max_pixels=max_pixels,
            level=level,
            chunk=chunk,
            map_step=map_step,
        )

    def transform_points(self, xy, *, key: str | None = None, inverse: bool = False) -> np.ndarray:
        """Map ``(N, 2)`` ``(x, y)`` points with a stored transform (source → target by default)."""
        reg = self.get(key)
        return reg.transform_points(xy, "inverse" if inverse else "forward")

    def __repr__(self) -> str:
        keys = _store.stored_keys(self._sdata)
        return f"<sdata.align: {len(keys)} stored transform(s): {keys}>"


from ._register import _AccessorDescriptor, register  # noqa: E402,F401  (re-exported: the old home)

logger.debug("sdata.align accessor module loaded")
