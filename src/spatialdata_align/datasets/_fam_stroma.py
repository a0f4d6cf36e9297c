"""Family ``stroma``: low-texture fibrous stroma with a few ducts and tumour nests.

Most of the section is uniform collagen-rich stroma whose cells sit on a jittered lattice (nearly constant
density: a density image carries little information there); a handful of dense structures (ducts with a
lumen and two epithelial layers, small solid tumour nests) are the only anchors. H&E: Beer-Lambert
hematoxylin/eosin, eosin with an oriented fibre texture, nuclei as solid dots; pale staining by default.
Deformation: exponential of a stationary velocity field, ~100 µm over a ~1 mm correlation length (the
large smooth swirl that a density term struggles to see in uniform stroma).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from . import _shapes
from ._he import Raster
from ._pairs import FamilyModel, draw_types, signed_distance, type_codes

_STROMA_MIX = {"fibroblast": 0.8, "endothelial": 0.08, "macrophage": 0.06, "t_cell": 0.06}
_NEST_MIX = {"tumour": 0.92, "t_cell": 0.04, "macrophage": 0.04}
#: structure cell density relative to stroma
_STRUCT_REL = 4.0


class StromaModel(FamilyModel):
    """Tissue model of the ``stroma`` family (see module docstring)."""

    name = "stroma"
    default_density = 2500.0
    default_size_mm = 3.5
    deformation = "svf"
    warp_um = 100.0
    warp_length_um = 1000.0
    stain = "pale"
    nucleus_style = "dots"

    def __init__(self, rng, size_um: float):
        w, h = size_um, size_um * rng.uniform(0.7, 0.85)
        origin, X, Y = self.grid((w, h))
        centre = np.array([w / 2 + 120, h / 2 + 120])
        r = 0.5 * np.sqrt(w * h) * 0.92
        tissue = _shapes.fourier_outline(
            X, Y, centre, r, (w / h) ** 1.0, rng.uniform(-0.2, 0.2), rng.uniform(0.02, 0.07, 4), rng.uniform(0, 6.3, 4)
        )
        tissue = _shapes.largest_component(tissue)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        # ducts (elongated, hollow) and nests (solid), well inside the tissue, apart from each other
        self.ducts, self.nests = [], []
        occupied = np.zeros(tissue.shape, bool)
        free = np.flatnonzero((sd > 150).ravel())
        for kind, n in (("duct", int(rng.integers(3, 6))), ("nest", int(rng.integers(2, 5)))):
            tries = 0
            while len(self.ducts if kind == "duct" else self.nests) < n and tries < 200:
                tries += 1
                k = free[rng.integers(free.size)]
                c = np.array([X.flat[k], Y.flat[k]])
                if kind == "duct":
                    axes = np.array([rng.uniform(150, 260), rng.uniform(40, 60)])
                else:
                    axes = np.array([rng.uniform(60, 120), 0.0])
                    axes[1] = axes[0] * rng.uniform(0.6, 0.95)
                ang = rng.uniform(0, np.pi)
                sl = _shapes.window(X, Y, c, float(max(axes)) + 40)
                outer = _shapes.ellipse(X[sl], Y[sl], c, axes + 40, ang)
                if (occupied[sl] & outer).any() or (sd[sl][outer] < 60).any():
                    continue
                _shapes.paint_ellipse(occupied, X, Y, c, axes, ang)
                (self.ducts if kind == "duct" else self.nests).append((c, axes, ang))
        self.duct_mask = np.zeros(tissue.shape, bool)
        self.lumen_mask = np.zeros(tissue.shape, bool)
        self.nest_mask = np.zeros(tissue.shape, bool)
        for c, ax, an in self.ducts:
            _shapes.paint_ellipse(self.duct_mask, X, Y, c, ax, an)
            _shapes.paint_ellipse(self.lumen_mask, X, Y, c, np.maximum(ax - 22.0, 5.0), an)
        for c, ax, an in self.nests:
            _shapes.paint_ellipse(self.nest_mask, X, Y, c, ax, an)
        epi = self.duct_mask & ~self.lumen_mask
        # stain amounts: eosin of stroma with fibres, paler epithelium, empty lumen; diffuse hematoxylin in nests
        angle = _shapes.smooth_field(rng, X.shape, 200.0 / self.raster_um) * 1.2 + rng.uniform(0, np.pi)
        fib = _shapes.fibres(rng, X.shape, self.raster_um, angle, 30.0)
        t = (sd > 0).astype(np.float32)
        eosin = t * (0.20 + 0.14 * fib)
        eosin[epi] = 0.16
        eosin[self.nest_mask] = 0.17
        eosin[self.lumen_mask] = 0.02
        hema = t * 0.02
        hema[epi] = 0.10
        hema[self.nest_mask] = 0.14
        self.channels = Raster(
            origin, self.raster_um, np.stack([gaussian_filter(hema, 1.0), gaussian_filter(eosin, 0.7)])
        )
        # EGFR: a hot spot (Gaussian bump, ~0.8 mm) somewhere in the tissue
        ins = np.flatnonzero((sd > 300).ravel())
        k = ins[rng.integers(ins.size)] if ins.size else int(np.argmax(sd))
        self.egfr_centre = np.array([X.flat[k], Y.flat[k]])
        self.egfr_width = 0.25 * size_um

    def sample_cells(self, rng, density):
        area_t = self.area_mm2()
        a = self.raster_um**2 / 1e6
        a_struct = float((self.duct_mask & ~self.lumen_mask).sum() + self.nest_mask.sum()) * a
        rho_s = density * area_t / (area_t - a_struct + _STRUCT_REL * a_struct)  # stroma cells / mm²
        bbox = self.bbox()
        # stroma: jittered hexagonal lattice (almost uniform), kept in tissue outside the structures
        lat = _shapes.jittered_lattice(rng, bbox, np.sqrt(2 / (np.sqrt(3) * rho_s)) * 1e3, 0.45)
        struct = self.duct_mask | self.nest_mask
        keep = _shapes.sample_raster_mask(self.sd.data > 0, self.sd.origin, self.raster_um, lat) & ~(
            _shapes.sample_raster_mask(struct, self.sd.origin, self.raster_um, lat)
        )
        xy = [lat[keep]]
        ty = [draw_types(rng, _STROMA_MIX, int(keep.sum()))]
        rho_d = _STRUCT_REL * rho_s / 1e6  # cells / µm²
        # ducts: two rings of epithelium (luminal inside, myoepithelial outside), cells along the rings
        for c, ax, an in self.ducts:
            for frac, kind, share in ((0.35, "luminal", 0.7), (0.85, "myoepithelial", 0.3)):
                axes = ax - 22.0 * (1 - frac)
                perim = np.pi * (3 * (axes[0] + axes[1]) - np.sqrt((3 * axes[0] + axes[1]) * (axes[0] + 3 * axes[1])))
                n = rng.poisson(share * rho_d * 22.0 * perim)
                phi = rng.uniform(0, 2 * np.pi, n)
                u = np.column_stack([axes[0] * np.cos(phi), axes[1] * np.sin(phi)]) + rng.normal(0, 2.0, (n, 2))
                R = np.array([[np.cos(an), -np.sin(an)], [np.sin(an), np.cos(an)]])
                xy.append(c + u @ R.T)
                ty.append(type_codes([kind] * n))
        # nests: dense Poisson
        for c, ax, an in self.nests:
            n = rng.poisson(rho_d * np.pi * ax[0] * ax[1])
            rr = np.sqrt(rng.uniform(0, 1, n))
            phi = rng.uniform(0, 2 * np.pi, n)
            u = np.column_stack([ax[0] * rr * np.cos(phi), ax[1] * rr * np.sin(phi)])
            R = np.array([[np.cos(an), -np.sin(an)], [np.sin(an), np.cos(an)]])
            xy.append(c + u @ R.T)
            ty.append(draw_types(rng, _NEST_MIX, n))
        return np.vstack(xy), np.concatenate(ty)

    def egfr(self, xy):
        d2 = ((xy - self.egfr_centre) ** 2).sum(axis=1)
        return np.exp(-d2 / (2 * self.egfr_width**2))

    def landmark_candidates(self):
        pts, names = [], []
        for i, (c, ax, an) in enumerate(self.ducts):
            d = np.array([np.cos(an), np.sin(an)]) * ax[0] * 0.85
            pts += [c + d, c - d]
            names += [f"duct_{i}_end_a", f"duct_{i}_end_b"]
        for i, (c, _, _) in enumerate(self.nests):
            pts.append(c)
            names.append(f"nest_{i}")
        return np.asarray(pts).reshape(-1, 2), names
