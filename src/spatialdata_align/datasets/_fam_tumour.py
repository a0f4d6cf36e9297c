"""Family ``tumour``: a dense solid tumour sheet with necrotic holes and vessels.

A lobulated lump (a union of overlapping discs) filled with tumour cells packed on jittered hexagonal
lattices whose orientation changes from domain to domain (>= 8000 cells/mm² by default); irregular necrotic
areas hold few cells and pink debris; winding vessels (lumens with blood, lined by endothelial cells) run
through it. H&E: Beer-Lambert with three stains (hematoxylin, eosin, blood), nuclei as solid dots, nuclear
dust in necrosis, dark staining by default. Deformation: a thin-plate spline through random displacements of
a few control points. EGFR: clonal patches (a thresholded smooth random field).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from . import _he, _shapes
from ._he import Raster
from ._pairs import FamilyModel, draw_types, signed_distance, type_codes

_SHEET_MIX = {"tumour": 0.9, "macrophage": 0.04, "t_cell": 0.04, "fibroblast": 0.02}


class TumourModel(FamilyModel):
    """Tissue model of the ``tumour`` family (see module docstring)."""

    name = "tumour"
    default_density = 9000.0
    default_size_mm = 2.5
    deformation = "tps"
    warp_um = 60.0
    warp_length_um = 0.0
    stain = "dark"
    nucleus_style = "dots"
    nucleus_od = 0.75
    channel_names = ("hematoxylin", "eosin", "blood")

    def __init__(self, rng, size_um: float):
        w, h = size_um, size_um * rng.uniform(0.75, 0.95)
        origin, X, Y = self.grid((w, h))
        c0 = np.array([w / 2 + 120, h / 2 + 120])
        tissue = np.zeros(X.shape, bool)
        n_lobes = int(rng.integers(5, 9))
        for _ in range(n_lobes):
            r = rng.uniform(0.22, 0.34) * min(w, h)
            c = c0 + rng.uniform(-0.5, 0.5, 2) * (np.array([w, h]) / 2 - r)
            _shapes.paint_ellipse(tissue, X, Y, c, (r, r * rng.uniform(0.8, 1.0)), rng.uniform(0, np.pi))
        tissue = _shapes.largest_component(tissue)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        # necrosis: thresholded smooth field inside the tissue, 5-12 % of it
        f = _shapes.smooth_field(rng, X.shape, 90.0 / self.raster_um)
        inner = sd > 150
        thr = np.quantile(f[inner], 1 - rng.uniform(0.05, 0.12)) if inner.any() else np.inf
        necrosis = (f > thr) & inner
        # vessels: smooth random walks, lumen radius 6-14 µm
        vessel = np.zeros(X.shape, bool)
        self.vessel_paths = []
        free = np.flatnonzero((sd > 100).ravel())
        for _ in range(int(rng.integers(5, 10))):
            k = free[rng.integers(free.size)]
            path, rad = _shapes.paint_walk(rng, vessel, X, Y, (X.flat[k], Y.flat[k]), (6, 14), (20, 45), 12.0, 0.25)
            self.vessel_paths.append((path, rad))
        vessel &= tissue & ~necrosis
        self.necrosis, self.vessel = necrosis, vessel
        t = tissue.astype(np.float32)
        eosin = 0.16 * t
        eosin[necrosis] = 0.42
        eosin[vessel] = 0.05
        hema = 0.10 * t
        hema[necrosis] = 0.04
        # nuclear dust in necrosis
        dust = (rng.uniform(size=X.shape) < 0.02) & necrosis
        hema = hema + 0.8 * gaussian_filter(dust.astype(np.float32), 0.7)
        blood = np.where(vessel, 0.55, 0.0).astype(np.float32)
        self.channels = Raster(
            origin,
            self.raster_um,
            np.stack([gaussian_filter(hema, 0.8), gaussian_filter(eosin, 0.8), gaussian_filter(blood, 0.8)]),
        )
        self.necrosis_r = Raster(origin, self.raster_um, necrosis.astype(np.float32))
        self.vessel_r = Raster(origin, self.raster_um, vessel.astype(np.float32))
        # EGFR: clonal patches
        g = _shapes.smooth_field(rng, X.shape, 250.0 / self.raster_um)
        self.egfr_r = Raster(origin, self.raster_um, (1.0 / (1.0 + np.exp(-1.8 * g))).astype(np.float32))
        lab_pts = np.column_stack([X[necrosis], Y[necrosis]])
        self._necrosis_pts = lab_pts

    def sample_cells(self, rng, density):
        area = self.area_mm2()
        a = self.raster_um**2 / 1e6
        a_nec = float(self.necrosis.sum()) * a
        a_ves = float(self.vessel.sum()) * a
        rho = density * area / max(area - a_nec - a_ves + 0.05 * a_nec, 1e-6)  # sheet density (cells/mm²)
        bbox = self.bbox()
        # domains of one lattice orientation (Voronoi cells of ~300 µm)
        n_dom = max(3, int(area / 0.09))
        seeds = np.column_stack([rng.uniform(bbox[0], bbox[1], n_dom), rng.uniform(bbox[2], bbox[3], n_dom)])
        spacing = np.sqrt(2 / (np.sqrt(3) * rho)) * 1e3
        xy = []
        c = np.array([(bbox[0] + bbox[1]) / 2, (bbox[2] + bbox[3]) / 2])
        tree = cKDTree(seeds)
        X, Y = self.sd.xy()
        probe = np.column_stack([X[::8, ::8].ravel(), Y[::8, ::8].ravel()])
        probe = probe[self.sd.data[::8, ::8].ravel() > -50]
        _, owner = tree.query(probe)
        reach = np.zeros(n_dom)
        np.maximum.at(reach, owner, np.linalg.norm(probe - seeds[owner], axis=1))
        for i in range(n_dom):
            if reach[i] <= 0:
                continue
            half = reach[i] + 8 * self.raster_um + 2 * spacing
            ang = rng.uniform(0, np.pi / 3)
            lat = _shapes.jittered_lattice(rng, (-half, half, -half, half), spacing, 0.22)
            R = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
            p = seeds[i] + lat @ R.T
            _, own = tree.query(p)
            xy.append(p[own == i])
        del c
        xy = np.vstack(xy)
        inside = self.sd.sample(xy, order=0) > 0
        nec = self.necrosis_r.sample(xy, order=0) > 0.5
        ves = self.vessel_r.sample(xy, order=0) > 0.5
        keep = inside & ~ves & (~nec | (rng.uniform(size=len(xy)) < 0.05))
        xy = xy[keep]
        ty = draw_types(rng, _SHEET_MIX, len(xy))
        ty[nec[keep]] = type_codes(["macrophage"])[0]
        # endothelial cells lining the vessels
        lining = []
        for path, rad in self.vessel_paths:
            seg = np.diff(path, axis=0)
            n_e = max(1, int(np.linalg.norm(seg, axis=1).sum() / 15.0))
            k = rng.integers(0, len(seg), n_e)
            t = rng.uniform(size=n_e)
            p = path[k] + seg[k] * t[:, None]
            nrm = np.column_stack([-seg[k, 1], seg[k, 0]]) / np.linalg.norm(seg[k], axis=1, keepdims=True)
            lining.append(p + nrm * (rad + 3.0) * rng.choice([-1, 1], n_e)[:, None])
        if lining:
            lin = np.vstack(lining)
            lin = lin[self.sd.sample(lin, order=0) > 0]
            xy = np.vstack([xy, lin])
            ty = np.concatenate([ty, type_codes(["endothelial"] * len(lin))])
        return xy, ty

    def egfr(self, xy):
        return self.egfr_r.sample(xy, order=1)

    def landmark_candidates(self):
        from scipy.ndimage import center_of_mass, label

        lab, n = label(self.necrosis)
        pts, names = [], []
        X, Y = self.sd.xy()
        for i, (cy, cx) in enumerate(center_of_mass(self.necrosis, lab, range(1, n + 1))):
            if (lab == i + 1).sum() * self.raster_um**2 > 2000:
                pts.append([X[0, 0] + cx * self.raster_um, Y[0, 0] + cy * self.raster_um])
                names.append(f"necrosis_{i}")
        for i, (path, _) in enumerate(self.vessel_paths):
            pts.append(path[len(path) // 2])
            names.append(f"vessel_{i}")
        return np.asarray(pts).reshape(-1, 2), names

    def colourise(self, amounts, style, rng):
        return _he.beer_lambert(
            amounts, {"hematoxylin": _he.HEMATOXYLIN, "eosin": _he.EOSIN, "blood": _he.BLOOD}, style, rng
        )
