"""Two benchmark-only pair families whose tissue architecture is REAL: a measured cell-density raster.

The six families of ``sda.datasets`` draw their tissue from hand-made models; the engine's defaults were chosen
on some of their seeds. These two take the architecture of real tissue instead, from the rasters in
``../shared/data/stalign_rasters`` (cell densities measured on real sections), and were never looked at when the
defaults were chosen (held out by construction):

* ``breast-arch``: Xenium FFPE human breast cancer, Rep1 (30 µm raster): ducts, tumour nests, stroma;
* ``brain-arch``: Vizgen MERFISH mouse brain, slice 2 replicate 2 (15 µm raster): cortex layers, white matter,
  nuclei.

Everything else is the package's pair builder (``sda.datasets._pairs.build_pair``): real 10x folders, a random
rotation/flip/anisotropy, a non-linear warp, partial overlap (Xenium region inside the tissue, capture area
cutting it), 3-6 landmarks with 8-15 µm click noise. Cells are an inhomogeneous Poisson process on the real
density (upsampled, with a fine random texture below the raster's resolution); cell types follow the local
density (dense: tumour/luminal, medium: immune cells and fibroblasts, sparse: fibroblasts/endothelium); the H&E
is hematoxylin from the density and eosin from its complement; EGFR is an independent smooth random field.
Landmark candidates are density peaks (the centres of dense structures a person would click).

They live in ``benchmarks/`` rather than ``sda.datasets`` because they need the shared data, which a user's
installation does not have. Source: 10x Genomics Xenium FFPE Human Breast Cancer preview data (CC BY 4.0);
Vizgen MERFISH mouse brain data release (slice 2, replicate 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import binary_fill_holes, gaussian_filter, map_coordinates

from spatialdata_align.datasets import _shapes
from spatialdata_align.datasets._he import Raster
from spatialdata_align.datasets._pairs import FamilyModel, build_pair, draw_types, poisson_cells, signed_distance

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stalign_rasters"

_DENSE_MIX = {"tumour": 0.6, "luminal": 0.25, "macrophage": 0.05, "t_cell": 0.1}
_MID_MIX = {"fibroblast": 0.35, "t_cell": 0.25, "b_cell": 0.15, "macrophage": 0.15, "endothelial": 0.1}
_SPARSE_MIX = {"fibroblast": 0.7, "endothelial": 0.2, "macrophage": 0.1}


class _RealArchModel(FamilyModel):
    """A tissue model on a real cell-density raster (subclasses name the raster file)."""

    raster_file = ""
    #: the density level (fraction of the tissue's 95th percentile) that outlines the tissue
    tissue_level = 0.12
    #: correlation length (µm) and strength of the fine random texture added below the raster's resolution
    texture_um = 25.0
    texture_sd = 0.35

    def __init__(self, rng, size_um: float):
        d = np.load(DATA / f"{self.raster_file}.npz")
        dens0 = np.asarray(d["I"], np.float64)[0]
        x0 = np.asarray(d["x"], float)
        step = float(x0[1] - x0[0])  # µm per raster pixel
        sm = gaussian_filter(dens0, 1.0)
        tissue0 = binary_fill_holes(sm > self.tissue_level * np.quantile(sm[sm > 0], 0.95))
        tissue0 = _shapes.largest_component(tissue0)
        rows, cols = np.nonzero(tissue0)
        # the tissue's bounding box (raster pixels), scaled so that its longer side is size_um
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        scale = size_um / (max(r1 - r0, c1 - c0) * step)
        w, h = (c1 - c0) * step * scale, (r1 - r0) * step * scale
        margin = 120.0
        origin, X, Y = self.grid((w, h), margin)
        # real raster pixel (fractional) under every model pixel
        ci = c0 - 0.5 + (X - margin) / (step * scale)
        ri = r0 - 0.5 + (Y - margin) / (step * scale)
        dens = map_coordinates(dens0 * tissue0, [ri, ci], order=1, mode="constant", cval=0.0)
        inside = map_coordinates(tissue0.astype(np.float32), [ri, ci], order=1, mode="constant") > 0.5
        inside = _shapes.largest_component(inside)
        dens = np.clip(dens, 0, None) * inside
        level = np.quantile(dens[inside], 0.95)
        dnorm = np.clip(dens / level, 0, 1.5).astype(np.float32)
        fine = _shapes.smooth_field(rng, X.shape, self.texture_um / self.raster_um)
        self.sd = Raster(origin, self.raster_um, signed_distance(inside, self.raster_um))
        self.intensity = Raster(origin, self.raster_um, (dnorm * np.exp(self.texture_sd * fine)).astype(np.float32))
        self.dnorm = Raster(origin, self.raster_um, dnorm)
        t = inside.astype(np.float32)
        hema = (0.02 + 0.12 * np.clip(dnorm, 0, 1)) * t
        eosin = (0.26 - 0.13 * np.clip(dnorm, 0, 1)) * t
        stains = np.stack([gaussian_filter(hema, 1.0), gaussian_filter(eosin, 1.0)])
        self.channels = Raster(origin, self.raster_um, stains)
        egfr = _shapes.smooth_field(rng, X.shape, 300.0 / self.raster_um)
        self.egfr_r = Raster(origin, self.raster_um, (1.0 / (1.0 + np.exp(-2.0 * egfr))).astype(np.float32))
        q = np.quantile(dnorm[inside], [1 / 3, 2 / 3])
        self._tertiles = (float(q[0]), float(q[1]))
        # landmark candidates: peaks of the density smoothed at 60 µm, 300 µm apart, away from the edge
        self._cand = _shapes.field_peaks(dnorm, X, Y, self.sd.data > 150, 60.0 / self.raster_um, 300 / self.raster_um)

    def sample_cells(self, rng, density):
        n = rng.poisson(density * self.area_mm2())
        xy = poisson_cells(rng, self.intensity, n)
        v = self.dnorm.sample(xy, order=1)
        lo, hi = self._tertiles
        ty = np.empty(len(xy), np.int64)
        for sel, mix in ((v >= hi, _DENSE_MIX), ((v >= lo) & (v < hi), _MID_MIX), (v < lo, _SPARSE_MIX)):
            ty[sel] = draw_types(rng, mix, int(sel.sum()))
        return xy, ty

    def egfr(self, xy):
        return self.egfr_r.sample(xy, order=1)

    def landmark_candidates(self):
        return self._cand, [f"peak_{i}" for i in range(len(self._cand))]


class BreastArchModel(_RealArchModel):
    """Xenium FFPE human breast cancer Rep1: ducts, tumour nests and stroma (30 µm density raster)."""

    name = "breast-arch"
    raster_file = "Xenium_Breast_Cancer_Rep1"
    default_density = 2500.0
    default_size_mm = 8.0
    deformation = "svf"
    warp_um = 100.0
    warp_length_um = 1500.0
    stain = "normal"
    nucleus_style = "dots"


class BrainArchModel(_RealArchModel):
    """Vizgen MERFISH mouse brain slice 2 replicate 2: cortex layers, white matter, nuclei (15 µm raster)."""

    name = "brain-arch"
    raster_file = "Merfish_S2_R2"
    default_density = 3000.0
    default_size_mm = 6.0
    deformation = "ffd"
    warp_um = 90.0
    warp_length_um = 1200.0
    stain = "pale"
    nucleus_style = "smooth"


MODELS = {m.name: m for m in (BreastArchModel, BrainArchModel)}


def available() -> bool:
    """Whether the shared rasters these families need are present."""
    return all((DATA / f"{m.raster_file}.npz").is_file() for m in MODELS.values())


def realarch_pair(family: str, out_dir, *, seed: int = 0, density: float | None = None, **kwargs):
    """Write one pair of ``family`` (``"breast-arch"`` or ``"brain-arch"``); returns the ``SyntheticPair``."""
    if family not in MODELS:
        raise ValueError(f"unknown real-architecture family {family!r}; choose from {sorted(MODELS)}.")
    if not available():
        raise FileNotFoundError(f"the real rasters are not in {DATA}; these families need ../shared/data.")
    return build_pair(MODELS[family], out_dir, seed=seed, density=density, **kwargs)
