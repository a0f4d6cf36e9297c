"""A tiny, fast synthetic image pair with known ground truth for engine unit tests.

Two "sections" sample different points from one blob pattern; the target section is mapped by a
known affine composed with a smooth Gaussian-bump warp and rendered as an H&E-like RGB image.
(The full 10x-format twin sections live in ``spatialdata_align.datasets``.)
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from spatialdata_align.registration import rasterize

ROT_DEG = 30.0
SCALES = (1.6, 1.5)
TRANSLATION = (300.0, 200.0)


def truth_affine(flip: bool = False) -> np.ndarray:
    th = np.radians(ROT_DEG)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = np.eye(3)
    m[:2, :2] = r @ np.diag(SCALES) @ (np.diag([-1.0, 1.0]) if flip else np.eye(2))
    m[:2, 2] = TRANSLATION if not flip else (TRANSLATION[0] + 3500.0, TRANSLATION[1])
    return m


def displacement(x: np.ndarray, warp: float) -> np.ndarray:
    centres = np.array([[700.0, 800.0], [1400.0, 1200.0], [1000.0, 500.0]])
    sig = np.array([350.0, 400.0, 300.0])
    amp = np.array([[1.0, 0.5], [-0.7, 1.0], [0.3, -1.0]]) * warp
    out = np.zeros_like(x)
    for c, s, a in zip(centres, sig, amp, strict=True):
        out += a * np.exp(-((x - c) ** 2).sum(1, keepdims=True) / (2 * s**2))
    return out


class Toy:
    def __init__(self, n: int = 60_000, warp: float = 30.0, flip: bool = False, seed: int = 0, dx: float = 25.0):
        rng = np.random.default_rng(seed)
        L = 2000.0
        centres = rng.uniform(250, L - 250, size=(12, 2))
        rad = rng.uniform(60, 200, size=12)
        m = rng.uniform(0, L, size=(2 * n, 2))
        ang = np.arctan2(m[:, 1] - L / 2, m[:, 0] - L / 2)
        r = np.hypot((m[:, 0] - L / 2) / (0.45 * L), (m[:, 1] - L / 2) / (0.35 * L)) + 0.15 * np.sin(3 * ang)
        parts = [m[r < 1][: n // 2]]
        for c, rr in zip(centres, rad, strict=True):
            parts.append(c + rng.normal(size=(n // 24, 2)) * rr / 2)
        tissue = np.vstack(parts)
        perm = rng.permutation(len(tissue))
        self.src_pts = tissue[perm[: len(perm) // 2]]
        other = tissue[perm[len(perm) // 2 :]]
        self.warp = warp
        self.affine = truth_affine(flip)
        self.source = rasterize(self.src_pts, dx=dx)
        tp = self.forward(other)
        px = dx * 1.55 / 2
        lo = tp.min(0) - 300
        hi = tp.max(0) + 300
        dens = rasterize(tp, dx=px, blur=px, extent=(lo[0], hi[0], lo[1], hi[1]))
        d = np.clip(dens.values[0] / np.quantile(dens.values[0], 0.99), 0, 1.5)
        white = np.array([0.95, 0.95, 0.95])[:, None, None]
        purple = np.array([0.45, 0.2, 0.6])[:, None, None]
        pink = np.array([0.9, 0.6, 0.75])[:, None, None]
        tis = np.clip(4 * d, 0, 1)[None]
        dd = np.clip(d, 0, 1)[None]
        rgb = white * (1 - tis) + tis * (pink * (1 - dd) + purple * dd) + rng.normal(scale=0.03, size=(3, *d.shape))
        self.target = xr.DataArray(
            rgb, dims=("c", "y", "x"), coords={"c": [0, 1, 2], "y": dens.y.values, "x": dens.x.values}
        )
        self.landmarks_src = np.array([[500, 500], [1500, 600], [800, 1500], [1400, 1400]], float)
        self.landmarks_dst = self.forward(self.landmarks_src)

    def forward(self, x: np.ndarray) -> np.ndarray:
        w = x + displacement(x, self.warp)
        return w @ self.affine[:2, :2].T + self.affine[:2, 2]

    def tre(self, pred: np.ndarray) -> np.ndarray:
        """Error of predicted target positions of the source points, in source units (µm)."""
        scale = np.sqrt(abs(np.linalg.det(self.affine[:2, :2])))
        return np.linalg.norm(pred - self.forward(self.src_pts), axis=1) / scale
