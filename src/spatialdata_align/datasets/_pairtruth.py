"""The ground truth shared by every synthetic pair family (and, through an adapter, the twin sections).

A pair's truth is the map from Xenium µm to Visium full-resolution pixels and a mask saying which Xenium
positions have a true counterpart in the Visium tissue. For the families of :mod:`spatialdata_align.datasets`
the map is

``forward(x) = A @ w``, ``w = y + d(y)``, ``y = M_k @ x`` for ``x`` in piece ``k``

* ``M_k``: a rigid motion (tear: a piece pulled away) or a reflection (fold: a flap turned over) of piece
  ``k`` of the section; piece 0 (the rest) stays put. Pieces are sides of wavy lines in the Xenium frame.
* ``d``: a smooth displacement (µm), a cubic B-spline on a regular grid (whatever model generated it).
* ``A``: the affine section µm -> full-res px (rotation, optional flip, anisotropic scale, translation).

:class:`PairTruth` evaluates it both ways, says where a Xenium point lies (:meth:`PairTruth.status`), and scores
predicted positions (:meth:`PairTruth.tre`). :class:`TwinPairTruth` gives the twin sections the same interface.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._truth import _as_points, _json_default

#: files of a family's ``truth/`` folder
PAIR_TRUTH_NPZ = "pair_truth.npz"
PAIR_TRUTH_JSON = "pair_truth.json"
LANDMARKS_CLEAN_CSV = "landmarks_clean.csv"

#: codes of :meth:`PairTruth.status`
STATUS = {
    0: "background",  # no tissue
    1: "valid",  # tissue present in the Visium section: a true counterpart exists
    2: "not_in_visium",  # tissue lost from the Visium section (cut edge)
    3: "missing_piece",  # damage: a piece missing from the Visium section
    4: "fold_flap",  # damage: present but folded over (its image lies on other tissue); not scored
    5: "under_fold",  # valid, but covered by a folded flap in the H&E (doubled tissue)
    6: "tear_piece",  # valid, in a piece pulled away from the rest (tear)
}
VALID_CODES = (1, 5, 6)
_CHUNK = 50_000


# ---------------------------------------------------------------------------------------------- smooth warp
def _bspline_weights(t: np.ndarray, deriv: bool) -> np.ndarray:
    """``(N, 4)`` uniform cubic B-spline weights (or their derivatives in t) at fractional positions ``t``."""
    t2, t3 = t * t, t * t * t
    if not deriv:
        return np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], axis=1) / 6.0
    return np.stack([-((1 - t) ** 2), 3 * t2 - 4 * t, -3 * t2 + 2 * t + 1, t2], axis=1) / 2.0


@dataclass
class SmoothWarp:
    """A smooth displacement field ``d(x)`` (µm): a cubic B-spline on a regular grid, zero beyond it.

    Attributes
    ----------
    origin
        ``(x0, y0)`` µm position of coefficient ``[:, 0, 0]``.
    spacing
        Grid spacing (µm).
    coefs
        ``(2, ny, nx)`` B-spline coefficients (µm) of the x and y displacement.
    """

    origin: np.ndarray
    spacing: float
    coefs: np.ndarray

    @classmethod
    def zero(cls) -> SmoothWarp:
        """No displacement."""
        return cls(np.zeros(2), 1.0, np.zeros((2, 0, 0)))

    @property
    def is_zero(self) -> bool:
        """Whether the field is identically zero."""
        return self.coefs.size == 0 or not np.any(self.coefs)

    def node_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y)`` µm positions of the coefficients, each ``(ny, nx)``."""
        ny, nx = self.coefs.shape[1:]
        return np.meshgrid(self.origin[0] + self.spacing * np.arange(nx), self.origin[1] + self.spacing * np.arange(ny))

    def _eval(self, x: np.ndarray, jac: bool):
        n = len(x)
        d = np.zeros((n, 2))
        J = np.zeros((n, 2, 2)) if jac else None
        if self.is_zero or n == 0:
            return d, J
        ny, nx = self.coefs.shape[1:]
        c = np.pad(self.coefs, ((0, 0), (4, 4), (4, 4)))  # zero beyond the grid
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():  # NaN in, NaN out
            x = np.where(bad[:, None], self.origin, x)
        for lo in range(0, n, _CHUNK):
            sl = slice(lo, lo + _CHUNK)
            u = (x[sl] - self.origin) / self.spacing
            fl = np.floor(u)
            t = u - fl
            # coefficients fl-1 .. fl+2 contribute; far-away points are clamped into the zero padding
            ix = np.clip(fl[:, 0], -3, nx + 1).astype(np.int64) + 3  # padded index of the first of 4
            iy = np.clip(fl[:, 1], -3, ny + 1).astype(np.int64) + 3
            wx, wy = _bspline_weights(t[:, 0], False), _bspline_weights(t[:, 1], False)
            rows = iy[:, None] + np.arange(4)[None]  # (m, 4)
            cols = ix[:, None] + np.arange(4)[None]
            patch = c[:, rows[:, :, None], cols[:, None, :]]  # (2, m, 4, 4)
            d[sl] = np.einsum("cmab,ma,mb->mc", patch, wy, wx)
            if jac:
                dx, dy = _bspline_weights(t[:, 0], True), _bspline_weights(t[:, 1], True)
                J[sl, :, 0] = np.einsum("cmab,ma,mb->mc", patch, wy, dx) / self.spacing
                J[sl, :, 1] = np.einsum("cmab,ma,mb->mc", patch, dy, wx) / self.spacing
        if bad.any():
            d[bad] = np.nan
            if jac:
                J[bad] = np.nan
        return d, J

    def displacement(self, xy) -> np.ndarray:
        """``d(x)`` (µm) at ``(N, 2)`` points (µm)."""
        return self._eval(_as_points(xy, "xy"), False)[0]

    def jacobian(self, xy) -> np.ndarray:
        """``(N, 2, 2)`` Jacobian of ``d`` (``J[:, a, b] = d d_a / d x_b``)."""
        return self._eval(_as_points(xy, "xy"), True)[1]

    def apply(self, xy) -> np.ndarray:
        """``x + d(x)``."""
        x = _as_points(xy, "xy")
        return x + self._eval(x, False)[0]

    def invert(self, w, *, tol: float = 1e-10, max_iter: int = 60) -> np.ndarray:
        """Solve ``x + d(x) = w`` for ``x`` (Newton iterations with the analytic Jacobian)."""
        w = _as_points(w, "w")
        if self.is_zero:
            return w.copy()
        x = w - self._eval(w, False)[0]
        active = np.flatnonzero(np.isfinite(w).all(axis=1))  # NaN stays NaN
        for _ in range(max_iter):
            d, J = self._eval(x[active], True)
            r = x[active] + d - w[active]
            done = np.abs(r).max(axis=1) < tol
            J[:, 0, 0] += 1.0
            J[:, 1, 1] += 1.0
            step = np.linalg.solve(J[~done], r[~done][..., None])[..., 0]
            active = active[~done]
            # damped step: never more than a tenth of the grid spacing per iteration far from the solution
            norm = np.linalg.norm(step, axis=1, keepdims=True)
            x[active] -= step * np.minimum(1.0, 0.5 * self.spacing / np.maximum(norm, 1e-300))
            if active.size == 0:
                break
        else:
            r = self.apply(x[active]) - w[active]
            if np.abs(r).max() > 1e3 * tol:
                raise RuntimeError(
                    f"warp inverse did not converge for {active.size} points ({np.abs(r).max():.3g} µm)."
                )
        return x

    def max_displacement(self, xy) -> float:
        """Largest ``|d|`` (µm) over points ``xy``."""
        d = self.displacement(xy)
        return float(np.linalg.norm(d, axis=1).max()) if len(d) else 0.0

    def jacobian_det_min(self, xy) -> float:
        """Smallest Jacobian determinant of ``x + d(x)`` over points ``xy`` (must stay > 0)."""
        J = self.jacobian(xy)
        if len(J) == 0:
            return 1.0
        return float(((1 + J[:, 0, 0]) * (1 + J[:, 1, 1]) - J[:, 0, 1] * J[:, 1, 0]).min())


# ---------------------------------------------------------------------------------------------- pieces
@dataclass
class Piece:
    """A piece of the section on one side of a (wavy) line, moved rigidly or folded over.

    A Xenium point ``x`` is in the piece when ``n . x - offset - wave(t) > 0``, with ``t = n_perp . x`` and
    ``wave(t) = sum_i amp[i] * sin(t / length[i] + phase[i])``. Later pieces take precedence.

    Attributes
    ----------
    kind
        ``"tear"`` (rigid motion pulling the piece away) or ``"fold"`` (reflection across the line).
    normal, offset, amp, length, phase
        The line (µm).
    matrix
        ``(3, 3)`` motion of the piece in the Xenium frame (applied before the smooth warp).
    """

    kind: str
    normal: np.ndarray
    offset: float
    amp: np.ndarray
    length: np.ndarray
    phase: np.ndarray
    matrix: np.ndarray

    def side(self, xy: np.ndarray) -> np.ndarray:
        """Signed distance-like value (µm), positive inside the piece."""
        n = self.normal
        t = -n[1] * xy[:, 0] + n[0] * xy[:, 1]
        wave = np.zeros(len(xy))
        for a, ln, ph in zip(self.amp, self.length, self.phase, strict=True):
            wave += a * np.sin(t / ln + ph)
        return xy @ n - self.offset - wave

    def to_row(self) -> np.ndarray:
        """Flat float row (for ``np.savez``)."""
        return np.concatenate(
            [self.normal, [self.offset], self.amp, self.length, self.phase, self.matrix.ravel()]
        ).astype(float)

    @classmethod
    def from_row(cls, kind: str, row: np.ndarray) -> Piece:
        """Inverse of :meth:`to_row` (two wave terms)."""
        return cls(kind, row[0:2], float(row[2]), row[3:5], row[5:7], row[7:9], row[9:18].reshape(3, 3))


def _apply_h(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


# ---------------------------------------------------------------------------------------------- interface
class PairTruthBase:
    """Interface shared by :class:`PairTruth` and :class:`TwinPairTruth` (score any pair the same way).

    Subclasses provide ``forward``, ``inverse``, ``status``, ``um_per_px`` and the landmarks.
    """

    um_per_px: float
    family: str
    landmarks_source: np.ndarray
    landmarks_target: np.ndarray
    landmarks_target_noisy: np.ndarray
    landmark_names: list[str]

    def forward(self, xy_um) -> np.ndarray:  # pragma: no cover - abstract
        """Map ``(N, 2)`` Xenium µm to Visium full-resolution pixels (x, y)."""
        raise NotImplementedError

    def inverse(self, xy_px) -> np.ndarray:  # pragma: no cover - abstract
        """Map ``(N, 2)`` Visium full-resolution pixels to Xenium µm (NaN where no tissue maps there)."""
        raise NotImplementedError

    def status(self, xy_um) -> np.ndarray:  # pragma: no cover - abstract
        """Per point code of :data:`STATUS`."""
        raise NotImplementedError

    def valid(self, xy_um) -> np.ndarray:
        """Boolean: Xenium points (µm) with a true counterpart in the Visium tissue (the ones to score)."""
        return np.isin(self.status(xy_um), VALID_CODES)

    def tre(self, xy_um, predicted_px) -> np.ndarray:
        """Per point registration error (µm): ``|predicted - forward(x)| * um_per_px``; NaN where not :meth:`valid`."""
        xy = _as_points(xy_um, "xy_um")
        pred = _as_points(predicted_px, "predicted_px")
        if len(pred) != len(xy):
            raise ValueError(f"predicted_px has {len(pred)} points, xy_um {len(xy)}.")
        err = np.linalg.norm(pred - self.forward(xy), axis=1) * self.um_per_px
        err[~self.valid(xy)] = np.nan
        return err

    def score(self, xy_um, predicted_px) -> dict[str, float]:
        """Median, 95th percentile and mean TRE (µm) over the valid points, and how many were scored."""
        e = self.tre(xy_um, predicted_px)
        e = e[np.isfinite(e)]
        if e.size == 0:
            return {"median": np.nan, "p95": np.nan, "mean": np.nan, "n": 0}
        return {
            "median": float(np.median(e)),
            "p95": float(np.percentile(e, 95)),
            "mean": float(e.mean()),
            "n": int(e.size),
        }


@dataclass
class PairTruth(PairTruthBase):
    """Ground truth of a synthetic pair family: the map both ways, the validity mask and the landmarks.

    Attributes
    ----------
    family
        Name of the family that generated the pair.
    affine
        ``(3, 3)`` section µm -> Visium full-resolution px (rotation, flip, anisotropic scale, translation).
    warp
        :class:`SmoothWarp`: the non-linear displacement ``d`` (µm).
    pieces
        :class:`Piece` list (tear / fold), empty for undamaged sections.
    um_per_px
        µm per full-resolution pixel (``55 / spot_diameter_fullres``).
    status_origin, status_spacing, status_grid
        The :data:`STATUS` codes rasterised over the Xenium frame: pixel ``[i, j]`` has its centre at
        ``origin + spacing * (j, i)`` µm.
    slide_affine, capture_area
        Visium slide µm -> full-res px; ``(xmin, xmax, ymin, ymax)`` of the capture area (slide µm).
    landmarks_source, landmarks_target, landmarks_target_noisy, landmark_names
        Landmarks: ``(L, 2)`` µm, their exact images ``forward(source)`` (px) and the clicked positions with
        noise (px, what ``truth/landmarks.csv`` holds).
    landmark_noise_um
        The click error of each landmark (µm).
    seed, params
        Seed and generation parameters.
    """

    family: str
    affine: np.ndarray
    warp: SmoothWarp
    pieces: list[Piece]
    um_per_px: float
    status_origin: np.ndarray
    status_spacing: float
    status_grid: np.ndarray
    slide_affine: np.ndarray = field(default_factory=lambda: np.eye(3))
    capture_area: np.ndarray = field(default_factory=lambda: np.array([-np.inf, np.inf, -np.inf, np.inf]))
    landmarks_source: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    landmarks_target: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    landmarks_target_noisy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    landmark_names: list[str] = field(default_factory=list)
    landmark_noise_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ the map
    def piece_of(self, xy_um) -> np.ndarray:
        """Index of the piece (0: the undamaged rest, ``k``: ``pieces[k - 1]``) of Xenium points (µm)."""
        x = _as_points(xy_um, "xy_um")
        k = np.zeros(len(x), np.int64)
        for i, p in enumerate(self.pieces):
            k[p.side(x) > 0] = i + 1
        return k

    def _motions(self) -> list[np.ndarray]:
        return [np.eye(3)] + [p.matrix for p in self.pieces]

    def to_section(self, xy_um) -> np.ndarray:
        """Xenium µm -> section µm (pieces moved, then the smooth warp): ``w`` in the module docstring."""
        x = _as_points(xy_um, "xy_um")
        y = x.copy()
        k = self.piece_of(x)
        for i, m in enumerate(self._motions()):
            sel = k == i
            if i and sel.any():
                y[sel] = _apply_h(m, x[sel])
        return self.warp.apply(y)

    def forward(self, xy_um) -> np.ndarray:
        """Map ``(N, 2)`` Xenium points (µm) to Visium full-resolution pixels ``(N, 2)``, (x, y) order."""
        return _apply_h(self.affine, self.to_section(xy_um))

    def inverse(self, xy_px, *, layer: str = "bottom") -> np.ndarray:
        """Map ``(N, 2)`` Visium full-resolution pixels back to Xenium µm.

        Parameters
        ----------
        xy_px
            Points (full-res px), (x, y) order.
        layer
            Where pieces overlap (a fold): ``"bottom"`` returns the unmoved tissue (so
            ``inverse(forward(x)) == x`` for every valid ``x``), ``"top"`` the folded flap.

        Returns
        -------
        ``(N, 2)`` µm; NaN where no piece maps there (a tear's gap).
        """
        if layer not in ("bottom", "top"):
            raise ValueError(f"layer must be 'bottom' or 'top', got {layer!r}.")
        return self.preimages(xy_px)[0 if layer == "bottom" else -1]

    def preimages(self, xy_px) -> list[np.ndarray]:
        """``[bottom, top]`` preimages (µm) of full-res pixels where pieces overlap (a fold); NaN in a tear's gap.

        ``bottom`` is the solution in the lowest-numbered piece (the unmoved tissue first), ``top`` in the
        highest; they differ only where a folded flap lies on other tissue.
        """
        px = _as_points(xy_px, "xy_px")
        y = self.warp.invert(_apply_h(np.linalg.inv(self.affine), px))  # moved pieces, before the warp
        bottom = np.full_like(y, np.nan)
        top = np.full_like(y, np.nan)
        for x in self.piece_preimages(y):
            ok = np.isfinite(x[:, 0])
            first = ok & np.isnan(bottom[:, 0])
            bottom[first] = x[first]
            top[ok] = x[ok]
        return [bottom, top]

    def piece_preimages(self, y: np.ndarray) -> list[np.ndarray]:
        """For points ``y`` (µm, pieces moved, before the warp), each piece's preimage; NaN where not in it.

        A moved piece (tear, fold) only counts where it holds tissue (a half-plane's motion is not defined on
        the glass around it); the unmoved rest counts everywhere, as the map extends beyond the tissue.
        """
        out = []
        for i, m in enumerate(self._motions()):
            x = _apply_h(np.linalg.inv(m), y) if i else y.copy()
            bad = self.piece_of(x) != i
            if i:
                bad |= self.status(x) == 0
            x[bad] = np.nan
            out.append(x)
        return out

    def displacement(self, xy_um) -> np.ndarray:
        """Non-affine part ``to_section(x) - x`` (µm): the warp plus the pieces' motions."""
        x = _as_points(xy_um, "xy_um")
        return self.to_section(x) - x

    @property
    def warp_max_um(self) -> float:
        """Largest smooth displacement (µm) over the tissue."""
        return float(self.params.get("warp_max_um", 0.0))

    # ------------------------------------------------------------------ masks
    def status(self, xy_um) -> np.ndarray:
        """Per-point :data:`STATUS` code (nearest pixel of :attr:`status_grid`; 0 outside it)."""
        x = _as_points(xy_um, "xy_um")
        ij = np.rint((x - self.status_origin) / self.status_spacing).astype(np.int64)
        h, w = self.status_grid.shape
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
        out = np.zeros(len(x), np.uint8)
        out[inside] = self.status_grid[ij[inside, 1], ij[inside, 0]]
        if self.pieces:  # at piece boundaries the exact piece wins over the raster
            k = self.piece_of(x)
            scored = np.isin(out, (1, 4, 5, 6))
            for i, p in enumerate(self.pieces):
                here = scored & (k == i + 1)
                out[here] = 4 if p.kind == "fold" else 6
            base = scored & (k == 0)
            out[base & (out == 4)] = 5  # next to the fold line: under the flap
            out[base & (out == 6)] = 1
        return out

    def to_slide(self, xy_um) -> np.ndarray:
        """Xenium points (µm) -> Visium slide µm (the frame of the regular spot grid)."""
        return _apply_h(np.linalg.inv(self.slide_affine), self.forward(xy_um))

    def in_capture_area(self, xy_um) -> np.ndarray:
        """Boolean: Xenium points (µm) that land inside the Visium capture area."""
        s = self.to_slide(xy_um)
        x0, x1, y0, y1 = self.capture_area
        return (s[:, 0] >= x0) & (s[:, 0] <= x1) & (s[:, 1] >= y0) & (s[:, 1] <= y1)

    # ------------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write ``pair_truth.npz`` and ``pair_truth.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "affine": self.affine,
            "warp_origin": self.warp.origin,
            "warp_spacing": np.float64(self.warp.spacing),
            "warp_coefs": self.warp.coefs,
            "piece_kinds": np.asarray([p.kind for p in self.pieces], dtype=str),
            "piece_rows": np.asarray([p.to_row() for p in self.pieces]).reshape(len(self.pieces), 18),
            "um_per_px": np.float64(self.um_per_px),
            "status_origin": self.status_origin,
            "status_spacing": np.float64(self.status_spacing),
            "status_grid": self.status_grid.astype(np.uint8),
            "slide_affine": self.slide_affine,
            "capture_area": np.asarray(self.capture_area, float),
            "landmarks_source": self.landmarks_source,
            "landmarks_target": self.landmarks_target,
            "landmarks_target_noisy": self.landmarks_target_noisy,
            "landmark_names": np.asarray(self.landmark_names, dtype=str),
            "landmark_noise_um": self.landmark_noise_um,
            "seed": np.int64(-1 if self.seed is None else self.seed),
        }
        np.savez_compressed(directory / PAIR_TRUTH_NPZ, **arrays)
        meta = {
            "description": (
                "Ground truth of a synthetic pair: forward(x_um) = affine @ (y + d(y)), y = M_k @ x for x in piece k "
                "(tear: rigid, fold: reflection), d a cubic B-spline (warp_*); affine maps section um to Visium "
                "full-resolution pixels, (x, y) order. status_grid codes: " + json.dumps(STATUS)
            ),
            "family": self.family,
            "seed": self.seed,
            "um_per_px": float(self.um_per_px),
            "affine": np.asarray(self.affine).tolist(),
            "pieces": [p.kind for p in self.pieces],
            "n_landmarks": len(self.landmark_names),
            "landmark_noise_um": np.asarray(self.landmark_noise_um).tolist(),
            "params": self.params,
        }
        (directory / PAIR_TRUTH_JSON).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        return directory

    @classmethod
    def load(cls, path) -> PairTruth:
        """Rebuild from ``pair_truth.npz`` (the file, its ``truth/`` folder or the pair folder)."""
        path = Path(path)
        cands = [path, path / PAIR_TRUTH_NPZ, path / "truth" / PAIR_TRUTH_NPZ]
        f = next((p for p in cands if p.is_file()), None)
        if f is None:
            raise FileNotFoundError(f"no {PAIR_TRUTH_NPZ} at {path} (looked for {[str(p) for p in cands]}).")
        meta_file = f.parent / PAIR_TRUTH_JSON
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        with np.load(f, allow_pickle=False) as z:
            kinds = [str(k) for k in z["piece_kinds"]]
            seed = int(z["seed"])
            return cls(
                family=str(meta.get("family", "unknown")),
                affine=z["affine"],
                warp=SmoothWarp(z["warp_origin"], float(z["warp_spacing"]), z["warp_coefs"]),
                pieces=[Piece.from_row(k, r) for k, r in zip(kinds, z["piece_rows"], strict=True)],
                um_per_px=float(z["um_per_px"]),
                status_origin=z["status_origin"],
                status_spacing=float(z["status_spacing"]),
                status_grid=z["status_grid"],
                slide_affine=z["slide_affine"],
                capture_area=z["capture_area"],
                landmarks_source=z["landmarks_source"],
                landmarks_target=z["landmarks_target"],
                landmarks_target_noisy=z["landmarks_target_noisy"],
                landmark_names=[str(s) for s in z["landmark_names"]],
                landmark_noise_um=z["landmark_noise_um"],
                seed=None if seed < 0 else seed,
                params=dict(meta.get("params", {})),
            )


class TwinPairTruth(PairTruthBase):
    """:class:`~spatialdata_align.datasets.Truth` of the twin sections behind the :class:`PairTruthBase` interface.

    Valid points are those inside the Visium section's tissue (the twin's H&E shows all of it); the twin's
    landmarks carry no click noise.
    """

    family = "twin"

    def __init__(self, truth):
        self.truth = truth
        self.um_per_px = float(truth.um_per_px)
        self.landmarks_source = np.asarray(truth.landmarks_source, float)
        self.landmarks_target = np.asarray(truth.landmarks_target, float)
        self.landmarks_target_noisy = self.landmarks_target
        self.landmark_names = list(truth.landmark_names)

    def forward(self, xy_um) -> np.ndarray:
        """Map ``(N, 2)`` Xenium µm to Visium full-resolution pixels."""
        return self.truth.forward(xy_um)

    def inverse(self, xy_px) -> np.ndarray:
        """Map ``(N, 2)`` Visium full-resolution pixels to Xenium µm."""
        return self.truth.inverse(xy_px)

    def status(self, xy_um) -> np.ndarray:
        """1 (valid) in the Visium section's tissue, 2 in tissue lost from it, 0 off the tissue."""
        x = _as_points(xy_um, "xy_um")
        tissue = self.truth.tissue
        out = np.where(tissue.tissue_signed_distance(x) > 0, 2, 0).astype(np.uint8)
        out[tissue.section_signed_distance(x, "visium") > 0] = 1
        return out


def load_pair_truth(path) -> PairTruthBase:
    """Load the truth of any synthetic pair folder (a family's or the twin sections') behind one interface.

    Parameters
    ----------
    path
        The pair folder (holding ``xenium/``, ``visium/``, ``truth/``) or its ``truth/`` folder.

    Returns
    -------
    :class:`PairTruth` for the families, :class:`TwinPairTruth` for :func:`twin_sections` output.
    """
    path = Path(path)
    for d in (path, path / "truth"):
        if (d / PAIR_TRUTH_NPZ).is_file():
            return PairTruth.load(d)
        if (d / "truth.npz").is_file():
            from ._truth import Truth

            return TwinPairTruth(Truth.load(d))
    raise FileNotFoundError(f"{path} holds no pair truth ({PAIR_TRUTH_NPZ} or truth.npz, also under truth/).")


def write_landmark_files(directory: Path, truth: PairTruth) -> None:
    """``landmarks.csv`` (noisy clicks, what a user would have) and ``landmarks_clean.csv`` (exact)."""
    from .._landmark_files import write_landmarks_csv

    write_landmarks_csv(
        directory / "landmarks.csv", truth.landmarks_source, truth.landmarks_target_noisy, truth.landmark_names
    )
    write_landmarks_csv(
        directory / LANDMARKS_CLEAN_CSV, truth.landmarks_source, truth.landmarks_target, truth.landmark_names
    )
