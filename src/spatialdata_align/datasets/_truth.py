"""The ground-truth map of the twin sections: Xenium µm -> Visium full-resolution pixels.

``forward(x) = A @ (x + d(x))`` in homogeneous coordinates, where ``d`` is a smooth displacement
(µm, Xenium frame; a sum of Gaussian radial basis functions) and ``A`` the affine (rotation,
optional reflection, anisotropic scale, translation). The inverse solves ``x + d(x) = A^-1 y`` by
Newton iterations with the analytic Jacobian, to ~1e-10 µm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._tissue import TissueModel

TRUTH_DIRNAME = "truth"
TRUTH_NPZ = "truth.npz"
TRUTH_JSON = "truth.json"
LANDMARKS_CSV = "landmarks.csv"
_CHUNK = 20_000


def _as_points(xy, what: str) -> np.ndarray:
    a = np.asarray(xy, dtype=np.float64)
    if a.ndim == 1 and a.size == 2:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what} must be an (N, 2) array of (x, y) points, got shape {a.shape}.")
    return a


@dataclass
class Truth:
    """Ground-truth map from Xenium µm to Visium full-resolution pixels, and the tissue behind it.

    Attributes
    ----------
    affine
        ``(3, 3)`` affine part alone, Xenium µm -> full-res px (homogeneous, ``(x, y, 1)``).
    warp_centres, warp_coefs
        ``(K, 2)`` RBF centres (µm) and displacement coefficients (µm) of the non-linear part.
    warp_sigma
        RBF length scale (µm).
    um_per_px
        µm per Visium full-resolution pixel (``55 / spot_diameter_fullres``).
    landmarks_source, landmarks_target, landmark_names
        Matched landmark pairs at recognisable structures: ``(L, 2)`` µm (Xenium) and ``(L, 2)``
        full-res px (Visium), ``target = forward(source)`` exactly.
    tissue
        The ground-truth :class:`~spatialdata_align.datasets.TissueModel` (fields, EGFR pattern).
    slide_affine
        ``(3, 3)`` Visium slide µm -> full-res px (the imaging part; the spot grid is regular in
        slide µm).
    capture_area
        ``(xmin, xmax, ymin, ymax)`` of the Visium capture area (where spots are) in slide µm.
    seed
        Seed the data were generated with.
    """

    affine: np.ndarray
    warp_centres: np.ndarray
    warp_coefs: np.ndarray
    warp_sigma: float
    um_per_px: float
    landmarks_source: np.ndarray
    landmarks_target: np.ndarray
    landmark_names: list[str]
    tissue: TissueModel | None = None
    slide_affine: np.ndarray = field(default_factory=lambda: np.eye(3))
    capture_area: np.ndarray = field(default_factory=lambda: np.array([-np.inf, np.inf, -np.inf, np.inf]))
    seed: int | None = None

    # ------------------------------------------------------------------ the map
    @property
    def warp_max_um(self) -> float:
        """Largest displacement magnitude (µm) over the tissue's bounding box."""
        if self.tissue is None or len(self.warp_centres) == 0:
            return 0.0
        bbox = self.tissue.bbox()
        g = _bbox_grid(bbox, _grid_step(bbox, self.warp_sigma))
        return float(np.linalg.norm(self.displacement(g), axis=1).max())

    def displacement(self, xy_um) -> np.ndarray:
        """Non-linear displacement ``d(x)`` (µm) at ``(N, 2)`` Xenium points (µm)."""
        x = _as_points(xy_um, "xy_um")
        return self._disp_jac(x, jac=False)[0]

    def _disp_jac(self, x: np.ndarray, jac: bool):
        n = x.shape[0]
        d = np.zeros((n, 2))
        J = np.zeros((n, 2, 2)) if jac else None
        if len(self.warp_centres) == 0:
            return d, J
        s2 = self.warp_sigma**2
        cx, cy = self.warp_centres[:, 0], self.warp_centres[:, 1]
        for lo in range(0, n, _CHUNK):
            sl = slice(lo, lo + _CHUNK)
            dx = x[sl, 0:1] - cx[None]  # (n, K)
            dy = x[sl, 1:2] - cy[None]
            g = np.exp(-(dx * dx + dy * dy) / (2 * s2))
            d[sl] = g @ self.warp_coefs
            if jac:
                # J[i, a, b] = -sum_k coef[k, a] * g[i, k] * diff[i, k, b] / s2
                J[sl, :, 0] = -((g * dx) @ self.warp_coefs) / s2
                J[sl, :, 1] = -((g * dy) @ self.warp_coefs) / s2
        return d, J

    def forward(self, xy_um) -> np.ndarray:
        """Map ``(N, 2)`` Xenium points (µm) to Visium full-resolution pixels ``(N, 2)``, (x, y) order."""
        x = _as_points(xy_um, "xy_um")
        w = x + self._disp_jac(x, jac=False)[0]
        return w @ self.affine[:2, :2].T + self.affine[:2, 2]

    def inverse(self, xy_px, *, tol: float = 1e-10, max_iter: int = 50) -> np.ndarray:
        """Map ``(N, 2)`` Visium full-resolution pixels back to Xenium µm (Newton iterations).

        Parameters
        ----------
        xy_px
            Points in full-res pixels, (x, y) order.
        tol
            Convergence tolerance on the residual ``|x + d(x) - A^-1 y|`` (µm).
        max_iter
            Maximum number of Newton iterations.
        """
        y = _as_points(xy_px, "xy_px")
        z = (y - self.affine[:2, 2]) @ np.linalg.inv(self.affine[:2, :2]).T
        if len(self.warp_centres) == 0:
            return z
        x = z - self.displacement(z)
        active = np.arange(len(x))
        for _ in range(max_iter):
            d, J = self._disp_jac(x[active], jac=True)
            r = x[active] + d - z[active]
            done = np.abs(r).max(axis=1) < tol
            J[:, 0, 0] += 1.0
            J[:, 1, 1] += 1.0
            step = np.linalg.solve(J[~done], r[~done][..., None])[..., 0]
            idx = active[~done]
            x[idx] -= step
            active = idx
            if active.size == 0:
                break
        else:
            r = x[active] + self.displacement(x[active]) - z[active]
            if np.abs(r).max() > 1e3 * tol:
                raise RuntimeError(
                    f"inverse did not converge for {active.size} points (residual {np.abs(r).max():.3g} µm)."
                )
        return x

    def jacobian_det_min(self) -> float:
        """Smallest Jacobian determinant of ``x + d(x)`` over the tissue (must be > 0: invertible)."""
        if self.tissue is None or len(self.warp_centres) == 0:
            return 1.0
        bbox = self.tissue.bbox()
        _, J = self._disp_jac(_bbox_grid(bbox, _grid_step(bbox, self.warp_sigma)), jac=True)
        return float(((1 + J[:, 0, 0]) * (1 + J[:, 1, 1]) - J[:, 0, 1] * J[:, 1, 0]).min())

    def displacement_grid(self, spacing: float = 25.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The displacement sampled on a regular grid over the tissue.

        Returns
        -------
        ``(x (nx,), y (ny,), field (2, ny, nx))``: pixel-centre coordinates (µm) and ``(dx, dy)`` (µm).
        """
        if self.tissue is None:
            raise ValueError("this Truth has no tissue model, so no grid extent; call displacement() on points.")
        xmin, xmax, ymin, ymax = self.tissue.bbox()
        gx = np.arange(xmin, xmax + spacing, spacing)
        gy = np.arange(ymin, ymax + spacing, spacing)
        X, Y = np.meshgrid(gx, gy)
        d = self.displacement(np.column_stack([X.ravel(), Y.ravel()]))
        return gx, gy, d.T.reshape(2, len(gy), len(gx))

    # ------------------------------------------------------------------ tissue shortcuts
    def _need_tissue(self) -> TissueModel:
        if self.tissue is None:
            raise ValueError("this Truth carries no tissue model.")
        return self.tissue

    def egfr_pattern(self, xy_um) -> np.ndarray:
        """The known EGFR field in ``[0, 1]`` at ``(N, 2)`` Xenium points (µm); see :meth:`TissueModel.egfr_pattern`."""
        return self._need_tissue().egfr_pattern(_as_points(xy_um, "xy_um"))

    def to_slide(self, xy_um) -> np.ndarray:
        """Map Xenium points (µm) to Visium slide µm (the frame of the regular spot grid)."""
        px = self.forward(xy_um)
        return (px - self.slide_affine[:2, 2]) @ np.linalg.inv(self.slide_affine[:2, :2]).T

    def in_capture_area(self, xy_um) -> np.ndarray:
        """Boolean: Xenium points (µm) that land inside the Visium capture area."""
        s = self.to_slide(xy_um)
        x0, x1, y0, y1 = self.capture_area
        return (s[:, 0] >= x0) & (s[:, 0] <= x1) & (s[:, 1] >= y0) & (s[:, 1] <= y1)

    def shared(self, xy_um) -> np.ndarray:
        """Boolean: Xenium points (µm) in the tissue of both sections and inside the capture area."""
        xy = _as_points(xy_um, "xy_um")
        return self._need_tissue().shared(xy) & self.in_capture_area(xy)

    # ------------------------------------------------------------------ files
    def save(self, directory, extra: dict | None = None) -> Path:
        """Write ``truth.npz`` (arrays, displacement grid, tissue) and ``truth.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "affine": self.affine,
            "slide_affine": self.slide_affine,
            "capture_area": np.asarray(self.capture_area, dtype=float),
            "warp_centres": self.warp_centres,
            "warp_coefs": self.warp_coefs,
            "warp_sigma": np.float64(self.warp_sigma),
            "um_per_px": np.float64(self.um_per_px),
            "landmarks_source": self.landmarks_source,
            "landmarks_target": self.landmarks_target,
            "landmark_names": np.asarray(self.landmark_names, dtype=str),
            "seed": np.int64(-1 if self.seed is None else self.seed),
        }
        if self.tissue is not None:
            gx, gy, fld = self.displacement_grid()
            arrays.update({"grid_x": gx, "grid_y": gy, "displacement": fld})
            arrays.update(self.tissue.to_arrays())
        np.savez_compressed(directory / TRUTH_NPZ, **arrays)
        meta = {
            "description": (
                "Ground truth of synthetic twin sections: forward(x_um) = affine @ (x + d(x)), "
                "d(x) = sum_k warp_coefs[k] * exp(-|x - warp_centres[k]|^2 / (2 warp_sigma^2)); "
                "affine maps Xenium um to Visium full-resolution pixels (x, y order)."
            ),
            "affine": np.asarray(self.affine).tolist(),
            "um_per_px": float(self.um_per_px),
            "warp_sigma_um": float(self.warp_sigma),
            "warp_max_um": self.warp_max_um,
            "n_landmarks": len(self.landmark_names),
            "seed": self.seed,
        }
        if extra:
            meta.update(extra)
        (directory / TRUTH_JSON).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        return directory

    @classmethod
    def load(cls, path) -> Truth:
        """Rebuild a :class:`Truth` from ``truth.npz`` (a file, its folder, or the twin-section folder)."""
        path = Path(path)
        candidates = [path, path / TRUTH_NPZ, path / TRUTH_DIRNAME / TRUTH_NPZ]
        f = next((p for p in candidates if p.is_file()), None)
        if f is None:
            raise FileNotFoundError(f"no {TRUTH_NPZ} found at {path} (looked for {[str(p) for p in candidates]}).")
        with np.load(f, allow_pickle=False) as z:
            seed = int(z["seed"])
            tissue = TissueModel.from_arrays(z) if "tissue_outline_centre" in z.files else None
            return cls(
                affine=z["affine"],
                warp_centres=z["warp_centres"],
                warp_coefs=z["warp_coefs"],
                warp_sigma=float(z["warp_sigma"]),
                um_per_px=float(z["um_per_px"]),
                landmarks_source=z["landmarks_source"],
                landmarks_target=z["landmarks_target"],
                landmark_names=[str(s) for s in z["landmark_names"]],
                tissue=tissue,
                slide_affine=z["slide_affine"],
                capture_area=z["capture_area"],
                seed=None if seed < 0 else seed,
            )


def load_truth(path) -> Truth:
    """Load the ground truth written by :func:`~spatialdata_align.datasets.twin_sections`.

    Parameters
    ----------
    path
        The twin-section output folder, its ``truth/`` folder, or ``truth.npz`` itself.
    """
    return Truth.load(path)


def _grid_step(bbox, length: float) -> float:
    """Spacing (µm) of the grids used to measure the warp: fine against its length scale, at most ~250k points."""
    xmin, xmax, ymin, ymax = bbox
    return max(length / 12.0, float(np.sqrt((xmax - xmin) * (ymax - ymin) / 250_000)))


def _bbox_grid(bbox, spacing: float) -> np.ndarray:
    xmin, xmax, ymin, ymax = bbox
    X, Y = np.meshgrid(np.arange(xmin, xmax + spacing, spacing), np.arange(ymin, ymax + spacing, spacing))
    return np.column_stack([X.ravel(), Y.ravel()])


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (Path, pd.Timestamp)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def make_warp(rng: np.random.Generator, bbox, magnitude: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw an RBF displacement over ``bbox`` whose largest magnitude over the box is ``magnitude`` (µm).

    Returns ``(centres (K, 2), coefs (K, 2))``; ``magnitude == 0`` gives no centres (a pure affine).
    """
    if magnitude < 0 or not np.isfinite(magnitude):
        raise ValueError(f"warp must be a finite displacement >= 0 (µm), got {magnitude!r}.")
    if not length > 0:
        raise ValueError(f"warp_length must be > 0 (µm), got {length!r}.")
    if magnitude == 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    xmin, xmax, ymin, ymax = bbox
    step = 1.5 * length
    gx = np.arange(xmin - step / 2, xmax + step, step)
    gy = np.arange(ymin - step / 2, ymax + step, step)
    X, Y = np.meshgrid(gx, gy)
    centres = np.column_stack([X.ravel(), Y.ravel()]) + rng.uniform(-0.25, 0.25, (X.size, 2)) * step
    coefs = rng.normal(size=centres.shape)
    t = Truth(np.eye(3), centres, coefs, length, 1.0, np.zeros((0, 2)), np.zeros((0, 2)), [])
    m = np.linalg.norm(t.displacement(_bbox_grid(bbox, _grid_step(bbox, length))), axis=1).max()
    return centres, coefs * (magnitude / m)
