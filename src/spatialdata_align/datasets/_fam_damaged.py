"""Family ``damaged``: a gut-wall-like strip whose Visium section is torn, folded and missing a piece.

The tissue is a gently curved strip with layers across its width: mucosa with crypts (rings of epithelial
cells around a lumen, immune cells between), a thin muscularis mucosae, loose submucosa with lymphoid
aggregates, and a dense muscle layer. The Visium section is damaged: a tear across the strip (one part
pulled away by 80-160 µm and turned by a few degrees), a fold (one end turned over onto the tissue next to
it: doubled tissue in the H&E) and a bite missing at an edge. The truth marks the folded flap (not
scorable by any diffeomorphism), the tissue under it, the torn-off part and the missing piece
(:data:`~spatialdata_align.datasets.STATUS`). H&E: additive colour model, nuclei as dots. Deformation:
compactly supported Wendland radial functions. EGFR: a gradient across the wall (high at the surface).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from . import _he, _shapes
from ._he import Raster
from ._pairs import FamilyModel, draw_types, poisson_cells, signed_distance, type_codes
from ._pairtruth import Piece

#: (upper depth, name, relative density, mix) from the mucosal surface (0) to the outer edge (1)
LAYERS = (
    (0.45, "mucosa", 1.4, {"t_cell": 0.35, "b_cell": 0.2, "macrophage": 0.25, "fibroblast": 0.2}),
    (0.50, "muscularis_mucosae", 2.0, {"myoepithelial": 0.8, "fibroblast": 0.2}),
    (0.74, "submucosa", 0.45, {"fibroblast": 0.6, "endothelial": 0.25, "macrophage": 0.15}),
    (1.01, "muscle", 1.5, {"myoepithelial": 0.85, "fibroblast": 0.1, "endothelial": 0.05}),
)


class DamagedModel(FamilyModel):
    """Tissue model of the ``damaged`` family (see module docstring).

    Parameters (``pair_family("damaged", ..., tear=..., fold=..., missing=...)``) switch each kind of damage.
    """

    name = "damaged"
    default_density = 4000.0
    default_size_mm = 4.0
    deformation = "wendland"
    warp_um = 40.0
    warp_length_um = 800.0
    stain = "normal"
    nucleus_style = "dots"
    nucleus_od = 0.8

    def __init__(self, rng, size_um: float, *, tear: bool = True, fold: bool = True, missing: bool = True):
        self.opts = {"tear": bool(tear), "fold": bool(fold), "missing": bool(missing)}
        L = size_um
        W = L * rng.uniform(0.3, 0.38)
        bend = rng.uniform(-0.08, 0.08) / L  # centreline y = bend * (x - L/2)^2
        pad = 0.08 * L * L * abs(bend) + W / 2 + 20
        origin, X, Y = self.grid((L, 2 * pad))
        x0, yc = 120.0, 120.0 + pad
        self.L, self.W, self.bend, self.x0, self.yc = L, W, bend, x0, yc
        s = X - x0
        centre_y = yc + bend * (s - L / 2) ** 2
        t = Y - centre_y  # across (µm, approx.)
        cap = np.minimum(s, L - s)
        tissue = (np.abs(t) < W / 2) & (cap > 0)
        r_end = W / 2
        for sc in (r_end, L - r_end):  # rounded ends
            end = (s < r_end) if sc == r_end else (s > L - r_end)
            tissue &= ~end | (np.hypot(s - sc, t) < r_end)
        tissue = _shapes.largest_component(tissue)
        sd = signed_distance(tissue, self.raster_um)
        self.sd = Raster(origin, self.raster_um, sd)
        self.side = rng.choice([-1.0, 1.0])  # which edge is the mucosal surface
        depth = np.clip((W / 2 - self.side * t) / W, 0, 1)
        self.depth = Raster(origin, self.raster_um, depth.astype(np.float32))
        layer = np.minimum(np.searchsorted([u for u, *_ in LAYERS], depth), len(LAYERS) - 1)
        # crypts in the mucosa: jittered lattice, lumen + epithelial ring
        cand = _shapes.jittered_lattice(rng, (x0, x0 + L, yc - pad, yc + pad), 75.0, 0.15)
        d_c = (W / 2 - self.side * (cand[:, 1] - (yc + bend * (cand[:, 0] - x0 - L / 2) ** 2))) / W
        ok = (d_c > 0.06) & (d_c < 0.4) & (_shapes.sample_raster_mask(sd > 40, origin, self.raster_um, cand))
        self.crypts = cand[ok]
        self.crypt_r = rng.uniform(22, 30, len(self.crypts))
        crypt = np.zeros(X.shape, bool)
        lumen = np.zeros(X.shape, bool)
        for c, r in zip(self.crypts, self.crypt_r, strict=True):
            _shapes.paint_ellipse(crypt, X, Y, c, (r, r), 0.0)
            _shapes.paint_ellipse(lumen, X, Y, c, (9.0, 9.0), 0.0)
        # lymphoid aggregates in the submucosa
        self.aggregates = []
        agg = np.zeros(X.shape, bool)
        for _ in range(int(rng.integers(2, 4))):
            sx = rng.uniform(0.15, 0.85) * L
            dd = rng.uniform(0.55, 0.68)
            c = np.array([x0 + sx, yc + bend * (sx - L / 2) ** 2 + self.side * (W / 2 - dd * W)])
            r = rng.uniform(70, 110)
            self.aggregates.append((c, r))
            _shapes.paint_ellipse(agg, X, Y, c, (r, r * 0.8), rng.uniform(0, np.pi))
        crypt &= tissue
        agg &= tissue & ~crypt
        self.crypt, self.lumen, self.agg, self.layer = crypt, lumen & tissue, agg, layer
        tf = tissue.astype(np.float32)
        angle = np.full(X.shape, 0.0) + np.arctan(2 * bend * (s - L / 2))
        fib = _shapes.fibres(rng, X.shape, self.raster_um, angle, 50.0)
        eos = np.array([0.30, 0.55, 0.25, 0.60])[layer] * tf
        eos[layer == 3] *= 0.7 + 0.6 * fib[layer == 3]
        eos[crypt] = 0.35
        eos[self.lumen] = 0.0
        eos[agg] = 0.2
        hem = np.array([0.10, 0.06, 0.02, 0.03])[layer] * tf
        hem[crypt] = 0.15
        hem[self.lumen] = 0.0
        hem[agg] = 0.3
        self.channels = Raster(origin, self.raster_um, np.stack([gaussian_filter(hem, 0.8), gaussian_filter(eos, 0.8)]))
        rel = np.array([x[2] for x in LAYERS])[layer] * tf
        rel[crypt] = 2.2
        rel[self.lumen] = 0.0
        rel[agg] = 5.0
        self.intensity = Raster(origin, self.raster_um, rel.astype(np.float32))
        self._crypt_r = Raster(origin, self.raster_um, crypt.astype(np.float32))
        self._agg_r = Raster(origin, self.raster_um, agg.astype(np.float32))

    # ------------------------------------------------------------------ damage
    def _frame(self, sx: float) -> tuple[np.ndarray, np.ndarray]:
        """Point on the centreline at arc position ``sx`` (µm) and the unit tangent there."""
        p = np.array([self.x0 + sx, self.yc + self.bend * (sx - self.L / 2) ** 2])
        tg = np.array([1.0, 2 * self.bend * (sx - self.L / 2)])
        return p, tg / np.linalg.norm(tg)

    def damage(self, rng):
        pieces = []
        tear_s = rng.uniform(0.45, 0.6) * self.L
        fold_s = rng.uniform(0.12, 0.18) * self.L
        if self.opts["fold"]:  # the end before fold_s is turned over (reflection across the fold line)
            p, tg = self._frame(fold_s)
            n = -tg  # the flap is on the small-s side
            off = float(n @ p)
            M = np.eye(3)
            M[:2, :2] = np.eye(2) - 2 * np.outer(n, n)
            M[:2, 2] = 2 * off * n
            pieces.append(Piece("fold", n, off, np.zeros(2), np.ones(2), np.zeros(2), M))
        if self.opts["tear"]:  # the part after tear_s is pulled away and turned a little
            p, tg = self._frame(tear_s)
            gap = rng.uniform(80, 160)
            th = np.radians(rng.uniform(1.5, 4.0) * rng.choice([-1, 1]))
            R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
            shift = gap * tg + rng.uniform(-30, 30) * np.array([-tg[1], tg[0]])
            M = np.eye(3)
            M[:2, :2] = R
            M[:2, 2] = p + shift - R @ p
            amp = np.array([rng.uniform(10, 20), rng.uniform(4, 8)])
            lengths = np.array([rng.uniform(40, 90), rng.uniform(12, 25)])
            pieces.append(Piece("tear", tg, float(tg @ p), amp, lengths, rng.uniform(0, 6.3, 2), M))
        missing = None
        if self.opts["missing"]:  # a bite out of one edge, in the torn-off part
            sx = rng.uniform(0.7, 0.88) * self.L
            p, tg = self._frame(sx)
            nrm = np.array([-tg[1], tg[0]]) * rng.choice([-1, 1])
            r = rng.uniform(0.2, 0.3) * self.W
            c = p + nrm * self.W / 2
            X, Y = self.sd.xy()
            missing = np.zeros(X.shape, bool)
            _shapes.paint_ellipse(missing, X, Y, c, (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0, np.pi))
            self.missing_centre = c
        return pieces, missing

    # ------------------------------------------------------------------ cells
    def sample_cells(self, rng, density):
        n = rng.poisson(density * self.area_mm2())
        xy = poisson_cells(rng, self.intensity, n)
        depth = self.depth.sample(xy, order=0)
        layer = np.minimum(np.searchsorted([u for u, *_ in LAYERS], depth), len(LAYERS) - 1)
        ty = np.zeros(len(xy), np.int64)
        for i, (*_, mix) in enumerate(LAYERS):
            sel = layer == i
            ty[sel] = draw_types(rng, mix, int(sel.sum()))
        ty[self._crypt_r.sample(xy, order=0) > 0.5] = type_codes(["luminal"])[0]
        in_agg = self._agg_r.sample(xy, order=0) > 0.5
        ty[in_agg] = draw_types(rng, {"b_cell": 0.6, "t_cell": 0.4}, int(in_agg.sum()))
        return xy, ty

    def egfr(self, xy):
        return np.clip(1.0 - self.depth.sample(xy, order=1, cval=1.0) / 0.6, 0, 1)

    def landmark_candidates(self):
        pts = [c for c, _ in self.aggregates]
        names = [f"aggregate_{i}" for i in range(len(self.aggregates))]
        for f in (0.3, 0.4, 0.65, 0.8, 0.92):
            p, tg = self._frame(f * self.L)
            nrm = np.array([-tg[1], tg[0]])
            pts.append(p + nrm * self.side * (self.W / 2 - 0.475 * self.W))
            names.append(f"muscularis_mucosae_{f:.2f}")
        return np.asarray(pts), names

    def colourise(self, amounts, style, rng):
        colours = {"eosin": np.array([0.92, 0.45, 0.68]), "hematoxylin": np.array([0.28, 0.18, 0.52])}
        return _he.additive(amounts, colours, style, ["eosin", "hematoxylin"])
