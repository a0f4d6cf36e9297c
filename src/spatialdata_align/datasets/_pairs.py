"""What every pair family shares: sections, slide geometry, spots, counts, rendering, landmarks, 10x files.

A family (a :class:`FamilyModel` subclass) brings its own tissue: the outline, how cells are placed, the
stain-amount rasters of its H&E, the nucleus style, the colour model and the deformation model. This module
cuts the two serial sections from it, places the Visium section on a slide (rotation of any angle, optional
flip, anisotropic pixels, partial capture area), draws spots and counts, renders the H&E and writes both
10x folders and the truth (:class:`~spatialdata_align.datasets.PairTruth`).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM
from . import _deform, _he
from ._genes import XENIUM_CONTROLS, GeneSets, make_genes
from ._pairtruth import STATUS, VALID_CODES, PairTruth, Piece, SmoothWarp, write_landmark_files
from ._render import downscale
from ._tissue import CELL_TYPES, EGFR_LOW, EGFR_SPAN

XENIUM_DIRNAME = "xenium"
VISIUM_DIRNAME = "visium"
TRUTH_DIRNAME = "truth"
LOWRES_PX = 600
SPOT_GRID_PAD_UM = 150.0
IMAGE_PAD_UM = 250.0
EDGE_SOFTNESS_UM = 4.0
#: EGFR counts per cell (Xenium scale) added in proportion to the family's EGFR field, whatever the cell type
EGFR_EXTRA = 6.0
_VISIUM_DISPERSION = 8.0
_UNASSIGNED_FRACTION = 0.05
_CODE = {v: k for k, v in STATUS.items()}
#: mean cell area (µm²) and nucleus radius (µm) per cell type
CELL_AREA_UM2 = dict(zip(CELL_TYPES, (120.0, 100.0, 80.0, 90.0, 70.0, 40.0, 45.0, 90.0), strict=True))
NUCLEUS_RADIUS_UM = dict(zip(CELL_TYPES, (5.0, 4.5, 4.0, 3.5, 3.5, 3.2, 3.2, 4.2), strict=True))


def type_codes(names) -> np.ndarray:
    """Codes into :data:`~spatialdata_align.datasets.CELL_TYPES` of cell-type names."""
    return np.array([CELL_TYPES.index(n) for n in names], np.int64)


def draw_types(rng, mix: dict[str, float], n: int) -> np.ndarray:
    """``n`` cell-type codes drawn from a composition ``{type: weight}``."""
    names = list(mix)
    p = np.array([mix[t] for t in names], float)
    return type_codes(names)[rng.choice(len(names), size=n, p=p / p.sum())]


def signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (µm, positive inside) of a boolean mask with pixels of ``spacing`` µm."""
    return ((distance_transform_edt(mask) - distance_transform_edt(~mask)) * spacing).astype(np.float32)


def poisson_cells(rng, intensity: _he.Raster, n: int) -> np.ndarray:
    """``n`` points drawn with density proportional to a non-negative raster (uniform within each pixel)."""
    p = np.clip(intensity.data.ravel().astype(np.float64), 0, None)
    if n <= 0 or p.sum() <= 0:
        return np.zeros((0, 2))
    idx = rng.choice(p.size, size=n, p=p / p.sum())
    w = intensity.data.shape[1]
    i, j = np.divmod(idx, w)
    jit = rng.uniform(-0.5, 0.5, (n, 2))
    return intensity.origin + intensity.spacing * np.column_stack([j + jit[:, 0], i + jit[:, 1]])


class FamilyModel:
    """A tissue model of one pair family (subclass it; see the families in this package).

    A subclass sets the class attributes and, in ``__init__(rng, size_um)``, the tissue rasters:
    :attr:`sd` (signed distance to the uncut tissue outline, µm) and :attr:`channels` (stain amounts,
    ``(c, h, w)``, named by :attr:`channel_names`), on a grid of :attr:`raster_um` µm in the Xenium frame.
    """

    name = "family"
    default_density = 3000.0
    default_size_mm = 3.5
    deformation = "svf"
    warp_um = 80.0
    warp_length_um = 900.0
    stain = "normal"
    nucleus_style = "dots"
    nucleus_od = 0.9
    raster_um = 3.0
    channel_names: tuple[str, ...] = ("hematoxylin", "eosin")

    sd: _he.Raster
    channels: _he.Raster

    def grid(self, size_um: tuple[float, float], margin: float = 120.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(origin, X, Y)``: a raster grid over a ``(width, height)`` µm tissue placed at (``margin``, ``margin``)."""
        w, h = size_um
        s = self.raster_um
        origin = np.array([0.0, 0.0])
        nx, ny = int(np.ceil((w + 2 * margin) / s)), int(np.ceil((h + 2 * margin) / s))
        X, Y = np.meshgrid(origin[0] + s * np.arange(nx), origin[1] + s * np.arange(ny))
        return origin, X, Y

    def bbox(self) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` µm of the tissue."""
        X, Y = self.sd.xy()
        inside = self.sd.data > 0
        return float(X[inside].min()), float(X[inside].max()), float(Y[inside].min()), float(Y[inside].max())

    def sample_cells(self, rng, density: float) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Cells over the whole (uncut) tissue at a mean ``density`` (cells/mm²): ``(xy µm, type codes)``."""
        raise NotImplementedError

    def egfr(self, xy: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """The EGFR field in ``[0, 1]`` at ``(N, 2)`` µm points."""
        raise NotImplementedError

    def landmark_candidates(self) -> tuple[np.ndarray, list[str]]:
        """Recognisable points (µm) and their names; the builder keeps well-spread ones inside both sections."""
        return np.zeros((0, 2)), []

    def damage(self, rng) -> tuple[list[Piece], np.ndarray | None]:
        """Pieces (tear/fold) and a boolean raster (on :attr:`sd`'s grid) of tissue missing from the Visium section."""
        return [], None

    def colourise(self, amounts: dict[str, np.ndarray], style: _he.StainStyle, rng) -> np.ndarray:
        """Float RGB from stain amounts (default: Beer-Lambert hematoxylin + eosin)."""
        return _he.beer_lambert(amounts, {"hematoxylin": _he.HEMATOXYLIN, "eosin": _he.EOSIN}, style, rng)

    def area_mm2(self) -> float:
        """Tissue area (mm²)."""
        return float((self.sd.data > 0).sum()) * self.raster_um**2 / 1e6


@dataclass
class SyntheticPair:
    """What a pair family wrote, and its ground truth.

    Attributes
    ----------
    family
        Family name (``"twin"`` for :func:`~spatialdata_align.datasets.twin_sections` output read with
        :func:`load_pair`).
    xenium_path, visium_path, truth_path
        The Xenium folder, the Space Ranger ``outs/`` folder and ``truth/`` (``pair_truth.npz``/``.json``,
        ``landmarks.csv`` with click noise, ``landmarks_clean.csv``, ``xenium_cells.parquet``,
        ``visium_spots.parquet``, ``genes.csv``).
    truth
        :class:`~spatialdata_align.datasets.PairTruth` (or the twin adapter).
    seed
        The seed.
    density
        Xenium cells per mm² of Xenium-section tissue.
    n_cells, n_cells_visium, n_spots, n_spots_in_tissue
        Sizes.
    shared_genes
        Gene symbols measured by both platforms.
    params
        Every generation parameter (as given or drawn), with timings.
    """

    family: str
    xenium_path: Path
    visium_path: Path
    truth_path: Path
    truth: Any
    seed: int
    density: float
    n_cells: int
    n_cells_visium: int
    n_spots: int
    n_spots_in_tissue: int
    shared_genes: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def landmarks_path(self) -> Path:
        """``truth/landmarks.csv``: the noisy landmark clicks (Xenium µm -> Visium full-res px)."""
        return self.truth_path / "landmarks.csv"

    def xenium_cells_truth(self) -> pd.DataFrame:
        """Per Xenium cell: ``cell_id``, ``x``, ``y`` (µm), ``cell_type``, ``egfr_field``, ``status``, ``valid``."""
        return pd.read_parquet(self.truth_path / "xenium_cells.parquet")


# ---------------------------------------------------------------------------------------------- helpers
def _rect_roi(rng, X, Y, inside, keep: float, useful=None) -> tuple[np.ndarray, list[str]]:
    """An axis-aligned ROI ``(x0, x1, y0, y1)`` keeping about ``keep`` of the tissue, cut on one or two sides.

    ``useful(points)`` (optional) says whether the tissue cut away is worth cutting (e.g. mostly inside the
    Visium capture area, so that the Xenium region covers only part of it); the first acceptable choice of
    sides in a random order is taken.
    """
    import itertools

    xs, ys = X[inside], Y[inside]
    sides = ["xmin", "xmax", "ymin", "ymax"]
    n_sides = 1 if rng.uniform() < 0.5 else 2
    combos = list(itertools.combinations(sides, n_sides))
    order = rng.permutation(len(combos))
    first = None
    for ci in order:
        pick = list(combos[ci])
        roi = np.array([-np.inf, np.inf, -np.inf, np.inf])
        frac = (1.0 - keep) / n_sides
        for s in pick:
            v = xs if s.startswith("x") else ys
            if s.endswith("min"):
                roi[0 if s == "xmin" else 2] = np.quantile(v, frac)
            else:
                roi[1 if s == "xmax" else 3] = np.quantile(v, 1 - frac)
        first = first or (roi, pick)
        if useful is None:
            return roi, pick
        cut = ~_in_rect(np.column_stack([xs, ys]), roi)
        if useful(np.column_stack([xs[cut], ys[cut]])):
            return roi, pick
    return first


def _in_rect(xy, r) -> np.ndarray:
    return (xy[:, 0] >= r[0]) & (xy[:, 0] <= r[1]) & (xy[:, 1] >= r[2]) & (xy[:, 1] <= r[3])


def _wavy_cut(rng, X, Y, inside, frac: float, angle: float) -> np.ndarray:
    """Signed distance (µm) of a wavy straight cut removing about ``frac`` of the tissue (positive kept)."""
    n = np.array([np.cos(angle), np.sin(angle)])
    proj = X * n[0] + Y * n[1]
    off = np.quantile(proj[inside], 1.0 - frac)
    t = -n[1] * X + n[0] * Y
    wav = 15.0 * np.sin(t / 110.0 + rng.uniform(0, 6.3)) + 6.0 * np.sin(t / 33.0 + rng.uniform(0, 6.3))
    return (off + wav - proj).astype(np.float32)


def _farthest(points: np.ndarray, k: int) -> list[int]:
    if len(points) == 0 or k <= 0:
        return []
    chosen = [int(np.argmax(np.linalg.norm(points - points.mean(0), axis=1)))]
    d = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < min(k, len(points)):
        c = int(np.argmax(d))
        chosen.append(c)
        d = np.minimum(d, np.linalg.norm(points - points[c], axis=1))
    return chosen


def _barcodes(rng, n: int) -> np.ndarray:
    letters = np.array(list("ACGT"))
    out: set[str] = set()
    while len(out) < n:
        out.update("".join(r) for r in letters[rng.integers(0, 4, size=(n, 16))])
    return np.array([f"{b}-1" for b in sorted(out)[:n]])


def _egfr_rates(genes: GeneSets) -> tuple[int, float]:
    e = genes.index("EGFR")
    t = CELL_TYPES.index("tumour")
    return e, float(genes.visium_rate[t, e] / genes.rate[t, e])


def _xenium_tables(rng, genes: GeneSets, types: np.ndarray, egfr: np.ndarray) -> dict:
    from ._tenx import xenium_cell_ids

    n = len(types)
    sf = rng.lognormal(0.0, 0.3, size=n)
    lam = genes.rate[:, genes.xenium][types] * sf[:, None]
    e, _ = _egfr_rates(genes)
    col = int(np.flatnonzero(genes.xenium == e)[0])
    lam[:, col] = sf * (genes.rate[types, e] * (EGFR_LOW + EGFR_SPAN * egfr) + EGFR_EXTRA * egfr)
    gene_counts = sparse.csr_matrix(rng.poisson(lam).astype(np.int32))
    names, ftypes, rates = [], [], []
    for prefix, ftype, k, r in XENIUM_CONTROLS:
        start = 500 if prefix.startswith("NegControlCodeword") else 1
        names += [f"{prefix}{i:04d}" for i in range(start, start + k)]
        ftypes += [ftype] * k
        rates += [r] * k
    ctrl = sparse.csr_matrix(rng.poisson(np.broadcast_to(np.asarray(rates), (n, len(rates)))).astype(np.int32))
    ftypes = np.asarray(ftypes)
    probe = np.asarray(ctrl[:, ftypes == "Negative Control Probe"].sum(axis=1)).ravel()
    codeword = np.asarray(ctrl[:, ftypes != "Negative Control Probe"].sum(axis=1)).ravel()
    tx = np.asarray(gene_counts.sum(axis=1)).ravel()
    area = np.array([CELL_AREA_UM2[t] for t in CELL_TYPES])[types] * rng.lognormal(0.0, 0.2, n)
    nucleus = area * rng.uniform(0.3, 0.5, n)
    cells = pd.DataFrame(
        {
            "cell_id": xenium_cell_ids(n),
            "x_centroid": 0.0,
            "y_centroid": 0.0,
            "transcript_counts": tx.astype(np.int64),
            "control_probe_counts": probe.astype(np.int64),
            "control_codeword_counts": codeword.astype(np.int64),
            "total_counts": (tx + probe + codeword).astype(np.int64),
            "cell_area": np.round(area, 4),
            "nucleus_area": np.round(nucleus, 4),
        }
    )
    return {
        "cells": cells,
        "counts": sparse.hstack([gene_counts, ctrl], format="csr"),
        "feature_ids": np.concatenate([genes.ids[genes.xenium], names]),
        "feature_names": np.concatenate([genes.symbols[genes.xenium], names]),
        "feature_types": np.concatenate([np.full(len(genes.xenium), "Gene Expression"), ftypes]),
    }


def _transcripts(rng, xen: dict, xy: np.ndarray) -> pd.DataFrame:
    """One transcript per counted molecule around its cell, plus 5 % unassigned ones near random cells."""
    cells = xen["cells"]
    coo = xen["counts"].tocoo()
    reps = coo.data.astype(np.int64)
    cell_idx, feat_idx = np.repeat(coo.row, reps), np.repeat(coo.col, reps)
    n = len(cell_idx)
    r = np.sqrt(cells["cell_area"].to_numpy() / np.pi)
    off = rng.normal(size=(n, 2)) * (r[cell_idx] / 2.0)[:, None]
    in_nuc = np.hypot(off[:, 0], off[:, 1]) < np.sqrt(cells["nucleus_area"].to_numpy() / np.pi)[cell_idx]
    n_un = int(_UNASSIGNED_FRACTION * n)
    un_pos = xy[rng.integers(0, len(xy), n_un)] + rng.normal(0, 15.0, (n_un, 2))
    n_genes = int((xen["feature_types"] == "Gene Expression").sum())
    ids = np.append(cells["cell_id"].to_numpy().astype(object), "UNASSIGNED")
    pos = np.vstack([xy[cell_idx] + off, un_pos])
    df = pd.DataFrame(
        {
            "cell_id": pd.Categorical.from_codes(np.concatenate([cell_idx, np.full(n_un, len(ids) - 1)]), ids),
            "overlaps_nucleus": np.concatenate([in_nuc, np.zeros(n_un, bool)]).astype(np.uint8),
            "feature_name": pd.Categorical.from_codes(
                np.concatenate([feat_idx, rng.integers(0, n_genes, n_un)]), xen["feature_names"].astype(object)
            ),
            "x_location": pos[:, 0].astype(np.float32),
            "y_location": pos[:, 1].astype(np.float32),
            "z_location": rng.normal(12.0, 2.0, size=len(pos)).astype(np.float32),
            "qv": rng.uniform(20.0, 40.0, size=len(pos)).astype(np.float32),
        }
    )
    df.insert(0, "transcript_id", np.arange(1, len(df) + 1, dtype=np.uint64))
    return df


def _visium_counts(rng, genes: GeneSets, rows: np.ndarray, n_rows: int, types, egfr) -> sparse.csr_matrix:
    """Spot x gene UMIs: the cells under each spot (``rows``: spot row per cell) plus ambient RNA, NB noise."""
    sf = rng.lognormal(0.0, 0.3, size=len(types))
    A = sparse.csr_matrix((sf, (rows, types)), shape=(n_rows, len(CELL_TYPES)))
    vcols = genes.visium
    lam = np.asarray(A @ genes.visium_rate[:, vcols])
    e, eff = _egfr_rates(genes)
    ecol = int(np.flatnonzero(vcols == e)[0])
    per_cell = sf * (genes.visium_rate[types, e] * (EGFR_LOW + EGFR_SPAN * egfr) + eff * EGFR_EXTRA * egfr)
    lam[:, ecol] = np.bincount(rows, weights=per_cell, minlength=n_rows)
    ambient = 0.15 * genes.visium_rate[:, vcols].mean(axis=0)
    lam = (lam + ambient[None]) * rng.lognormal(0.0, 0.2, size=(n_rows, 1))
    lam = rng.gamma(_VISIUM_DISPERSION, lam / _VISIUM_DISPERSION)
    return sparse.csr_matrix(rng.poisson(lam).astype(np.int32))


# ---------------------------------------------------------------------------------------------- builder
def build_pair(
    model_cls: type[FamilyModel],
    out_dir,
    *,
    seed: int = 0,
    density: float | None = None,
    size_mm: float | None = None,
    warp: float | None = None,
    rotation_deg: float | None = None,
    flip: bool | None = None,
    anisotropy: float | None = None,
    um_per_px: float | None = None,
    stain: str | None = None,
    xenium_fraction: float | None = None,
    capture_fraction: float | None = None,
    n_landmarks: int | None = None,
    landmark_noise_um: tuple[float, float] = (8.0, 15.0),
    hires_px: int = 2000,
    n_xenium_genes: int = 300,
    n_visium_genes: int = 3000,
    transcripts: bool = False,
    overwrite: bool = True,
    progress: bool = False,
    **family_options,
) -> SyntheticPair:
    """Generate one pair of a family (see :func:`spatialdata_align.datasets.pair_family` for the parameters)."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a folder.")
    subdirs = [out_dir / XENIUM_DIRNAME, out_dir / VISIUM_DIRNAME, out_dir / TRUTH_DIRNAME]
    existing = [p for p in subdirs if p.exists() and any(p.iterdir())]
    if existing and not overwrite:
        raise FileExistsError(f"{[str(p) for p in existing]} exist and are not empty; pass overwrite=True.")
    density = float(model_cls.default_density if density is None else density)
    if not 50 <= density <= 50_000:
        raise ValueError(f"density must be in [50, 50000] cells per mm², got {density}.")
    size_mm = float(model_cls.default_size_mm if size_mm is None else size_mm)
    if not 0.5 <= size_mm <= 12:
        raise ValueError(f"size_mm must be in [0.5, 12] mm, got {size_mm}.")
    if not 2 <= int(n_landmarks if n_landmarks is not None else 3) <= 12:
        raise ValueError(f"n_landmarks must be in [2, 12], got {n_landmarks}.")
    if not 200 <= int(hires_px) <= 4000:
        raise ValueError(f"hires_px must be in [200, 4000], got {hires_px}.")
    names = (
        "tissue",
        "geometry",
        "warp",
        "genes",
        "xcells",
        "vcells",
        "xcounts",
        "vcounts",
        "render",
        "lm",
        "bc",
        "tx",
    )
    # the family's name is part of the seed: one seed gives each family its own placement, stain, landmarks
    root = np.random.SeedSequence([int(seed), zlib.crc32(model_cls.name.encode())])
    rng = dict(zip(names, (np.random.default_rng(s) for s in root.spawn(len(names))), strict=True))
    g = rng["geometry"]
    # every draw happens whether or not the value is given, so one override leaves the others unchanged
    drawn = dict(
        rotation_deg=g.uniform(0.0, 360.0),
        flip=bool(g.uniform() < 0.5),
        anisotropy=g.uniform(0.03, 0.10) * g.choice([-1.0, 1.0]),
        um_per_px=g.uniform(0.3, 0.6),
        xenium_fraction=g.uniform(0.65, 0.85),
        capture_fraction=g.uniform(0.75, 0.9),
        visium_loss=g.uniform(0.03, 0.08),
        n_landmarks=int(g.integers(3, 7)),
        noise=g.uniform(*landmark_noise_um, size=12),
        noise_dir=g.uniform(0, 2 * np.pi, size=12),
        stain=model_cls.stain,
    )
    given = dict(
        rotation_deg=rotation_deg, flip=flip, anisotropy=anisotropy, um_per_px=um_per_px, stain=stain,
        xenium_fraction=xenium_fraction, capture_fraction=capture_fraction, n_landmarks=n_landmarks,
    )  # fmt: skip
    P = {k: (drawn[k] if given.get(k) is None else given[k]) for k in drawn}
    if not 0.05 <= P["um_per_px"] <= 5:
        raise ValueError(f"um_per_px must be in [0.05, 5] µm per full-res pixel, got {P['um_per_px']}.")
    if not abs(P["anisotropy"]) < 0.5:
        raise ValueError(f"anisotropy must be in (-0.5, 0.5), got {P['anisotropy']}.")
    for k in ("xenium_fraction", "capture_fraction"):
        if not 0.2 <= P[k] <= 1.0:
            raise ValueError(f"{k} must be in [0.2, 1], got {P[k]}.")
    # smaller sections than the family's default get a proportionally smaller, shorter warp (same strain)
    shrink = min(1.0, size_mm / model_cls.default_size_mm)
    warp_um = float(model_cls.warp_um * shrink if warp is None else warp)
    warp_length = model_cls.warp_length_um * shrink
    bar = tqdm(total=7, desc=f"{model_cls.name} pair", disable=not progress)
    timings: dict[str, float] = {}
    tick = [time.perf_counter()]

    def done(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - tick[0], 3)
        tick[0] = now
        bar.set_postfix_str(stage)
        bar.update()

    # ------------------------------------------------------------------ tissue and sections
    fam = model_cls(rng["tissue"], size_mm * 1000.0, **family_options)
    X, Y = fam.sd.xy()
    tissue = fam.sd.data > 0
    pieces, missing = fam.damage(rng["tissue"])
    vis_sd = np.minimum(fam.sd.data, _wavy_cut(g, X, Y, tissue, P["visium_loss"], g.uniform(0, 2 * np.pi)))
    vis_sd_intact = vis_sd.copy()
    if missing is not None:
        vis_sd = np.minimum(vis_sd, -signed_distance(missing, fam.raster_um))
    vis_raster = _he.Raster(fam.sd.origin, fam.raster_um, vis_sd)
    done("tissue")

    # ------------------------------------------------------------------ deformation
    pts = np.column_stack([X[tissue], Y[tissue]])
    sub = pts[np.random.default_rng(0).choice(len(pts), size=min(len(pts), 20_000), replace=False)]
    bbox = fam.bbox()
    smooth = _deform.draw(fam.deformation, rng["warp"], bbox, sub, warp_um, warp_length)

    # ------------------------------------------------------------------ slide geometry
    th = np.radians(P["rotation_deg"])
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    RF = R @ (np.diag([-1.0, 1.0]) if P["flip"] else np.eye(2))
    s = 1.0 / P["um_per_px"]
    S = np.diag([s * (1 + P["anisotropy"] / 2), s * (1 - P["anisotropy"] / 2)])
    pre = PairTruth(fam.name, np.eye(3), smooth, pieces, 1.0, np.zeros(2), 1.0, np.zeros((1, 1), np.uint8))
    vis_pts = np.column_stack([X[vis_sd > 0], Y[vis_sd > 0]])
    vis_sub = vis_pts[np.random.default_rng(1).choice(len(vis_pts), size=min(len(vis_pts), 40_000), replace=False)]
    w = pre.to_section(vis_sub) @ RF.T  # Visium tissue in the (unshifted) slide frame
    lo, hi = w.min(axis=0), w.max(axis=0)
    cap_lo, cap_hi = lo - SPOT_GRID_PAD_UM, hi + SPOT_GRID_PAD_UM
    cap_axis, cap_low_side = int(g.integers(2)), bool(g.uniform() < 0.5)
    if P["capture_fraction"] < 1.0:
        if cap_low_side:
            cap_lo[cap_axis] = np.quantile(w[:, cap_axis], 1.0 - P["capture_fraction"])
        else:
            cap_hi[cap_axis] = np.quantile(w[:, cap_axis], P["capture_fraction"])
    t_slide = -cap_lo
    e_lo = np.minimum(np.zeros(2), lo + t_slide) - IMAGE_PAD_UM
    e_hi = np.maximum(cap_hi - cap_lo, hi + t_slide) + IMAGE_PAD_UM
    slide_affine = np.eye(3)
    slide_affine[:2, :2], slide_affine[:2, 2] = S, -S @ e_lo
    affine = np.eye(3)
    affine[:2, :2], affine[:2, 2] = S @ RF, S @ (t_slide - e_lo)
    width, height = int(np.ceil(S[0, 0] * (e_hi[0] - e_lo[0]))), int(np.ceil(S[1, 1] * (e_hi[1] - e_lo[1])))
    spot_d = VISIUM_SPOT_DIAMETER_UM * float(np.sqrt(S[0, 0] * S[1, 1]))
    s_hi = int(hires_px) / max(width, height)
    s_lo = LOWRES_PX / max(width, height)
    hires_shape = (round(height * s_hi), round(width * s_hi))
    scalefactors = {
        "spot_diameter_fullres": spot_d,
        "tissue_hires_scalef": s_hi,
        "fiducial_diameter_fullres": spot_d * 1.6153846153846154,
        "tissue_lowres_scalef": s_lo,
    }
    truth = PairTruth(
        family=fam.name,
        affine=affine,
        warp=smooth,
        pieces=pieces,
        um_per_px=VISIUM_SPOT_DIAMETER_UM / spot_d,
        status_origin=np.zeros(2),
        status_spacing=1.0,
        status_grid=np.zeros((1, 1), np.uint8),
        slide_affine=slide_affine,
        capture_area=np.array([0.0, cap_hi[0] - cap_lo[0], 0.0, cap_hi[1] - cap_lo[1]]),
        seed=int(seed),
    )

    # ------------------------------------------------------------------ status raster (what can be scored)
    step = 2
    st_X, st_Y = X[::step, ::step], Y[::step, ::step]
    st = np.zeros(st_X.shape, np.uint8)
    st_t = tissue[::step, ::step]
    st[st_t] = _CODE["not_in_visium"]
    st[st_t & (vis_sd_intact[::step, ::step] > 0)] = _CODE["valid"]
    if missing is not None:
        st[st_t & missing[::step, ::step] & (vis_sd_intact[::step, ::step] > 0)] = _CODE["missing_piece"]
    truth.status_origin = fam.sd.origin.copy()
    truth.status_spacing = fam.raster_um * step
    truth.status_grid = st  # (tissue > 0 is what the pieces' preimages below need)
    if pieces:
        sp = np.column_stack([st_X.ravel(), st_Y.ravel()])
        k = truth.piece_of(sp).reshape(st.shape)
        ok = st == _CODE["valid"]
        for i, p in enumerate(pieces):
            code = _CODE["fold_flap"] if p.kind == "fold" else _CODE["tear_piece"]
            st[ok & (k == i + 1)] = code
        folds = [i + 1 for i, p in enumerate(pieces) if p.kind == "fold"]
        if folds:  # tissue under a folded flap
            cand = np.flatnonzero((st.ravel() == _CODE["valid"]) & (k.ravel() == 0))
            top = truth.preimages(truth.forward(sp[cand]))[1]
            fine = np.isfinite(top[:, 0])
            under = np.zeros(len(cand), bool)
            under[fine] = np.isin(truth.piece_of(top[fine]), folds) & (vis_raster.sample(top[fine], order=0) > 0)
            st.ravel()[cand[under]] = _CODE["under_fold"]
    done("geometry")

    # ------------------------------------------------------------------ the Xenium region (part of the capture area)
    def useful(p):  # most of the tissue cut from the Xenium region lies in the capture area, in the Visium section
        p = p[:: max(1, len(p) // 3000)]
        return len(p) > 0 and (truth.in_capture_area(p) & (vis_raster.sample(p, order=0) > 0)).mean() > 0.4

    roi, roi_sides = _rect_roi(g, X, Y, tissue, P["xenium_fraction"], useful)
    xen_mask = tissue & _in_rect(np.column_stack([X.ravel(), Y.ravel()]), roi).reshape(X.shape)
    xen_area_mm2 = float(xen_mask.sum()) * fam.raster_um**2 / 1e6

    # ------------------------------------------------------------------ cells of both sections
    n_target = round(density * xen_area_mm2)
    xen_raster = _he.Raster(fam.sd.origin, fam.raster_um, xen_mask.astype(np.float32))
    oversample = 1.3
    for _ in range(4):  # the structures in the Xenium region may hold fewer cells than the tissue's average
        xy_x, ty_x = fam.sample_cells(rng["xcells"], density * oversample)
        in_x = (xen_raster.sample(xy_x, order=0) > 0.5) & _in_rect(xy_x, roi)
        xy_x, ty_x = xy_x[in_x], ty_x[in_x]
        if len(xy_x) >= n_target:
            break
        oversample *= 2.0
    keep_p = min(1.0, n_target / max(len(xy_x), 1))
    sel = np.sort(rng["xcells"].choice(len(xy_x), size=min(n_target, len(xy_x)), replace=False))
    xy_x, ty_x = xy_x[sel], ty_x[sel]
    xy_v, ty_v = fam.sample_cells(rng["vcells"], density * oversample)
    in_v = vis_raster.sample(xy_v, order=0) > 0
    xy_v, ty_v = xy_v[in_v], ty_v[in_v]
    kv = rng["vcells"].uniform(size=len(xy_v)) < keep_p
    xy_v, ty_v = xy_v[kv], ty_v[kv]
    done("cells")

    # ------------------------------------------------------------------ counts
    genes = make_genes(rng["genes"], int(n_xenium_genes), int(n_visium_genes))
    egfr_x = fam.egfr(xy_x)
    xen = _xenium_tables(rng["xcounts"], genes, ty_x, egfr_x)
    xen["cells"]["x_centroid"] = np.round(xy_x[:, 0], 4)
    xen["cells"]["y_centroid"] = np.round(xy_x[:, 1], 4)
    dy, dx = VISIUM_SPOT_PITCH_UM * np.sqrt(3.0) / 2.0, VISIUM_SPOT_PITCH_UM / 2.0
    grid_w, grid_h = truth.capture_area[1], truth.capture_area[3]
    C, Rr = np.meshgrid(np.arange(int(grid_w // dx) + 1), np.arange(int(grid_h // dy) + 1))
    hexa = (C % 2) == (Rr % 2)
    array_row, array_col = Rr[hexa].astype(np.int64), C[hexa].astype(np.int64)
    pxl = np.rint(np.column_stack([array_col * dx, array_row * dy]) @ S.T + slide_affine[:2, 2])
    spot_slide = (pxl - slide_affine[:2, 2]) @ np.linalg.inv(S).T
    bottom, top = truth.preimages(pxl)
    in_tissue = np.zeros(len(pxl), bool)
    for q in (bottom, top):
        f = np.isfinite(q[:, 0])
        in_tissue[f] |= vis_raster.sample(q[f], order=1) > 0
    in_tissue = in_tissue.astype(np.int64)
    cell_slide = truth.to_slide(xy_v)
    dist, idx = cKDTree(spot_slide).query(cell_slide, k=1, distance_upper_bound=VISIUM_SPOT_DIAMETER_UM / 2)
    tis = np.flatnonzero(in_tissue == 1)
    row_of = np.full(len(pxl) + 1, -1)
    row_of[tis] = np.arange(len(tis))
    rows = row_of[np.where(np.isfinite(dist), idx, len(pxl))]
    under = rows >= 0
    vcounts = _visium_counts(rng["vcounts"], genes, rows[under], len(tis), ty_v[under], fam.egfr(xy_v[under]))
    n_cells_spot = np.bincount(idx[np.isfinite(dist)], minlength=len(pxl))
    done("counts")

    # ------------------------------------------------------------------ H&E
    style = _he.draw_style(rng["render"], P["stain"])
    pb = _he.pullback(truth, hires_shape, s_hi)
    member = _he.Raster(fam.sd.origin, fam.raster_um, 0.5 * (1 + np.tanh(0.5 * vis_sd / EDGE_SOFTNESS_UM)))
    amt = _he.composite(pb, fam.channels, weight=member)
    amounts = {n: amt[i] for i, n in enumerate(fam.channel_names)}
    um_img = truth.um_per_px / s_hi
    radius = np.array([NUCLEUS_RADIUS_UM[t] for t in CELL_TYPES])[ty_v]
    nuc = _he.nuclei_image(hires_shape, truth.forward(xy_v) * s_hi, radius, um_img, fam.nucleus_style)
    amounts["hematoxylin"] = amounts["hematoxylin"] + fam.nucleus_od * np.clip(nuc, 0, 1.5).astype(np.float32)
    hires = _he.finish(fam.colourise(amounts, style, rng["render"]), style, rng["render"])
    lowres = downscale(hires, (round(height * s_lo), round(width * s_lo)))
    done("H&E")

    # ------------------------------------------------------------------ landmarks
    cand, cand_names = fam.landmark_candidates()
    xen_sd = _he.Raster(fam.sd.origin, fam.raster_um, signed_distance(xen_mask, fam.raster_um))
    margin = 60.0

    def usable(p):
        if len(p) == 0:
            return np.zeros(0, bool)
        s_ = truth.to_slide(p)
        in_img = (s_[:, 0] > e_lo[0] + margin) & (s_[:, 0] < e_hi[0] - margin)
        return np.isin(truth.status(p), (1,)) & (xen_sd.sample(p) > margin) & (vis_raster.sample(p) > margin) & in_img

    cand = np.asarray(cand, float).reshape(-1, 2)
    ok = usable(cand)
    cand, cand_names = cand[ok], [n for n, o in zip(cand_names, ok, strict=True) if o]
    n_lm = int(P["n_landmarks"])
    extra = pts[np.random.default_rng(2).choice(len(pts), size=min(len(pts), 4000), replace=False)]
    extra = extra[usable(extra)]
    spread = float(np.ptp(extra, axis=0).max()) if len(extra) else 0.0
    if len(cand) < n_lm or float(np.ptp(cand, axis=0).max()) < 0.5 * spread:
        # too few or too clustered structures: well-spread tissue points as well (a user spreads the clicks)
        cand = np.vstack([cand, extra])
        cand_names = cand_names + [f"tissue_{i}" for i in range(len(extra))]
    pick = _farthest(cand, n_lm)
    lm_src = cand[pick]
    lm_names = [cand_names[i] for i in pick]
    lm_dst = truth.forward(lm_src)
    noise = P["noise"][: len(pick)]
    ang = P["noise_dir"][: len(pick)]
    lm_noisy = lm_dst + np.column_stack([np.cos(ang), np.sin(ang)]) * (noise / truth.um_per_px)[:, None]
    truth.landmarks_source, truth.landmarks_target, truth.landmarks_target_noisy = lm_src, lm_dst, lm_noisy
    truth.landmark_names, truth.landmark_noise_um = lm_names, noise
    done("landmarks")

    # ------------------------------------------------------------------ write
    from ._tenx import write_visium, write_xenium

    for p in subdirs:
        if p.exists() and overwrite:
            shutil.rmtree(p)
    tx = _transcripts(rng["tx"], xen, xy_x) if transcripts else None
    xenium_path = write_xenium(
        out_dir / XENIUM_DIRNAME,
        cells=xen["cells"],
        counts=xen["counts"],
        feature_ids=xen["feature_ids"],
        feature_names=xen["feature_names"],
        feature_types=xen["feature_types"],
        transcripts=tx,
        overwrite=overwrite,
    )
    visium_path = write_visium(
        out_dir / VISIUM_DIRNAME / "outs",
        barcodes=_barcodes(rng["bc"], len(pxl)),
        in_tissue=in_tissue,
        array_row=array_row,
        array_col=array_col,
        pxl_row_in_fullres=pxl[:, 1],
        pxl_col_in_fullres=pxl[:, 0],
        counts=vcounts,
        feature_ids=genes.ids[genes.visium],
        feature_names=genes.symbols[genes.visium],
        scalefactors=scalefactors,
        hires_image=hires,
        lowres_image=lowres,
        overwrite=overwrite,
    )
    truth_path = out_dir / TRUTH_DIRNAME
    status_x = truth.status(xy_x)
    params = {
        "family": fam.name,
        "seed": int(seed),
        "density": density,
        "density_realised": len(xy_x) / xen_area_mm2,
        "size_mm": size_mm,
        "deformation": fam.deformation,
        "warp_um": warp_um,
        "warp_max_um": smooth.max_displacement(sub),
        "warp_length_um": warp_length,
        "rotation_deg": float(P["rotation_deg"]),
        "flip": bool(P["flip"]),
        "anisotropy": float(P["anisotropy"]),
        "um_per_px": float(P["um_per_px"]),
        "stain": P["stain"],
        "stain_style": style.as_dict(),
        "xenium_fraction": float(P["xenium_fraction"]),
        "xenium_roi_um": roi.tolist(),
        "xenium_roi_sides": roi_sides,
        "xenium_area_mm2": xen_area_mm2,
        "tissue_area_mm2": fam.area_mm2(),
        "capture_fraction": float(P["capture_fraction"]),
        "visium_loss": float(P["visium_loss"]),
        "pieces": [p.kind for p in pieces],
        "missing_piece": missing is not None,
        "n_landmarks": len(pick),
        "landmark_noise_um": list(landmark_noise_um),
        "hires_px": int(hires_px),
        "transcripts": bool(transcripts),
        "valid_fraction": float(np.isin(status_x, VALID_CODES).mean()) if len(status_x) else 0.0,
        "scalefactors": scalefactors,
        "family_options": family_options,
    }
    truth.params = params
    truth.save(truth_path)
    write_landmark_files(truth_path, truth)
    pd.DataFrame(
        {
            "cell_id": xen["cells"]["cell_id"].to_numpy(),
            "x": xy_x[:, 0],
            "y": xy_x[:, 1],
            "cell_type": np.asarray(CELL_TYPES)[ty_x],
            "egfr_field": egfr_x,
            "status": np.asarray([STATUS[c] for c in range(len(STATUS))])[status_x],
            "valid": np.isin(status_x, VALID_CODES),
        }
    ).to_parquet(truth_path / "xenium_cells.parquet", index=False)
    barcodes = pd.read_csv(Path(visium_path) / "spatial" / "tissue_positions.csv")["barcode"].to_numpy()
    spot_um = bottom
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "x_um": spot_um[:, 0],
            "y_um": spot_um[:, 1],
            "n_cells": n_cells_spot,
        }
    ).to_parquet(truth_path / "visium_spots.parquet", index=False)
    genes.to_csv(truth_path / "genes.csv")
    done("write")
    bar.close()
    params["timings_s"] = timings
    params["total_s"] = round(time.perf_counter() - t_start, 3)
    return SyntheticPair(
        family=fam.name,
        xenium_path=Path(xenium_path),
        visium_path=Path(visium_path),
        truth_path=truth_path,
        truth=truth,
        seed=int(seed),
        density=len(xy_x) / xen_area_mm2,
        n_cells=len(xy_x),
        n_cells_visium=len(xy_v),
        n_spots=len(pxl),
        n_spots_in_tissue=int(in_tissue.sum()),
        shared_genes=sorted(str(x) for x in genes.symbols[genes.shared]),
        params=params,
    )


def load_pair(out_dir) -> SyntheticPair:
    """Reopen a pair folder written by any family or by :func:`~spatialdata_align.datasets.twin_sections`.

    Parameters
    ----------
    out_dir
        The folder holding ``xenium/``, ``visium/outs/`` and ``truth/``.

    Returns
    -------
    :class:`SyntheticPair` whose ``truth`` is a :class:`~spatialdata_align.datasets.PairTruth` (families) or a
    :class:`~spatialdata_align.datasets.TwinPairTruth` (twin sections): both score the same way.
    """
    from ._pairtruth import load_pair_truth

    out_dir = Path(out_dir)
    truth = load_pair_truth(out_dir)
    tp = out_dir / TRUTH_DIRNAME
    genes = pd.read_csv(tp / "genes.csv")
    shared = sorted(genes.loc[genes["in_xenium"] & genes["in_visium"], "gene"])
    if isinstance(truth, PairTruth):
        p = truth.params
        cells = pd.read_parquet(tp / "xenium_cells.parquet", columns=["x"])
        spots = pd.read_parquet(tp / "visium_spots.parquet", columns=["in_tissue"])
        n_cells, n_spots, n_in = len(cells), len(spots), int(spots["in_tissue"].sum())
        density, n_vis, seed = n_cells / p["xenium_area_mm2"], -1, int(p["seed"])
    else:
        meta = json.loads((tp / "truth.json").read_text())
        p, sizes = meta["params"], meta["sizes"]
        n_cells, n_spots, n_in, n_vis = (
            sizes["n_cells"],
            sizes["n_spots"],
            sizes["n_spots_in_tissue"],
            sizes["n_cells_visium"],
        )
        density, seed = float("nan"), int(p["seed"])
    return SyntheticPair(
        family=truth.family,
        xenium_path=out_dir / XENIUM_DIRNAME,
        visium_path=out_dir / VISIUM_DIRNAME / "outs",
        truth_path=tp,
        truth=truth,
        seed=seed,
        density=density,
        n_cells=n_cells,
        n_cells_visium=n_vis,
        n_spots=n_spots,
        n_spots_in_tissue=n_in,
        shared_genes=shared,
        params=dict(p),
    )


__all__ = ["FamilyModel", "SmoothWarp", "SyntheticPair", "build_pair", "load_pair"]
