"""Family ``adipose``: sparse fatty tissue (<= 1000 cells/mm²) with fibrous septa and lymphoid follicles.

Lobules of adipocytes (Voronoi cells of blue-noise centres, ~60-110 µm across, empty inside) whose thin
membranes carry one flattened nucleus each; fibrous septa with fibroblasts and vessels; a few dense
lymphoid follicles. Most of the area holds no cell at all, so the density image is sparse and the
membrane net is the H&E's main texture. H&E: Beer-Lambert, nuclei drawn as rings (chromatin rim), uneven
illumination by default. Deformation: a composition of a few local twists (vortices). EGFR: rises with the
distance from a point outside the tissue.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, zoom
from scipy.spatial import cKDTree

from . import _shapes
from ._he import Raster
from ._pairs import FamilyModel, draw_types, poisson_cells, signed_distance, type_codes

_SEPTA_MIX = {"fibroblast": 0.65, "endothelial": 0.2, "macrophage": 0.1, "t_cell": 0.05}
_FOLLICLE_MIX = {"b_cell": 0.65, "t_cell": 0.3, "macrophage": 0.05}
#: cell densities (cells/mm²) of the components at the family's default density
_SEPTA_RHO, _FOLLICLE_RHO = 2500.0, 9000.0


class AdiposeModel(FamilyModel):
    """Tissue model of the ``adipose`` family (see module docstring)."""

    name = "adipose"
    default_density = 700.0
    default_size_mm = 4.0
    deformation = "vortex"
    warp_um = 90.0
    warp_length_um = 600.0
    stain = "uneven"
    nucleus_style = "rings"
    nucleus_od = 1.0
    raster_um = 2.5

    def __init__(self, rng, size_um: float):
        w, h = size_um, size_um * rng.uniform(0.7, 0.9)
        origin, X, Y = self.grid((w, h))
        c0 = np.array([w / 2 + 120, h / 2 + 120])
        tissue = np.zeros(X.shape, bool)
        for _ in range(int(rng.integers(3, 5))):
            ax = np.array([rng.uniform(0.25, 0.4) * w, rng.uniform(0.25, 0.4) * h])
            c = c0 + rng.uniform(-0.5, 0.5, 2) * (np.array([w, h]) / 2 - ax.max())
            _shapes.paint_ellipse(tissue, X, Y, c, ax, rng.uniform(0, np.pi))
        tissue = gaussian_filter(tissue.astype(np.float32), 20.0 / self.raster_um) > 0.5
        tissue = _shapes.largest_component(tissue)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        bbox = self.bbox()
        # septa: smooth random walks, 15-35 µm wide
        septa = np.zeros(X.shape, bool)
        self.septa_paths = []
        inside = np.flatnonzero((sd > 200).ravel())
        for _ in range(int(rng.integers(3, 6))):
            k = inside[rng.integers(inside.size)]
            path, _ = _shapes.paint_walk(rng, septa, X, Y, (X.flat[k], Y.flat[k]), (8, 18), (40, 80), 20.0, 0.12)
            self.septa_paths.append(path)
        # follicles
        follicle = np.zeros(X.shape, bool)
        self.follicles = []
        for _ in range(int(rng.integers(2, 4))):
            k = inside[rng.integers(inside.size)]
            c = np.array([X.flat[k], Y.flat[k]])
            r = rng.uniform(140, 240)
            if any(np.linalg.norm(c - f[0]) < r + f[1] + 100 for f in self.follicles):
                continue
            self.follicles.append((c, r))
            _shapes.paint_ellipse(follicle, X, Y, c, (r, r * rng.uniform(0.8, 1.0)), rng.uniform(0, np.pi))
        septa &= tissue & ~follicle
        follicle &= tissue
        self.septa, self.follicle = septa, follicle
        # adipocytes: blue-noise centres; membranes where the two nearest centres are equidistant
        self.centres = _shapes.poisson_disc(rng, (bbox[0] - 60, bbox[1] + 60, bbox[2] - 60, bbox[3] + 60), 75.0)
        tree = cKDTree(self.centres)
        sub = 2
        q = np.column_stack([X[::sub, ::sub].ravel(), Y[::sub, ::sub].ravel()])
        d, _ = tree.query(q, k=2)
        gap = (d[:, 1] - d[:, 0]).reshape(X[::sub, ::sub].shape)
        gap = zoom(gap, (X.shape[0] / gap.shape[0], X.shape[1] / gap.shape[1]), order=1)[: X.shape[0], : X.shape[1]]
        membrane = (gap < 4.5) & tissue & ~septa & ~follicle
        self.membrane = membrane
        self.fat = tissue & ~septa & ~follicle
        t = tissue.astype(np.float32)
        angle = _shapes.smooth_field(rng, X.shape, 150.0 / self.raster_um) + rng.uniform(0, np.pi)
        fib = _shapes.fibres(rng, X.shape, self.raster_um, angle, 40.0)
        eosin = np.zeros(X.shape, np.float32)
        eosin[membrane] = 0.45
        eosin[septa] = 0.35 + 0.25 * fib[septa]
        eosin[follicle] = 0.12
        hema = np.zeros(X.shape, np.float32)
        hema[follicle] = 0.18
        hema[septa] = 0.06
        del t
        self.channels = Raster(
            origin, self.raster_um, np.stack([gaussian_filter(hema, 1.0), gaussian_filter(eosin, 0.9)])
        )
        # EGFR: distance from a point outside the tissue
        ang = rng.uniform(0, 2 * np.pi)
        self.egfr_origin = c0 + 0.9 * max(w, h) * np.array([np.cos(ang), np.sin(ang)])
        dist = np.hypot(X[tissue] - self.egfr_origin[0], Y[tissue] - self.egfr_origin[1])
        self.egfr_mid, self.egfr_w = float(np.median(dist)), float(dist.std() / 1.5)

    def _natural(self) -> tuple[float, float, float]:
        a = self.raster_um**2 / 1e6
        n_adipo = float(self.fat.sum()) * a / (np.pi * 40.0**2 / 1e6)
        return n_adipo, _SEPTA_RHO * float(self.septa.sum()) * a, _FOLLICLE_RHO * float(self.follicle.sum()) * a

    def sample_cells(self, rng, density):
        parts = self._natural()
        scale = density * self.area_mm2() / max(sum(parts), 1.0)
        n_a, n_s, n_f = (rng.poisson(scale * p) for p in parts)
        memb = Raster(self.sd.origin, self.raster_um, self.membrane.astype(np.float32))
        sep = Raster(self.sd.origin, self.raster_um, self.septa.astype(np.float32))
        fol = Raster(self.sd.origin, self.raster_um, self.follicle.astype(np.float32))
        xy = [poisson_cells(rng, memb, n_a), poisson_cells(rng, sep, n_s), poisson_cells(rng, fol, n_f)]
        ty = [
            type_codes(["fibroblast"] * n_a),
            draw_types(rng, _SEPTA_MIX, n_s),
            draw_types(rng, _FOLLICLE_MIX, n_f),
        ]
        return np.vstack(xy), np.concatenate(ty)

    def egfr(self, xy):
        d = np.hypot(xy[:, 0] - self.egfr_origin[0], xy[:, 1] - self.egfr_origin[1])
        return 1.0 / (1.0 + np.exp(-(d - self.egfr_mid) / self.egfr_w))

    def landmark_candidates(self):
        pts = [c for c, _ in self.follicles]
        names = [f"follicle_{i}" for i in range(len(self.follicles))]
        for i, path in enumerate(self.septa_paths):
            for j, f in enumerate((0.3, 0.7)):
                pts.append(path[int(f * (len(path) - 1))])
                names.append(f"septum_{i}_{j}")
        return np.asarray(pts).reshape(-1, 2), names
