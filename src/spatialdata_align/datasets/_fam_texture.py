"""Family ``texture``: tissue whose architecture is a random field (a Turing-like labyrinth).

The outline is a level set of a smooth Gaussian random field; inside, a band-pass random field draws a
labyrinth of tumour-rich ridges and stroma-rich valleys, and cells are a log-Gaussian Cox process on it
(intensity ``exp(0.9 f)``), so there are no discrete structures, only texture at one scale. H&E:
Beer-Lambert, hematoxylin as a smooth density (nuclei not resolved) over a diffuse field-driven stain,
eosin complementary; a colour cast by default. Deformation: what a microtome does (a bow, a compression
gradient along the cut, chatter bands). EGFR: an independent smooth random field.
"""

from __future__ import annotations

import numpy as np

from . import _shapes
from ._he import Raster
from ._pairs import FamilyModel, draw_types, poisson_cells, signed_distance

_RIDGE_MIX = {"tumour": 0.8, "macrophage": 0.1, "t_cell": 0.1}
_VALLEY_MIX = {"fibroblast": 0.7, "endothelial": 0.1, "t_cell": 0.1, "b_cell": 0.1}


class TextureModel(FamilyModel):
    """Tissue model of the ``texture`` family (see module docstring)."""

    name = "texture"
    default_density = 3000.0
    default_size_mm = 3.5
    deformation = "microtome"
    warp_um = 80.0
    warp_length_um = 450.0
    stain = "cast"
    nucleus_style = "smooth"
    nucleus_od = 0.9

    def __init__(self, rng, size_um: float):
        w, h = size_um, size_um * rng.uniform(0.75, 0.95)
        origin, X, Y = self.grid((w, h))
        c0 = np.array([w / 2 + 120, h / 2 + 120])
        env = ((X - c0[0]) / (0.5 * w)) ** 2 + ((Y - c0[1]) / (0.5 * h)) ** 2
        low = _shapes.smooth_field(rng, X.shape, 0.12 * size_um / self.raster_um)
        tissue = (1.0 - env + 0.35 * low) > 0.25
        tissue = _shapes.largest_component(tissue)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        period = rng.uniform(120, 200)  # µm, labyrinth wavelength
        f = _shapes.grf(rng, X.shape, period / (2 * np.pi) / self.raster_um * 1.6, band=2.0)
        self.field = Raster(origin, self.raster_um, f.astype(np.float32))
        t = tissue.astype(np.float32)
        self.intensity = Raster(origin, self.raster_um, (np.exp(0.9 * f) * t).astype(np.float32))
        ridge = 1.0 / (1.0 + np.exp(-2.5 * f))
        hema = (0.03 + 0.10 * ridge) * t
        eosin = (0.28 - 0.14 * ridge) * t
        self.channels = Raster(origin, self.raster_um, np.stack([hema, eosin]).astype(np.float32))
        self.egfr_r = Raster(
            origin,
            self.raster_um,
            (1.0 / (1.0 + np.exp(-2.0 * _shapes.smooth_field(rng, X.shape, 300.0 / self.raster_um)))).astype(
                np.float32
            ),
        )
        # landmark candidates: centres of the largest smooth "hills" of the field (recognisable blobs)
        self._cand = _shapes.field_peaks(f, X, Y, sd > 100, 60.0 / self.raster_um, 250 / self.raster_um)

    def sample_cells(self, rng, density):
        n = rng.poisson(density * self.area_mm2())
        xy = poisson_cells(rng, self.intensity, n)
        f = self.field.sample(xy, order=1)
        p_ridge = 1.0 / (1.0 + np.exp(-3.0 * f))
        ridge = rng.uniform(size=len(xy)) < p_ridge
        ty = np.empty(len(xy), np.int64)
        ty[ridge] = draw_types(rng, _RIDGE_MIX, int(ridge.sum()))
        ty[~ridge] = draw_types(rng, _VALLEY_MIX, int((~ridge).sum()))
        return xy, ty

    def egfr(self, xy):
        return self.egfr_r.sample(xy, order=1)

    def landmark_candidates(self):
        return self._cand, [f"hill_{i}" for i in range(len(self._cand))]
