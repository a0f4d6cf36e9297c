"""Family ``cortex``: a layered, brain-cortex-like band.

The tissue is a curved band (an annulus sector with a wavy surface): six layers parallel to the outer
surface with different cell densities (a sparse molecular layer, dense granular layers, a medium layer of
large cells, a sparse white-matter core), cells modulated in radial minicolumns. Cell types stand in for
neurons/glia (the gene programmes are the shared ones). H&E: an additive colour model (neuropil tint that
changes with depth painted over the glass, then a smooth hematoxylin density: nuclei are not resolved one
by one); colour cast by default. Deformation: a free-form deformation (cubic B-spline over a coarse random
control grid). EGFR: a gradient along the band.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from . import _he
from ._he import Raster
from ._pairs import FamilyModel, draw_types, poisson_cells, signed_distance

#: (depth upper bound, relative density, type mix) from the surface (depth 0) to the white matter (depth 1)
LAYERS = (
    (0.10, 0.25, {"fibroblast": 0.6, "macrophage": 0.4}),
    (0.32, 1.60, {"luminal": 0.8, "fibroblast": 0.15, "endothelial": 0.05}),
    (0.44, 2.10, {"myoepithelial": 0.75, "fibroblast": 0.2, "endothelial": 0.05}),
    (0.62, 0.95, {"tumour": 0.6, "fibroblast": 0.3, "endothelial": 0.1}),
    (0.82, 1.40, {"luminal": 0.5, "myoepithelial": 0.3, "fibroblast": 0.2}),
    (1.01, 0.40, {"fibroblast": 0.7, "macrophage": 0.2, "t_cell": 0.1}),
)
#: neuropil colour amount by layer (0..1) for the additive model
_NEUROPIL = (0.55, 0.42, 0.38, 0.45, 0.42, 0.70)


class CortexModel(FamilyModel):
    """Tissue model of the ``cortex`` family (see module docstring)."""

    name = "cortex"
    default_density = 3500.0
    default_size_mm = 4.0
    deformation = "ffd"
    warp_um = 70.0
    warp_length_um = 650.0
    stain = "cast"
    nucleus_style = "smooth"
    nucleus_od = 1.2
    channel_names = ("hematoxylin", "neuropil", "white_matter")

    def __init__(self, rng, size_um: float):
        span = np.radians(rng.uniform(100, 150))
        thick = size_um * rng.uniform(0.32, 0.4)
        r_out = size_um / (2 * np.sin(span / 2)) if span < np.pi else size_um / 2
        r_out = max(r_out, thick * 1.6)
        r_in = r_out - thick
        a0 = rng.uniform(0, 2 * np.pi)
        # bounding box of the sector, then the grid
        phis = np.linspace(a0 - span / 2, a0 + span / 2, 100)
        ring = np.concatenate([np.column_stack([np.cos(phis), np.sin(phis)]) * r for r in (r_in, r_out)])
        lo, hi = ring.min(0), ring.max(0)
        origin, X, Y = self.grid(tuple(hi - lo))
        self.centre = 120.0 - lo
        dx, dy = X - self.centre[0], Y - self.centre[1]
        r = np.hypot(dx, dy)
        phi = np.arctan2(dy, dx)
        dphi = (phi - a0 + np.pi) % (2 * np.pi) - np.pi
        self.a0, self.span, self.r_in, self.r_out = a0, span, r_in, r_out
        # wavy surface and a wavy white-matter boundary; rounded ends of the sector
        self.w_amp, self.w_k, self.w_ph = rng.uniform(15, 35), int(rng.integers(5, 10)), rng.uniform(0, 6.3)
        r_surf = r_out + self.w_amp * np.sin(self.w_k * dphi / span * np.pi + self.w_ph)
        end = np.abs(dphi) - span / 2
        tissue = (r > r_in) & (r < r_surf) & (end < 0)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        depth = np.clip((r_surf - r) / (r_surf - r_in), 0, 1)
        depth = np.clip(depth + 0.03 * np.sin(3 * dphi / span * np.pi + rng.uniform(0, 6.3)), 0, 1)
        self.depth = Raster(origin, self.raster_um, depth.astype(np.float32))
        self.dphi = Raster(origin, self.raster_um, dphi.astype(np.float32))
        layer = np.searchsorted([lb for lb, _, _ in LAYERS], depth)
        layer = np.minimum(layer, len(LAYERS) - 1)
        rel = np.array([d for _, d, _ in LAYERS])[layer]
        # minicolumns: radial stripes of ~40 µm period in the granular layers
        col = 1.0 + 0.35 * np.sin(2 * np.pi * dphi * r / 40.0) * ((layer >= 1) & (layer <= 4))
        self.intensity = Raster(origin, self.raster_um, (rel * col * tissue).astype(np.float32))
        self.layer = layer
        t = tissue.astype(np.float32)
        neuropil = np.array(_NEUROPIL)[layer] * t
        wm = (layer == len(LAYERS) - 1) * t
        # radial vessels: thin bright lines (less neuropil)
        n_v = int(rng.integers(8, 16))
        for ang in a0 + rng.uniform(-span / 2, span / 2, n_v):
            d_line = np.abs(np.sin(phi - ang)) * r
            vessel = (d_line < 4.0) & (np.cos(phi - ang) > 0) & (depth < rng.uniform(0.4, 0.9))
            neuropil[vessel & tissue] *= 0.3
        hema = 0.04 * t
        self.channels = Raster(
            origin, self.raster_um, np.stack([hema, gaussian_filter(neuropil, 1.0), gaussian_filter(wm, 2.0)])
        )

    def sample_cells(self, rng, density):
        n = rng.poisson(density * self.area_mm2())
        xy = poisson_cells(rng, self.intensity, n)
        depth = self.depth.sample(xy, order=0)
        layer = np.minimum(np.searchsorted([lb for lb, _, _ in LAYERS], depth), len(LAYERS) - 1)
        ty = np.zeros(len(xy), np.int64)
        for i, (_, _, mix) in enumerate(LAYERS):
            sel = layer == i
            ty[sel] = draw_types(rng, mix, int(sel.sum()))
        return xy, ty

    def egfr(self, xy):
        return np.clip(0.5 + self.dphi.sample(xy, order=1, cval=0.0) / self.span, 0, 1)

    def landmark_candidates(self):
        pts, names = [], []
        for frac in (-0.42, -0.2, 0.0, 0.2, 0.42):
            ang = self.a0 + frac * self.span
            for depth, tag in ((0.38, "granular"), (0.9, "white_matter")):
                rr = self.r_out - depth * (self.r_out - self.r_in)
                pts.append(self.centre + rr * np.array([np.cos(ang), np.sin(ang)]))
                names.append(f"{tag}_{frac:+.2f}")
        return np.asarray(pts), names

    def colourise(self, amounts, style, rng):
        colours = {
            "neuropil": np.array([0.93, 0.72, 0.86]),
            "white_matter": np.array([0.97, 0.84, 0.92]),
            "hematoxylin": np.array([0.30, 0.22, 0.55]),
        }
        return _he.additive(amounts, colours, style, ["neuropil", "white_matter", "hematoxylin"])
