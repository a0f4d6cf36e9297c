"""The ground-truth tissue of the synthetic twin sections.

One tissue, defined in the Xenium frame (µm), from which both serial sections are drawn:

* an outline: an elongated, irregular body with a lobe, a tail and a notch (no mirror or rotation
  symmetry, so the orientation of a section can be identified);
* structures inside it: tumour nests (large, irregular, dense), ducts (elongated, dense) and
  immune aggregates (small, very dense); the rest is stroma (sparse);
* two cut lines: the Xenium section lacks a strip on one side of the tissue (region selection) and
  the Visium section a strip on another side (a damaged edge), so the sections overlap partially;
* a smooth EGFR field (a logistic gradient across the tissue) that modulates EGFR in tumour cells.

Every field is a function of position, evaluated on arbitrary points (vectorised, with per-blob
culling so that hundreds of structures on millions of points stay fast).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

#: Cell types, in the order used by the integer codes in :attr:`TissueModel.sample_cells` output.
CELL_TYPES = ("tumour", "luminal", "myoepithelial", "fibroblast", "endothelial", "t_cell", "b_cell", "macrophage")
#: Regions of the tissue; every cell belongs to one.
REGIONS = ("nest", "duct", "immune", "stroma")
#: Relative cell density (cells per area) of each region, stroma = 1.
REGION_DENSITY = {"nest": 3.5, "duct": 3.0, "immune": 5.0, "stroma": 1.0}
#: Cell-type composition of each region.
REGION_MIX = {
    "nest": {"tumour": 0.93, "t_cell": 0.04, "macrophage": 0.03},
    "duct": {"luminal": 0.8, "myoepithelial": 0.2},
    "immune": {"t_cell": 0.55, "b_cell": 0.35, "macrophage": 0.10},
    "stroma": {"fibroblast": 0.70, "endothelial": 0.10, "macrophage": 0.08, "t_cell": 0.07, "b_cell": 0.05},
}
#: Area fraction of the tissue covered by each kind of structure (targets for their placement).
STRUCTURE_FRACTION = {"nest": 0.24, "duct": 0.07, "immune": 0.04}
#: Width (µm) of the soft edge of the structures and of the tissue outline.
EDGE_SOFTNESS_UM = 6.0
#: EGFR expression multiplier in tumour cells spans ``EGFR_LOW .. EGFR_LOW + EGFR_SPAN``.
EGFR_LOW, EGFR_SPAN = 0.1, 1.9


@dataclass
class Blobs:
    """Irregular elliptical blobs: ``K`` centres, semi-axes, angles and radial harmonics (µm, rad).

    The boundary of blob ``k`` in its own frame ``(u, v)`` is the ellipse with semi-axes
    ``axes[k]``, its radius modulated by ``1 + sum_h amp[k, h] cos((h + 2) phi + phase[k, h])``.
    """

    centre: np.ndarray  # (K, 2)
    axes: np.ndarray  # (K, 2)
    angle: np.ndarray  # (K,)
    amp: np.ndarray  # (K, H)
    phase: np.ndarray  # (K, H)

    def __len__(self) -> int:
        return int(self.centre.shape[0])

    @classmethod
    def empty(cls, n_harm: int = 3) -> Blobs:
        """A set of zero blobs."""
        return cls(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros((0, n_harm)), np.zeros((0, n_harm)))

    def half_extent(self) -> np.ndarray:
        """``(K, 2)`` half widths (µm) along x and y of boxes around the centres that hold each blob."""
        c, s = np.abs(np.cos(self.angle)), np.abs(np.sin(self.angle))
        a, b = self.axes[:, 0], self.axes[:, 1]
        f = 1.0 + np.abs(self.amp).sum(axis=1)
        return np.column_stack([np.hypot(a * c, b * s) * f, np.hypot(a * s, b * c) * f])

    def bound(self) -> np.ndarray:
        """``(K,)`` radius (µm) around each centre outside which a blob is certainly empty."""
        return self.axes.max(axis=1) * (1.0 + np.abs(self.amp).sum(axis=1))

    def signed_distance(self, k: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance (µm, positive inside) of points to the boundary of blob ``k``."""
        c, s = np.cos(self.angle[k]), np.sin(self.angle[k])
        dx, dy = x - self.centre[k, 0], y - self.centre[k, 1]
        u, v = c * dx + s * dy, -s * dx + c * dy
        a, b = self.axes[k]
        phi = np.arctan2(v / b, u / a)
        rr = np.ones_like(phi)
        for h in range(self.amp.shape[1]):
            rr += self.amp[k, h] * np.cos((h + 2) * phi + self.phase[k, h])
        rho = np.hypot(u / a, v / b) / rr
        return (1.0 - rho) * np.sqrt(a * b) * rr

    def max_membership(self, x: np.ndarray, y: np.ndarray, softness: float = EDGE_SOFTNESS_UM) -> np.ndarray:
        """Soft membership in ``[0, 1]`` of points in the union of the blobs (max over blobs).

        ``x``, ``y`` are flat arrays of equal length (µm). Points are sorted by ``x`` once so that
        each blob only touches the points inside its bounding strip.
        """
        out = np.zeros(x.shape, dtype=np.float64)
        if len(self) == 0 or x.size == 0:
            return out
        order = np.argsort(x, kind="stable")
        xs = x[order]
        reach = self.bound() + 6.0 * softness
        for k in range(len(self)):
            lo, hi = np.searchsorted(xs, [self.centre[k, 0] - reach[k], self.centre[k, 0] + reach[k]])
            if hi <= lo:
                continue
            idx = order[lo:hi]
            idx = idx[np.abs(y[idx] - self.centre[k, 1]) < reach[k]]
            if idx.size == 0:
                continue
            m = _sigmoid(self.signed_distance(k, x[idx], y[idx]) / softness)
            out[idx] = np.maximum(out[idx], m)
        return out

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The blob parameters as named arrays (for ``np.savez``)."""
        return {f"{prefix}_{f.name}": np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> Blobs:
        """Inverse of :meth:`to_arrays`."""
        return cls(**{f.name: np.asarray(arrays[f"{prefix}_{f.name}"], dtype=float) for f in fields(cls)})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass
class TissueModel:
    """The ground-truth tissue, in the Xenium frame (µm).

    Attributes
    ----------
    outline
        The union of these blobs is the tissue: body, lobe and tail (in that order).
    notch
        Blobs cut out of the outline.
    nests, ducts, immune
        The structures (tumour nests, ducts, immune aggregates).
    xenium_cut, visium_cut
        ``(3,)`` half-planes ``(nx, ny, offset)``: a section keeps points with
        ``nx * x + ny * y <= offset`` (plus a gentle waviness); ``offset = inf`` keeps everything.
    egfr_axis
        ``(4,)``: unit direction ``(ex, ey)``, centre ``u0`` (µm along the direction) and width
        ``w`` (µm) of the EGFR gradient ``sigmoid((e . xy - u0) / w)``.
    """

    outline: Blobs
    notch: Blobs
    nests: Blobs
    ducts: Blobs
    immune: Blobs
    xenium_cut: np.ndarray
    visium_cut: np.ndarray
    egfr_axis: np.ndarray

    _BLOB_FIELDS = ("outline", "notch", "nests", "ducts", "immune")
    _ARRAY_FIELDS = ("xenium_cut", "visium_cut", "egfr_axis")

    # ------------------------------------------------------------------ geometry
    def tissue_signed_distance(self, xy) -> np.ndarray:
        """Signed distance (µm, positive inside) to the outline of the whole tissue (before cuts)."""
        x, y = _split(xy)
        sd = self.outline.signed_distance(0, x, y)
        for k in range(1, len(self.outline)):
            sd = np.maximum(sd, self.outline.signed_distance(k, x, y))
        for k in range(len(self.notch)):
            sd = np.minimum(sd, -self.notch.signed_distance(k, x, y))
        return sd

    def section_signed_distance(self, xy, section: str | None) -> np.ndarray:
        """Signed distance (µm) to the outline of one section (``"xenium"``, ``"visium"`` or ``None``: uncut)."""
        x, y = _split(xy)
        sd = self.tissue_signed_distance(np.stack([x, y], axis=-1))
        if section is None:
            return sd
        cut = {"xenium": self.xenium_cut, "visium": self.visium_cut}.get(section)
        if cut is None:
            raise ValueError(f"section must be 'xenium', 'visium' or None, got {section!r}.")
        if not np.isfinite(cut[2]):
            return sd
        t = -cut[1] * x + cut[0] * y  # position along the cut line
        wav = 12.0 * np.sin(t / 90.0) + 6.0 * np.sin(t / 37.0 + 1.0)
        return np.minimum(sd, cut[2] + wav - (cut[0] * x + cut[1] * y))

    def in_section(self, xy, section: str | None = None) -> np.ndarray:
        """Soft membership (``[0, 1]``) of points in a section's tissue (``None``: the uncut tissue)."""
        return _sigmoid(self.section_signed_distance(xy, section) / EDGE_SOFTNESS_UM)

    def shared(self, xy) -> np.ndarray:
        """Boolean: the points lie in the tissue of both sections (the truly shared region)."""
        return (self.section_signed_distance(xy, "xenium") > 0) & (self.section_signed_distance(xy, "visium") > 0)

    def regions(self, xy) -> dict[str, np.ndarray]:
        """Soft region probabilities at points: ``{"nest", "duct", "immune", "stroma"}`` summing to 1."""
        x, y = _split(xy)
        nest = self.nests.max_membership(x, y)
        duct = self.ducts.max_membership(x, y) * (1 - nest)
        imm = self.immune.max_membership(x, y) * (1 - nest) * (1 - duct)
        return {"nest": nest, "duct": duct, "immune": imm, "stroma": 1.0 - nest - duct - imm}

    def egfr_pattern(self, xy) -> np.ndarray:
        """The known EGFR field in ``[0, 1]`` at points ``(N, 2)`` (µm, Xenium frame).

        A logistic gradient across the tissue. A tumour cell at ``xy`` expresses EGFR at
        ``EGFR_LOW + EGFR_SPAN * egfr_pattern(xy)`` times its tumour baseline; other cell types
        do not follow it.
        """
        x, y = _split(xy)
        ex, ey, u0, w = self.egfr_axis
        return _sigmoid((ex * x + ey * y - u0) / w)

    def density(self, xy, section: str | None = None) -> np.ndarray:
        """Relative cell density (stroma = 1) at points, zero outside the section's tissue."""
        reg = self.regions(xy)
        d = sum(reg[r] * REGION_DENSITY[r] for r in REGIONS)
        return d * self.in_section(xy, section)

    def bbox(self) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` (µm) enclosing the whole tissue."""
        c = self.outline.centre
        r = self.outline.half_extent() + 4 * EDGE_SOFTNESS_UM
        return (
            float((c[:, 0] - r[:, 0]).min()),
            float((c[:, 0] + r[:, 0]).max()),
            float((c[:, 1] - r[:, 1]).min()),
            float((c[:, 1] + r[:, 1]).max()),
        )

    # ------------------------------------------------------------------ sampling
    def sample_cells(self, rng: np.random.Generator, section: str, *, n: int | None = None, n_candidates=None):
        """Sample cell positions and types of one section (an inhomogeneous Poisson process).

        Candidates are uniform over :meth:`bbox` and accepted with probability
        ``density / max_density``. With ``n``, exactly ``n`` cells are returned and the number of
        candidates used is reported; with ``n_candidates``, that many candidates are drawn (so two
        sections drawn with the same number of candidates share one intensity).

        Returns
        -------
        tuple
            ``(xy, cell_types, regions, n_candidates)``: positions ``(N, 2)`` in µm, cell-type codes ``(N,)``
            into ``CELL_TYPES``, region codes ``(N,)`` into ``REGIONS``, and the number of candidates used.
        """
        xmin, xmax, ymin, ymax = self.bbox()
        dmax = max(REGION_DENSITY.values())
        got_xy, got_p = [], []
        used = 0
        total = 0
        batch = int(max(4 * (n or 0), 20_000)) if n_candidates is None else int(n_candidates)
        while True:
            m = batch if n_candidates is None else int(n_candidates) - used
            if m <= 0:
                break
            cand = np.column_stack([rng.uniform(xmin, xmax, m), rng.uniform(ymin, ymax, m)])
            reg = self.regions(cand)
            inside = self.in_section(cand, section)
            w = np.stack([reg[r] * REGION_DENSITY[r] for r in REGIONS], axis=1)
            acc_p = w.sum(axis=1) * inside / dmax
            keep = rng.uniform(size=m) < acc_p
            if n is not None and total + keep.sum() >= n:
                # stop exactly at the n-th accepted candidate
                cut = int(np.flatnonzero(keep)[n - total - 1]) + 1
                keep[cut:] = False
                used += cut
                got_xy.append(cand[keep])
                got_p.append(w[keep])
                total = n
                break
            used += m
            got_xy.append(cand[keep])
            got_p.append(w[keep])
            total += int(keep.sum())
            if n_candidates is not None:
                break
            if used > 200 * max(n or 1, 1) + 10_000_000:
                raise RuntimeError(f"could not place {n} cells in the {section} section (tissue too small?).")
        xy = np.vstack(got_xy) if got_xy else np.zeros((0, 2))
        w = np.vstack(got_p) if got_p else np.zeros((0, len(REGIONS)))
        # region of each cell, then its type from the region's composition
        cum = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
        region = np.minimum((rng.uniform(size=(len(xy), 1)) > cum).sum(axis=1), len(REGIONS) - 1)
        ctype = np.empty(len(xy), dtype=np.int64)
        u = rng.uniform(size=len(xy))
        for ri, r in enumerate(REGIONS):
            sel = region == ri
            names = list(REGION_MIX[r])
            p = np.cumsum([REGION_MIX[r][t] for t in names])
            pick = np.minimum(np.searchsorted(p / p[-1], u[sel], side="right"), len(names) - 1)
            ctype[sel] = np.array([CELL_TYPES.index(t) for t in names])[pick]
        return xy, ctype, region, used

    # ------------------------------------------------------------------ (de)serialisation
    def to_arrays(self) -> dict[str, np.ndarray]:
        """All parameters as named arrays (prefix ``tissue_``)."""
        out: dict[str, np.ndarray] = {}
        for name in self._BLOB_FIELDS:
            out.update(getattr(self, name).to_arrays(f"tissue_{name}"))
        for name in self._ARRAY_FIELDS:
            out[f"tissue_{name}"] = np.asarray(getattr(self, name), dtype=float)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> TissueModel:
        """Inverse of :meth:`to_arrays`."""
        kw = {name: Blobs.from_arrays(arrays, f"tissue_{name}") for name in cls._BLOB_FIELDS}
        kw.update({name: np.asarray(arrays[f"tissue_{name}"], dtype=float) for name in cls._ARRAY_FIELDS})
        return cls(**kw)


def _split(xy) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(xy, dtype=np.float64)
    if a.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) in (x, y) order, got {a.shape}.")
    return a[..., 0], a[..., 1]


# ---------------------------------------------------------------------- construction
def _one_blob(centre, axes, angle, amp, phase) -> Blobs:
    return Blobs(
        np.asarray([centre], float),
        np.asarray([axes], float),
        np.asarray([angle], float),
        np.asarray([amp], float),
        np.asarray([phase], float),
    )


def _area_grid(model_sd, bbox, n: int = 260):
    xmin, xmax, ymin, ymax = bbox
    h = max(xmax - xmin, ymax - ymin) / n
    gx = np.arange(xmin + h / 2, xmax, h)
    gy = np.arange(ymin + h / 2, ymax, h)
    X, Y = np.meshgrid(gx, gy)
    pts = np.column_stack([X.ravel(), Y.ravel()])
    return pts, model_sd(pts) > 0, h * h


def make_tissue(
    rng: np.random.Generator, area_um2: float, trim: float, visium_trim: float | None = None
) -> TissueModel:
    """Draw a tissue of (uncut) area ``area_um2`` (µm²).

    The Xenium section loses a strip of area fraction ``trim``, the Visium section one of
    ``visium_trim`` (default ``trim``) on another side.
    """
    visium_trim = trim if visium_trim is None else visium_trim
    for name, v in (("trim", trim), ("visium_trim", visium_trim)):
        if not 0.0 <= v < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {v!r}.")
    # outline at unit size (a body, a lobe on one side, a tail at one end, a notch on the other side:
    # no symmetry), then scaled to the requested area
    theta0 = rng.uniform(-np.pi, np.pi)
    side = rng.choice([-1.0, 1.0])
    a0, b0 = 1.15, 0.75
    rot = np.array([[np.cos(theta0), -np.sin(theta0)], [np.sin(theta0), np.cos(theta0)]])

    def rim(t: float, out: float) -> tuple[np.ndarray, float]:
        """Point of the body ellipse at parameter ``t`` pushed ``out`` along the normal; normal angle."""
        p = np.array([a0 * np.cos(t), b0 * np.sin(t)])
        n = np.array([b0 * np.cos(t), a0 * np.sin(t)])
        n /= np.linalg.norm(n)
        return rot @ (p + out * n), float(np.arctan2(*(rot @ n)[::-1]))

    amp = np.array([rng.uniform(0.04, 0.07), rng.uniform(0.03, 0.05), rng.uniform(0.015, 0.03)])
    lobe_c, lobe_a = rim(side * rng.uniform(1.0, 1.3), 0.12)
    tail_c, tail_a = rim(np.pi + side * rng.uniform(0.3, 0.5), 0.32)
    notch_c, notch_a = rim(-side * rng.uniform(1.2, 1.7), 0.0)
    outline_p = [
        ((0.0, 0.0), (a0, b0), theta0, amp),
        (lobe_c, (0.46, 0.36), lobe_a, (0.05, 0.03, 0.0)),
        (tail_c, (0.5, 0.2), tail_a + rng.uniform(-0.3, 0.3), (0.03, 0.0, 0.0)),
    ]
    notch_p = [(notch_c, (0.3, 0.2), notch_a, (0.0, 0.0, 0.0))]
    phases = rng.uniform(0, 2 * np.pi, (len(outline_p), 3))

    def build(scale: float, offset: np.ndarray) -> tuple[Blobs, Blobs]:
        def blobs(ps, ph) -> Blobs:
            return Blobs(
                np.asarray([np.asarray(c) * scale + offset for c, *_ in ps], float),
                np.asarray([np.asarray(ax) * scale for _, ax, *_ in ps], float),
                np.asarray([an for _, _, an, _ in ps], float),
                np.asarray([am for *_, am in ps], float),
                np.asarray(ph, float),
            )

        return blobs(outline_p, phases), blobs(notch_p, np.zeros((len(notch_p), 3)))

    inf_cut = np.array([1.0, 0.0, np.inf])
    empty = Blobs.empty()
    no_egfr = np.array([1, 0, 0, 1.0])
    unit = TissueModel(*build(1.0, np.zeros(2)), empty, empty, empty, inf_cut, inf_cut, no_egfr)
    _, inside, cell = _area_grid(unit.tissue_signed_distance, unit.bbox())
    scale = float(np.sqrt(area_um2 / (inside.sum() * cell)))
    # place the tissue with a margin from the Xenium origin
    tmp = TissueModel(*build(scale, np.zeros(2)), empty, empty, empty, inf_cut, inf_cut, no_egfr)
    xmin, _, ymin, _ = tmp.bbox()
    offset = np.array([150.0 - xmin, 150.0 - ymin])
    model = TissueModel(*build(scale, offset), empty, empty, empty, inf_cut, inf_cut, no_egfr)
    pts, inside, _ = _area_grid(model.tissue_signed_distance, model.bbox())
    tis = pts[inside]

    # section cuts: Xenium loses a strip on one side, Visium on another
    def cut(angle: float, frac: float) -> np.ndarray:
        n = np.array([np.cos(angle), np.sin(angle)])
        if frac <= 0:
            return np.array([n[0], n[1], np.inf])
        return np.array([n[0], n[1], float(np.quantile(tis @ n, 1.0 - frac))])

    a_x = rng.uniform(0, 2 * np.pi)
    model.xenium_cut = cut(a_x, trim)
    model.visium_cut = cut(a_x + np.pi * rng.uniform(0.6, 0.9) * rng.choice([-1, 1]), visium_trim)

    # EGFR: logistic gradient along a random direction through the tissue centre
    a_e = rng.uniform(0, 2 * np.pi)
    e = np.array([np.cos(a_e), np.sin(a_e)])
    proj = tis @ e
    model.egfr_axis = np.array([e[0], e[1], float(np.median(proj)), float((proj.max() - proj.min()) / 6.0)])

    # structures, placed without overlap well inside the tissue (occupancy on a regular grid)
    bxmin, bxmax, bymin, bymax = model.bbox()
    h = max(8.0, max(bxmax - bxmin, bymax - bymin) / 500.0)
    gx = np.arange(bxmin + h / 2, bxmax, h)
    gy = np.arange(bymin + h / 2, bymax, h)
    GX, GY = np.meshgrid(gx, gy)
    tissue_sd = model.tissue_signed_distance(np.stack([GX, GY], axis=-1))
    occupied = np.zeros(GX.shape, bool)
    free = np.flatnonzero((tissue_sd > 60.0).ravel())
    gap = 25.0  # µm between structures
    area = float((tissue_sd > 0).sum()) * h * h
    specs = {  # ducts first: they need the most room
        "duct": dict(a=(140.0, 280.0), ratio=(0.16, 0.26), amp=(0.0, 0.04)),
        "nest": dict(a=(90.0, 210.0), ratio=(0.6, 1.0), amp=(0.08, 0.18)),
        "immune": dict(a=(45.0, 100.0), ratio=(0.75, 1.0), amp=(0.03, 0.08)),
    }
    result = {}
    for kind, sp in specs.items():
        target = STRUCTURE_FRACTION[kind] * area
        expected_n = target / (np.pi * np.mean(sp["a"]) ** 2 * np.mean(sp["ratio"]))
        cs, ax, an, am, ph = [], [], [], [], []
        covered, tries = 0.0, 0
        while covered < target and tries < 60 * expected_n + 500 and free.size:
            tries += 1
            a = rng.uniform(*sp["a"])
            b = a * rng.uniform(*sp["ratio"])
            amps = rng.uniform(*sp["amp"], size=3) * np.array([1.0, 0.6, 0.35])
            ang = rng.uniform(0, np.pi)
            phase = rng.uniform(0, 2 * np.pi, 3)
            k = free[rng.integers(free.size)]
            c = np.array([GX.flat[k], GY.flat[k]]) + rng.uniform(-0.5, 0.5, 2) * h
            blob = _one_blob(c, (a, b), ang, amps, phase)
            ex, ey = blob.half_extent()[0] + gap
            j0, j1 = np.searchsorted(gx, [c[0] - ex, c[0] + ex])
            i0, i1 = np.searchsorted(gy, [c[1] - ey, c[1] + ey])
            sd = blob.signed_distance(0, GX[i0:i1, j0:j1], GY[i0:i1, j0:j1])
            near = sd > -gap
            if near.sum() < 4 or occupied[i0:i1, j0:j1][near].any():
                continue
            if (tissue_sd[i0:i1, j0:j1][sd > 0] < 30.0).any():  # well inside the tissue
                continue
            occupied[i0:i1, j0:j1] |= sd > 0
            cs.append(c)
            ax.append((a, b))
            an.append(ang)
            am.append(amps)
            ph.append(phase)
            covered += float((sd > 0).sum()) * h * h
        result[kind] = (
            Blobs(
                np.asarray(cs).reshape(-1, 2),
                np.asarray(ax).reshape(-1, 2),
                np.asarray(an),
                np.asarray(am).reshape(-1, 3),
                np.asarray(ph).reshape(-1, 3),
            )
            if cs
            else Blobs.empty()
        )
    model.nests, model.ducts, model.immune = result["nest"], result["duct"], result["immune"]
    return model
