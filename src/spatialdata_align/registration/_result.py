"""The :class:`Registration` result: owns the transform and applies it to points and images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ._displacement import DisplacementField, affine_extent, pad_extent, union_extent
from ._flow import affine_torch, flow_forward, flow_inverse
from ._utils import apply_affine, check_points, homogeneous, interp
from ._warp import DEFAULT_CHUNK, DEFAULT_MAP_TOL, Grid, TransformMap, image_levels, warp_levels

_DIRECTIONS = ("forward", "inverse")

#: default displacement-field node spacing, as a fraction of the velocity grid spacing (see
#: :meth:`Registration.to_displacement`; measured in ``tests/test_displacement.py``)
DEFAULT_SPACING_FRACTION = 0.5


def _check_direction(direction: str) -> str:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'forward' (source -> target) or 'inverse', got {direction!r}.")
    return direction


@dataclass
class Registration:
    """A fitted source→target transform: an affine composed with a diffeomorphism.

    A source point ``x`` (source units, e.g. Xenium µm) maps to the target point
    ``affine @ phi(x)`` (target units, e.g. Visium full-resolution pixels), where ``phi`` is the
    flow of :attr:`velocity` (see :mod:`spatialdata_align.registration._flow`). With no velocity
    (``velocity_values`` of zeros or ``None``) the transform is the affine alone.

    Attributes
    ----------
    affine
        ``(3, 3)`` homogeneous matrix, source units → target units, applied after ``phi``.
    velocity_values
        ``(nt, 2, ny, nx)`` velocity field (source units per unit time; channel 0 = x, 1 = y) or
        ``None``.
    xv, yv
        Velocity grid node coordinates (source units).
    energy
        One row per iteration: ``level``, ``iteration``, ``total``, ``match``, ``reg``,
        ``landmark``, and the line search's accepted ``step`` and number of ``trials`` (energy evaluations).
    match_weight
        ``(ny, nx)`` posterior probability that each target pixel is matched tissue (not background
        or artifact), on the finest target grid used, as a DataArray with physical coordinates.
    params
        The parameters the fit used (JSON-serialisable).
    source_units, target_units
        Physical units of the two spaces.
    """

    affine: np.ndarray
    velocity_values: np.ndarray | None = None
    xv: np.ndarray | None = None
    yv: np.ndarray | None = None
    energy: pd.DataFrame = field(default_factory=pd.DataFrame)
    match_weight: xr.DataArray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    source_units: str = "um"
    target_units: str = "px"
    source_extent: tuple[float, float, float, float] | None = None
    target_extent: tuple[float, float, float, float] | None = None
    contrast: dict[str, Any] = field(default_factory=dict)
    forward_field: DisplacementField | None = None
    inverse_field: DisplacementField | None = None

    def __post_init__(self):
        self.affine = homogeneous(self.affine)
        for name in ("forward_field", "inverse_field"):
            f = getattr(self, name)
            if isinstance(f, dict):
                setattr(self, name, DisplacementField.from_dict(f))
        if (self.forward_field is None) != (self.inverse_field is None):
            raise ValueError("a sampled registration needs both forward_field and inverse_field (or neither).")
        if self.velocity_values is not None:
            self.velocity_values = np.asarray(self.velocity_values, dtype=np.float64)
            if self.velocity_values.ndim != 4 or self.velocity_values.shape[1] != 2:
                raise ValueError(f"velocity must be (nt, 2, ny, nx), got {self.velocity_values.shape}.")
            self.xv = np.asarray(self.xv, dtype=np.float64)
            self.yv = np.asarray(self.yv, dtype=np.float64)
            if self.xv.shape != (self.velocity_values.shape[3],) or self.yv.shape != (self.velocity_values.shape[2],):
                raise ValueError("velocity grid coordinates xv/yv do not match the velocity field's shape.")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_affine(cls, matrix, **kwargs) -> Registration:
        """An affine-only registration (no diffeomorphic part)."""
        return cls(affine=matrix, **kwargs)

    @property
    def has_velocity(self) -> bool:
        """Whether a non-linear (diffeomorphic) part is present."""
        return self.velocity_values is not None and bool(np.any(self.velocity_values))

    @property
    def is_sampled(self) -> bool:
        """Whether the map is held as displacement fields (the stored, OME-NGFF form)."""
        return self.forward_field is not None

    @property
    def is_affine(self) -> bool:
        """Whether the map is the affine alone (no velocity, no displacement fields)."""
        return not self.is_sampled and not self.has_velocity

    def to_displacement(
        self,
        *,
        spacing: float | None = None,
        source_extent=None,
        target_extent=None,
        margin: float | None = None,
    ) -> Registration:
        """The same map in sampled form: displacement fields on grids covering both sections.

        Parameters
        ----------
        spacing
            Grid node spacing (source units). Default: ``DEFAULT_SPACING_FRACTION`` of the velocity grid
            spacing (fine enough that the sampled map differs from the flow by far less than a cell).
        source_extent
            ``(xmin, xmax, ymin, ymax)`` (source units) of the source section; default :attr:`source_extent`.
        target_extent
            ``(xmin, xmax, ymin, ymax)`` (target units) of the target section; default :attr:`target_extent`.
            Both fields cover both sections (the target pulled back by the affine), grown by the largest
            displacement, so composing the two directions never leaves a grid.
        margin
            Extra coverage on every side (source units); default two nodes.

        Returns
        -------
        A new :class:`Registration` with ``forward_field``/``inverse_field`` set and no velocity
        (affine, energy, parameters, match weight and extents are kept). An affine-only registration is
        returned unchanged (a copy).
        """
        if self.is_affine:
            return Registration.from_dict(self.to_dict())
        if spacing is None:
            if self.is_sampled:
                spacing = min(self.forward_field.dx, self.forward_field.dy)
            else:
                spacing = DEFAULT_SPACING_FRACTION * float(np.min(np.diff(self.xv)))
        spacing = float(spacing)
        margin = 2.0 * spacing if margin is None else float(margin)
        src = self.source_extent if source_extent is None else source_extent
        tgt = self.target_extent if target_extent is None else target_extent
        if src is None or tgt is None:
            raise ValueError("pass source_extent and target_extent: the registration does not know its sections.")
        a_inv = np.linalg.inv(self.affine)
        # both fields cover both sections (the source, and the target pulled back by the affine), grown by the
        # largest displacement, so forward(inverse(y)) and inverse(forward(x)) never leave a grid
        reach = float(np.abs(self.velocity_values).max()) if self.has_velocity else 0.0
        if self.is_sampled:
            reach = float(max(np.abs(self.forward_field.values).max(), np.abs(self.inverse_field.values).max()))
        cover = pad_extent(union_extent(src, affine_extent(a_inv, tgt)), margin + np.sqrt(2.0) * reach)
        fwd = DisplacementField.sample(
            lambda p: apply_affine(a_inv, self.transform_points(p, "forward")), cover, spacing
        )
        inv = DisplacementField.sample(
            lambda p: self.transform_points(apply_affine(self.affine, p), "inverse"), cover, spacing
        )
        d = self.to_dict()
        d.update(velocity=None, xv=None, yv=None, forward_field=fwd.to_dict(), inverse_field=inv.to_dict())
        d["params"] = dict(d["params"], field_spacing=spacing)
        return Registration.from_dict(d)

    @property
    def velocity(self) -> xr.DataArray | None:
        """The velocity field as a ``(t, c, y, x)`` DataArray with physical coordinates."""
        if self.velocity_values is None:
            return None
        return xr.DataArray(
            self.velocity_values,
            dims=("t", "c", "y", "x"),
            coords={
                "t": np.arange(self.velocity_values.shape[0]),
                "c": ["vx", "vy"],
                "y": self.yv,
                "x": self.xv,
            },
            attrs={"units": f"{self.source_units} per unit time", "space": "source"},
            name="velocity",
        )

    # ------------------------------------------------------------------------ application
    def _v(self) -> torch.Tensor:
        return torch.as_tensor(self.velocity_values, dtype=torch.float64)

    def transform_points(self, xy, direction: str = "forward", *, tol: float = 1e-10) -> np.ndarray:
        """Map points between the two spaces.

        Parameters
        ----------
        xy
            ``(N, 2)`` points ``(x, y)``: source units for ``"forward"``, target units for
            ``"inverse"``.
        direction
            ``"forward"`` (source → target) or ``"inverse"`` (target → source).
        tol
            Convergence tolerance (source units) of the fixed-point inversion of each flow step.

        Returns
        -------
        ``(N, 2)`` float64 array of mapped points.
        """
        _check_direction(direction)
        pts = check_points(xy, "xy")
        if pts.shape[0] == 0:
            return pts.copy()
        if self.is_sampled:
            if direction == "forward":
                return apply_affine(self.affine, self.forward_field._displace(pts))
            return self.inverse_field._displace(apply_affine(np.linalg.inv(self.affine), pts))
        if not self.has_velocity:
            m = self.affine if direction == "forward" else np.linalg.inv(self.affine)
            return apply_affine(m, pts)
        with torch.no_grad():
            t = torch.as_tensor(pts, dtype=torch.float64)
            a = torch.as_tensor(self.affine, dtype=torch.float64)
            if direction == "forward":
                out = affine_torch(a, flow_forward(t, self._v(), self.xv, self.yv))
            else:
                t = affine_torch(torch.linalg.inv(a), t)
                out = flow_inverse(t, self._v(), self.xv, self.yv, tol=tol)
        return out.numpy()

    def displacement(self, x=None, y=None, direction: str = "forward") -> xr.DataArray:
        """The non-linear part as a displacement field ``phi(p) - p`` (source units).

        ``direction="forward"`` gives ``phi(p) - p``; ``"inverse"`` gives ``phi^{-1}(p) - p``.
        Sampled on the grid ``x``/``y`` (source units; default the velocity grid). Returns a
        ``(c, y, x)`` DataArray with channels ``dx``, ``dy``.
        """
        _check_direction(direction)
        if self.is_sampled:
            grid = self.forward_field if direction == "forward" else self.inverse_field
            x = grid.x if x is None else x
            y = grid.y if y is None else y
        x = self.xv if x is None else np.asarray(x, dtype=float)
        y = self.yv if y is None else np.asarray(y, dtype=float)
        if x is None or y is None:
            raise ValueError("this registration has no velocity grid; pass x and y explicitly.")
        gx, gy = np.meshgrid(x, y)
        pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
        if self.is_sampled:
            out = (self.forward_field if direction == "forward" else self.inverse_field).apply(pts)
        elif self.has_velocity:
            with torch.no_grad():
                t = torch.as_tensor(pts, dtype=torch.float64)
                if direction == "forward":
                    out = flow_forward(t, self._v(), self.xv, self.yv).numpy()
                else:
                    out = flow_inverse(t, self._v(), self.xv, self.yv, tol=1e-10).numpy()
        else:
            out = pts
        d = (out - pts).T.reshape(2, y.size, x.size)
        return xr.DataArray(
            d,
            dims=("c", "y", "x"),
            coords={"c": ["dx", "dy"], "y": y, "x": x},
            attrs={"units": self.source_units, "direction": direction},
            name="displacement",
        )

    def warp_image(
        self,
        image,
        x=None,
        y=None,
        *,
        direction: str = "forward",
        out_x=None,
        out_y=None,
        fill: float = 0.0,
        dtype=None,
        level: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        map_step: int | None = None,
        map_tol: float = DEFAULT_MAP_TOL,
    ) -> xr.DataArray:
        """Resample an image from one space onto a grid of the other, lazily for dask-backed images.

        Parameters
        ----------
        image
            ``(C, ny, nx)`` / ``(ny, nx)`` / ``(ny, nx, 3)`` numpy or dask array, ``(c, y, x)`` DataArray
            (numpy- or dask-backed), or a multiscale image (``xarray.DataTree`` of ``scale0``,
            ``scale1``, ... as spatialdata stores them). For ``"forward"`` it lives in source space,
            for ``"inverse"`` in target space.
        x, y
            Pixel-centre coordinates of the (finest level of the) image, in the registration's units
            (default: its DataArray coordinates, else pixel units ``j + 0.5``).
        direction
            ``"forward"``: source image → target grid; ``"inverse"``: target image → source grid.
        out_x, out_y
            Pixel-centre coordinates of the output grid. Default: the fit's target extent for
            ``"forward"`` (its source extent for ``"inverse"``) at the image's native resolution, i.e.
            its pixel size times the affine's scale.
        fill
            Value outside the image (``np.nan`` allowed for float outputs).
        dtype
            Output dtype; default the image's (integer images are rounded back into their dtype,
            never rescaled).
        level
            Pyramid level to read from a multiscale image; default the coarsest whose pixels are no
            larger than the output's (level 0 at native resolution). Logged.
        chunk
            Output block size (pixels per side): the dask chunk of a lazy result, and the unit of
            work in memory.
        map_step, map_tol
            The coordinate map is evaluated exactly every ``map_step`` output pixels and interpolated
            bilinearly in between; default: the coarsest lattice whose measured error is at most
            ``map_tol`` input pixels (logged). ``map_step=1`` evaluates every pixel.

        Returns
        -------
        ``(c, y, x)`` DataArray on the output grid (bilinear interpolation). Dask-backed when the image
        is: then nothing is computed yet, each output chunk reads only the input window it needs
        (see :mod:`spatialdata_align.registration._warp`), and the result can be written chunk by
        chunk (e.g. ``Image2DModel.parse(..., scale_factors=...)`` then ``sdata.write``).
        """
        _check_direction(direction)
        levels = image_levels(image, x, y, name="image")
        if out_x is None or out_y is None:
            dx = float(levels.x[1] - levels.x[0])
            out_x, out_y = self._default_grid("target" if direction == "forward" else "source", dx)
        grid = Grid.from_coords(out_x, out_y)
        back = "inverse" if direction == "forward" else "forward"
        data = warp_levels(
            levels,
            TransformMap(self, back, levels.to_index),
            grid,
            level=level,
            fill=fill,
            dtype=dtype,
            chunk=chunk,
            map_step=map_step,
            map_tol=map_tol,
        )
        return xr.DataArray(
            data,
            dims=("c", "y", "x"),
            coords={"c": levels.channels, "y": grid.y, "x": grid.x},
            attrs={"units": self.target_units if direction == "forward" else self.source_units},
            name="warped",
        )

    def _default_grid(self, space: str, dx: float) -> tuple[np.ndarray, np.ndarray]:
        extent = self.target_extent if space == "target" else self.source_extent
        if extent is None:
            raise ValueError(f"no default {space} grid is known for this registration: pass out_x and out_y.")
        xmin, xmax, ymin, ymax = extent
        # native resolution: the image's pixel size through the affine's scale (not the fit's coarse grid)
        scale = abs(np.linalg.det(self.affine[:2, :2])) ** 0.5
        step = dx * scale if space == "target" else dx / scale
        nx = max(round((xmax - xmin) / step), 2)
        ny = max(round((ymax - ymin) / step), 2)
        return xmin + (np.arange(nx) + 0.5) * step, ymin + (np.arange(ny) + 0.5) * step

    # ------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A lossless dictionary of numpy arrays and JSON-serialisable values."""
        d: dict[str, Any] = {
            "affine": self.affine.copy(),
            "velocity": None if self.velocity_values is None else self.velocity_values.copy(),
            "xv": None if self.xv is None else np.asarray(self.xv).copy(),
            "yv": None if self.yv is None else np.asarray(self.yv).copy(),
            "energy": {c: self.energy[c].to_numpy().copy() for c in self.energy.columns},
            "params": json.loads(json.dumps(self.params, default=_json_default)),
            "source_units": self.source_units,
            "target_units": self.target_units,
            "source_extent": None if self.source_extent is None else list(map(float, self.source_extent)),
            "target_extent": None if self.target_extent is None else list(map(float, self.target_extent)),
            "contrast": {k: np.asarray(v).copy() for k, v in self.contrast.items()},
            "forward_field": None if self.forward_field is None else self.forward_field.to_dict(),
            "inverse_field": None if self.inverse_field is None else self.inverse_field.to_dict(),
        }
        if self.match_weight is not None:
            d["match_weight"] = {
                "values": self.match_weight.values.copy(),
                "x": self.match_weight.coords["x"].values.copy(),
                "y": self.match_weight.coords["y"].values.copy(),
            }
        else:
            d["match_weight"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        """Inverse of :meth:`to_dict`."""
        mw = d.get("match_weight")
        match_weight = None
        if mw is not None:
            match_weight = xr.DataArray(
                np.asarray(mw["values"]),
                dims=("y", "x"),
                coords={"y": np.asarray(mw["y"]), "x": np.asarray(mw["x"])},
                name="match_weight",
            )
        energy = pd.DataFrame({k: np.asarray(v) for k, v in (d.get("energy") or {}).items()})
        return cls(
            affine=np.asarray(d["affine"]),
            velocity_values=None if d.get("velocity") is None else np.asarray(d["velocity"]),
            xv=None if d.get("xv") is None else np.asarray(d["xv"]),
            yv=None if d.get("yv") is None else np.asarray(d["yv"]),
            energy=energy,
            match_weight=match_weight,
            params=dict(d.get("params") or {}),
            source_units=d.get("source_units", "um"),
            target_units=d.get("target_units", "px"),
            source_extent=None if d.get("source_extent") is None else tuple(d["source_extent"]),
            target_extent=None if d.get("target_extent") is None else tuple(d["target_extent"]),
            contrast={k: np.asarray(v) for k, v in (d.get("contrast") or {}).items()},
            forward_field=d.get("forward_field"),
            inverse_field=d.get("inverse_field"),
        )

    def match_weight_at(self, xy, direction: str = "forward") -> np.ndarray:
        """Interpolate the match weight at points (source points mapped forward by default)."""
        if self.match_weight is None:
            raise ValueError("this registration has no match weight (affine-only fits have none).")
        pts = check_points(xy, "xy")
        if direction == "forward":
            pts = self.transform_points(pts, "forward")
        mw = self.match_weight
        with torch.no_grad():
            val = interp(
                torch.as_tensor(mw.values[None], dtype=torch.float64),
                mw.coords["x"].values,
                mw.coords["y"].values,
                torch.as_tensor(pts),
                padding="zeros",
            )[0].numpy()
        return val

    def __repr__(self) -> str:
        n_it = len(self.energy)
        if self.is_sampled:
            shapes = (self.forward_field.shape, self.inverse_field.shape)
            return (
                f"Registration(affine + displacement fields, {self.source_units} -> {self.target_units}, "
                f"iterations={n_it}, fields={shapes}, spacing={self.forward_field.dx:g})"
            )
        kind = "affine + LDDMM" if self.has_velocity else "affine"
        shape = None if self.velocity_values is None else tuple(self.velocity_values.shape)
        return f"Registration({kind}, {self.source_units} -> {self.target_units}, iterations={n_it}, velocity={shape})"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
