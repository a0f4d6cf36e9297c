"""``twin_sections``: a Xenium folder and a Visium ``outs/`` folder from one ground-truth tissue."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM
from .._landmark_files import write_landmarks_csv
from ._genes import XENIUM_CONTROLS, GeneSets, make_genes
from ._render import downscale, render_he
from ._tissue import CELL_TYPES, EGFR_LOW, EGFR_SPAN, REGIONS, TissueModel, make_tissue
from ._truth import LANDMARKS_CSV, TRUTH_DIRNAME, Truth, make_warp

#: hex-grid tissue area per Visium spot (µm²): pitch² * sqrt(3) / 2
SPOT_AREA_UM2 = VISIUM_SPOT_PITCH_UM**2 * np.sqrt(3.0) / 2.0
#: target hires pixel size (µm); the hires image is capped at 2000 px on its long side, like Space Ranger
HIRES_UM_PER_PX = 3.0
HIRES_MAX_PX = 2000
HIRES_MIN_PX = 800
LOWRES_PX = 600
#: margins (µm) of the spot grid around the Visium tissue and of the image around the grid
SPOT_GRID_PAD_UM = 150.0
IMAGE_PAD_UM = 250.0
#: mean cell area (µm²) per type; nucleus area is 30-50 % of it
CELL_AREA_UM2 = {
    "tumour": 120.0,
    "luminal": 100.0,
    "myoepithelial": 80.0,
    "fibroblast": 90.0,
    "endothelial": 70.0,
    "t_cell": 40.0,
    "b_cell": 45.0,
    "macrophage": 90.0,
}
#: Visium HD bin sizes (µm) written by default, as Space Ranger does
HD_BINS = (2, 8, 16)
XENIUM_DIRNAME = "xenium"
VISIUM_DIRNAME = "visium"
_VISIUM_DISPERSION = 8.0  # negative-binomial shape of the Visium counts
_UNASSIGNED_FRACTION = 0.05  # extra transcripts outside cells


@dataclass
class TwinSections:
    """What :func:`twin_sections` wrote, and the ground truth behind it.

    Attributes
    ----------
    xenium_path
        The Xenium output folder.
    visium_path
        The Space Ranger ``outs/`` folder.
    truth_path
        Folder holding ``truth.npz``, ``truth.json``, ``landmarks.csv``, ``genes.csv``,
        ``xenium_cells.parquet`` (per-cell type/region/EGFR field) and ``visium_spots.parquet``.
    truth
        :class:`~spatialdata_align.datasets.Truth`: the Xenium µm -> Visium full-res px map, both
        ways, the landmarks and the tissue.
    seed
        The seed.
    n_cells, n_cells_visium
        Cells in the Xenium section (written) and in the Visium section (behind the spot counts
        and the nuclei of the H&E).
    n_spots, n_spots_in_tissue
        Spots on the capture grid, and those under tissue (rows of the Visium matrix).
    xenium_genes, visium_genes, shared_genes
        Gene symbols measured by each platform and by both.
    scalefactors
        The Visium ``scalefactors_json.json`` content.
    params
        Every generation parameter (as passed or drawn from the seed).
    """

    xenium_path: Path
    visium_path: Path
    truth_path: Path
    truth: Truth
    seed: int
    n_cells: int
    n_cells_visium: int
    n_spots: int
    n_spots_in_tissue: int
    xenium_genes: list[str]
    visium_genes: list[str]
    shared_genes: list[str]
    scalefactors: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def tissue(self) -> TissueModel:
        """The ground-truth tissue model (also ``truth.tissue``)."""
        return self.truth.tissue

    @property
    def landmarks_path(self) -> Path:
        """``truth/landmarks.csv``: landmark pairs (Xenium µm -> Visium full-res px)."""
        return self.truth_path / LANDMARKS_CSV

    def xenium_cells_truth(self) -> pd.DataFrame:
        """Per Xenium cell: ``cell_id``, ``x``, ``y`` (µm), ``cell_type``, ``region``, ``egfr_field``, ``shared``."""
        return pd.read_parquet(self.truth_path / "xenium_cells.parquet")

    def visium_spots_truth(self) -> pd.DataFrame:
        """Per Visium spot: ``barcode``, ``in_tissue``, ``x_um``/``y_um`` (Xenium frame), ``n_cells``, ``shared``."""
        return pd.read_parquet(self.truth_path / "visium_spots.parquet")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def twin_sections(
    out_dir,
    *,
    n_cells: int = 20000,
    n_spots: int = 500,
    seed: int = 0,
    warp: float = 40.0,
    flip: bool = False,
    layout: str = "minimal",
    rotation_deg: float | None = None,
    um_per_px: float | None = None,
    anisotropy: float = 0.03,
    xenium_trim: float = 0.05,
    capture_trim: float = 0.08,
    warp_length: float = 500.0,
    n_xenium_genes: int = 300,
    n_visium_genes: int = 3000,
    transcripts: bool = True,
    cells_format: str = "csv.gz",
    matrix_format: str = "h5",
    transcripts_format: str = "parquet",
    positions_file: str = "tissue_positions.csv",
    xenium_pixel_size: float = 0.85,
    visium_hd: bool = False,
    hd_bins=HD_BINS,
    overwrite: bool = True,
    progress: bool = False,
) -> TwinSections:
    """Write synthetic adjacent Xenium and Visium sections of one tissue, with the true alignment.

    One ground-truth tissue (tumour nests, ducts, immune aggregates, stroma; an asymmetric outline)
    is cut into two serial sections with different cells. The Xenium section becomes a Xenium
    output folder (cells in µm, per-cell counts from cell-type programmes, control probes,
    optional transcripts); the Visium section becomes a Space Ranger ``outs/`` folder (spots on a
    100 µm hex grid, counts of the cells under each 55 µm spot, an H&E image rendered from the
    tissue and the section's nuclei). The Visium section is placed by the true map: an affine
    (rotation, anisotropic scale, translation, optional reflection) after a smooth non-linear warp.

    Parameters
    ----------
    out_dir
        Output folder: ``xenium/``, ``visium/outs/`` and ``truth/`` are written in it.
    n_cells
        Cells in the Xenium section (sets the cell density). The default, 20 000 cells over the
        ~4.3 mm² of 500 spots, is about 4 000 cells per mm², as in real breast tissue; much sparser
        sections make density-based registration noisier (two serial sections share no cells).
    n_spots
        Approximate number of in-tissue Visium spots (sets the tissue area,
        ``n_spots * 8660 µm²`` for the Visium section).
    seed
        Random seed; the same seed gives the same files.
    warp
        Largest displacement (µm) of the non-linear part over the tissue; ``0`` gives a pure affine.
    flip
        The Visium section is mirrored (placed upside down).
    layout
        Xenium folder layout: ``"minimal"`` (cells table, matrix, transcripts) or ``"full"``
        (a complete XOA 2.0 folder that :func:`spatialdata_io.xenium` reads).
    rotation_deg
        Rotation (degrees, counter-clockwise in (x, y)) of the Visium section; default drawn in
        ``[20, 40]``.
    um_per_px
        µm per Visium full-resolution pixel; default drawn in ``[0.4, 0.6]``.
    anisotropy
        Relative difference of the x and y pixel scales.
    xenium_trim
        Area fraction of the tissue left out of the Xenium region (a strip on one side).
    capture_trim
        Area fraction of the Visium section outside the capture area (no spots there, though
        the H&E image shows it), on a side of the capture frame. With the defaults most of the
        tissue is shared, some Xenium tissue has no spots and some spots have no Xenium cells.
    warp_length
        Length scale (µm) of the warp.
    n_xenium_genes, n_visium_genes
        Sizes of the Xenium panel and of the Visium gene set.
    transcripts
        Write ``transcripts.parquet`` (one row per counted molecule plus 5 % unassigned).
    cells_format, matrix_format, transcripts_format, positions_file
        File-format variants: ``"csv.gz"``/``"parquet"`` cells table, ``"h5"``/``"mtx"``
        matrices (both platforms), ``"parquet"``/``"csv.gz"`` transcripts,
        ``"tissue_positions.csv"``/``"tissue_positions_list.csv"``.
    xenium_pixel_size
        Pixel size (µm) of the morphology image and label masks of the ``"full"`` layout
        (coarser than the instrument's 0.2125 µm to keep files small).
    visium_hd
        Write the Visium section as a **Visium HD** ``outs/`` folder instead
        (``binned_outputs/square_002um|008um|016um/`` with the filtered matrix, parquet positions,
        scale factors incl. ``microns_per_pixel`` / ``bin_size_um``, the images, and
        ``feature_slice.h5``): the molecules of the section's cells counted in square bins (see
        ``hd_bins``); the H&E, the truth and the Xenium folder are those of the Visium layout.
        ``n_spots`` still sets the tissue area; ``n_spots`` / ``n_spots_in_tissue`` of the result
        count the largest bins.
    hd_bins
        HD bin sizes (µm), each a multiple of the previous; default ``(2, 8, 16)``.
    overwrite
        Replace existing ``xenium/``, ``visium/`` and ``truth/`` folders in ``out_dir``.
    progress
        Show a progress bar over the stages.

    Returns
    -------
    :class:`TwinSections`.

    Examples
    --------
    >>> twin = sda.datasets.twin_sections("data/twin", seed=1)  # doctest: +SKIP
    >>> px = twin.truth.forward(cells_xy_um)  # doctest: +SKIP
    """
    _check_choice("layout", layout, ("minimal", "full"))
    _check_choice("cells_format", cells_format, ("csv.gz", "parquet"))
    _check_choice("matrix_format", matrix_format, ("h5", "mtx"))
    _check_choice("transcripts_format", transcripts_format, ("parquet", "csv.gz"))
    _check_choice("positions_file", positions_file, ("tissue_positions.csv", "tissue_positions_list.csv"))
    if visium_hd:
        hd_bins = _hd_levels(hd_bins)
    if int(n_cells) < 50:
        raise ValueError(f"n_cells must be >= 50, got {n_cells}.")
    if int(n_spots) < 30:
        raise ValueError(f"n_spots must be >= 30, got {n_spots}.")
    if um_per_px is not None and not 0.05 <= um_per_px <= 5:
        raise ValueError(f"um_per_px must be in [0.05, 5] µm per full-res pixel, got {um_per_px}.")
    if not 0 <= anisotropy < 0.5:
        raise ValueError(f"anisotropy must be in [0, 0.5), got {anisotropy}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a folder.")
    subdirs = [out_dir / XENIUM_DIRNAME, out_dir / VISIUM_DIRNAME, out_dir / TRUTH_DIRNAME]
    existing = [p for p in subdirs if p.exists() and any(p.iterdir())]
    if existing and not overwrite:
        raise FileExistsError(f"{[str(p) for p in existing]} exist and are not empty; pass overwrite=True.")

    params = dict(
        n_cells=int(n_cells), n_spots=int(n_spots), seed=int(seed), warp=float(warp), flip=bool(flip),
        layout=layout, anisotropy=float(anisotropy), xenium_trim=float(xenium_trim),
        capture_trim=float(capture_trim), warp_length=float(warp_length),
        n_xenium_genes=int(n_xenium_genes), n_visium_genes=int(n_visium_genes), transcripts=bool(transcripts),
        cells_format=cells_format, matrix_format=matrix_format, transcripts_format=transcripts_format,
        positions_file=positions_file, xenium_pixel_size=float(xenium_pixel_size), visium_hd=bool(visium_hd),
    )  # fmt: skip
    if visium_hd:
        params["hd_bins"] = list(hd_bins)
    stages = ["tissue", "cells", "xenium counts", "visium spots", "H&E", "write"]
    bar = tqdm(total=len(stages), desc="twin sections", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    # independent streams, so a format switch never changes the biology
    names = ("tissue", "genes", "geometry", "xcells", "vcells", "xcounts", "vcounts", "render", "tx", "barcodes")
    rng = dict(
        zip(names, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(names))), strict=True)
    )

    # ---------------------------------------------------------------- tissue, genes, geometry
    step("tissue")
    if not 0 <= capture_trim < 0.5:
        raise ValueError(f"capture_trim must be in [0, 0.5), got {capture_trim}.")
    tissue = make_tissue(rng["tissue"], int(n_spots) * SPOT_AREA_UM2 / (1.0 - capture_trim), float(xenium_trim), 0.0)
    genes = make_genes(rng["genes"], int(n_xenium_genes), int(n_visium_genes))
    g = rng["geometry"]
    rot = float(g.uniform(20.0, 40.0)) if rotation_deg is None else float(rotation_deg)
    upp = float(g.uniform(0.4, 0.6)) if um_per_px is None else float(um_per_px)
    centres, coefs = make_warp(g, tissue.bbox(), float(warp), float(warp_length))
    params.update(rotation_deg=rot, um_per_px=upp)
    geo = _geometry(
        g, tissue, centres, coefs, float(warp_length), rot, upp, float(anisotropy), bool(flip), float(capture_trim)
    )
    truth = geo["truth"]
    truth.seed = int(seed)
    if warp > 0 and truth.jacobian_det_min() < 0.2:
        raise ValueError(
            f"warp={warp} µm is too strong for warp_length={warp_length} µm (the map would fold); "
            "use a smaller warp or a longer warp_length."
        )
    bar.update()

    # ---------------------------------------------------------------- cells of both sections
    step("cells")
    x_xy, x_type, x_region, used = tissue.sample_cells(rng["xcells"], "xenium", n=int(n_cells))
    v_xy, v_type, _, _ = tissue.sample_cells(rng["vcells"], "visium", n_candidates=used)
    bar.update()

    # ---------------------------------------------------------------- Xenium counts
    step("xenium counts")
    xen = _xenium_tables(rng["xcounts"], genes, tissue, x_xy, x_type)
    bar.update()

    # ---------------------------------------------------------------- Visium spots and counts
    step("visium spots")
    if visium_hd:
        hd = _visium_hd_bins(rng["vcounts"], genes, tissue, truth, geo, v_xy, v_type, hd_bins)
        coarse = hd[max(hd_bins)]
        from ._tenx import hd_barcodes

        vis = {
            "barcodes": hd_barcodes(max(hd_bins), coarse["array_row"], coarse["array_col"]),
            "in_tissue": coarse["in_tissue"],
            "pxl": np.column_stack([coarse["pxl_col_in_fullres"], coarse["pxl_row_in_fullres"]]),
            "n_cells": coarse["n_cells"],
        }
    else:
        vis = _visium_tables(rng["vcounts"], rng["barcodes"], genes, tissue, truth, geo, v_xy, v_type)
    bar.update()

    # ---------------------------------------------------------------- H&E
    step("H&E")
    hires = render_he(
        tissue, truth, geo["hires_shape"], geo["scalefactors"]["tissue_hires_scalef"], v_xy, v_type, rng["render"]
    )
    lowres = downscale(hires, geo["lowres_shape"])
    bar.update()

    # ---------------------------------------------------------------- landmarks
    src, lm_names = _landmarks(truth)
    truth.landmarks_source = src
    truth.landmarks_target = truth.forward(src)
    truth.landmark_names = lm_names

    # ---------------------------------------------------------------- write
    step("write")
    from ._tenx import write_visium, write_xenium

    for p in subdirs:
        if p.exists() and overwrite:
            shutil.rmtree(p)
    tx = _transcripts(rng["tx"], xen, tissue, x_xy) if transcripts else None
    xenium_path = write_xenium(
        out_dir / XENIUM_DIRNAME,
        cells=xen["cells"],
        counts=xen["counts"],
        feature_ids=xen["feature_ids"],
        feature_names=xen["feature_names"],
        feature_types=xen["feature_types"],
        transcripts=tx,
        pixel_size=float(xenium_pixel_size),
        layout=layout,
        cells_format=cells_format,
        matrix_format=matrix_format,
        transcripts_format=transcripts_format,
        overwrite=overwrite,
    )
    if visium_hd:
        from ._tenx import write_visium_hd

        sf = geo["scalefactors"]
        visium_path = write_visium_hd(
            out_dir / VISIUM_DIRNAME / "outs",
            bins=hd,
            feature_ids=genes.ids[genes.visium],
            feature_names=genes.symbols[genes.visium],
            scalefactors={
                "microns_per_pixel": truth.um_per_px,
                "tissue_hires_scalef": sf["tissue_hires_scalef"],
                "tissue_lowres_scalef": sf["tissue_lowres_scalef"],
                "regist_target_img_scalef": sf["tissue_hires_scalef"],
                "fiducial_diameter_fullres": sf["fiducial_diameter_fullres"],
            },
            hires_image=hires,
            lowres_image=lowres,
            feature_slice=True,
            overwrite=overwrite,
        )
    else:
        visium_path = write_visium(
            out_dir / VISIUM_DIRNAME / "outs",
            barcodes=vis["barcodes"],
            in_tissue=vis["in_tissue"],
            array_row=vis["array_row"],
            array_col=vis["array_col"],
            pxl_row_in_fullres=vis["pxl"][:, 1],
            pxl_col_in_fullres=vis["pxl"][:, 0],
            counts=vis["counts"],
            feature_ids=genes.ids[genes.visium],
            feature_names=genes.symbols[genes.visium],
            scalefactors=geo["scalefactors"],
            hires_image=hires,
            lowres_image=lowres,
            positions_file=positions_file,
            matrix_format=matrix_format,
            overwrite=overwrite,
        )
    truth_path = out_dir / TRUTH_DIRNAME
    sizes = dict(
        n_cells=len(x_xy),
        n_cells_visium=len(v_xy),
        n_spots=len(vis["barcodes"]),
        n_spots_in_tissue=int(vis["in_tissue"].sum()),
    )
    truth.save(truth_path, extra={"params": params, "sizes": sizes, "scalefactors": geo["scalefactors"]})
    write_landmarks_csv(truth_path / LANDMARKS_CSV, truth.landmarks_source, truth.landmarks_target, lm_names)
    genes.to_csv(truth_path / "genes.csv")
    pd.DataFrame(
        {
            "cell_id": xen["cells"]["cell_id"].to_numpy(),
            "x": x_xy[:, 0],
            "y": x_xy[:, 1],
            "cell_type": np.asarray(CELL_TYPES)[x_type],
            "region": np.asarray(REGIONS)[x_region],
            "egfr_field": tissue.egfr_pattern(x_xy),
            "shared": truth.shared(x_xy),
        }
    ).to_parquet(truth_path / "xenium_cells.parquet", index=False)
    spot_um = truth.inverse(vis["pxl"])
    pd.DataFrame(
        {
            "barcode": vis["barcodes"],
            "in_tissue": vis["in_tissue"],
            "x_um": spot_um[:, 0],
            "y_um": spot_um[:, 1],
            "n_cells": vis["n_cells"],
            "shared": truth.shared(spot_um),
        }
    ).to_parquet(truth_path / "visium_spots.parquet", index=False)
    bar.update()
    bar.close()
    return TwinSections(
        xenium_path=Path(xenium_path),
        visium_path=Path(visium_path),
        truth_path=truth_path,
        truth=truth,
        seed=int(seed),
        xenium_genes=[str(s) for s in genes.symbols[genes.xenium]],
        visium_genes=[str(s) for s in genes.symbols[genes.visium]],
        shared_genes=sorted(str(s) for s in genes.symbols[genes.shared]),
        scalefactors=dict(geo["scalefactors"]),
        params=params,
        **sizes,
    )


def load_twin(out_dir) -> TwinSections:
    """Rebuild the :class:`TwinSections` of a folder written by :func:`twin_sections` (no regeneration)."""
    out_dir = Path(out_dir)
    truth_path = out_dir / TRUTH_DIRNAME
    meta_file = truth_path / "truth.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{out_dir} is not a twin-section folder: {meta_file} is missing.")
    meta = json.loads(meta_file.read_text())
    truth = Truth.load(truth_path)
    genes = pd.read_csv(truth_path / "genes.csv")
    xg = sorted(genes.loc[genes["in_xenium"], "gene"])
    vg = sorted(genes.loc[genes["in_visium"], "gene"])
    return TwinSections(
        xenium_path=out_dir / XENIUM_DIRNAME,
        visium_path=out_dir / VISIUM_DIRNAME / "outs",
        truth_path=truth_path,
        truth=truth,
        seed=int(meta["params"]["seed"]),
        xenium_genes=xg,
        visium_genes=vg,
        shared_genes=sorted(set(xg) & set(vg)),
        scalefactors=meta["scalefactors"],
        params=meta["params"],
        **meta["sizes"],
    )


# ---------------------------------------------------------------------- geometry
def _geometry(rng, tissue, centres, coefs, warp_length, rot_deg, um_per_px, anisotropy, flip, capture_trim) -> dict:
    """The slide frame, spot grid, image extents and the truth (landmarks filled in later)."""
    th = np.radians(rot_deg)
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    F = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    RF = R @ F
    s = 1.0 / um_per_px
    S = np.diag([s * (1 + anisotropy / 2), s * (1 - anisotropy / 2)])
    pre = Truth(np.eye(3), centres, coefs, warp_length, 1.0, np.zeros((0, 2)), np.zeros((0, 2)), [], tissue=tissue)
    # the Visium section's tissue in the (unshifted) slide frame
    xmin, xmax, ymin, ymax = tissue.bbox()
    h = 20.0
    X, Y = np.meshgrid(np.arange(xmin, xmax, h), np.arange(ymin, ymax, h))
    pts = np.column_stack([X.ravel(), Y.ravel()])
    pts = pts[tissue.section_signed_distance(pts, "visium") > 0]
    w = (pts + pre.displacement(pts)) @ RF.T
    lo, hi = w.min(axis=0), w.max(axis=0)
    # capture area (axis-aligned in the slide frame): the tissue bbox plus a margin, except on one
    # side where it leaves out a fraction ``capture_trim`` of the tissue
    cap_lo, cap_hi = lo - SPOT_GRID_PAD_UM, hi + SPOT_GRID_PAD_UM
    if capture_trim > 0:
        axis = int(rng.integers(2))
        if rng.uniform() < 0.5:
            cap_lo[axis] = np.quantile(w[:, axis], capture_trim)
        else:
            cap_hi[axis] = np.quantile(w[:, axis], 1.0 - capture_trim)
    t_slide = -cap_lo  # the spot grid (capture area) starts at slide (0, 0)
    grid_w, grid_h = cap_hi - cap_lo
    # the image shows the capture area and all the tissue: full-res px = S @ (slide - origin)
    e_lo = np.minimum(np.zeros(2), lo + t_slide) - IMAGE_PAD_UM
    e_hi = np.maximum(cap_hi - cap_lo, hi + t_slide) + IMAGE_PAD_UM
    slide_affine = np.eye(3)
    slide_affine[:2, :2] = S
    slide_affine[:2, 2] = -S @ e_lo
    affine = np.eye(3)
    affine[:2, :2] = S @ RF
    affine[:2, 2] = S @ (t_slide - e_lo)
    width = int(np.ceil(S[0, 0] * (e_hi[0] - e_lo[0])))
    height = int(np.ceil(S[1, 1] * (e_hi[1] - e_lo[1])))
    spot_d = VISIUM_SPOT_DIAMETER_UM * float(np.sqrt(S[0, 0] * S[1, 1]))
    long_px = max(width, height)
    long_um = long_px * um_per_px
    hires_long = int(np.clip(np.ceil(long_um / HIRES_UM_PER_PX), HIRES_MIN_PX, HIRES_MAX_PX))
    s_hi = hires_long / long_px
    s_lo = LOWRES_PX / long_px
    truth = Truth(
        affine=affine,
        warp_centres=centres,
        warp_coefs=coefs,
        warp_sigma=warp_length,
        um_per_px=VISIUM_SPOT_DIAMETER_UM / spot_d,
        landmarks_source=np.zeros((0, 2)),
        landmarks_target=np.zeros((0, 2)),
        landmark_names=[],
        tissue=tissue,
        slide_affine=slide_affine,
        capture_area=np.array([0.0, grid_w, 0.0, grid_h]),
    )
    # hex grid: array_row along y (86.6 µm), array_col along x (50 µm), col parity = row parity
    dy = VISIUM_SPOT_PITCH_UM * np.sqrt(3.0) / 2.0
    dx = VISIUM_SPOT_PITCH_UM / 2.0
    rows = np.arange(int(np.floor(grid_h / dy)) + 1)
    cols = np.arange(int(np.floor(grid_w / dx)) + 1)
    C, Rr = np.meshgrid(cols, rows)
    keep = (C % 2) == (Rr % 2)
    return {
        "truth": truth,
        "RF": RF,
        "t_slide": t_slide,
        "S": S,
        "array_row": Rr[keep].astype(np.int64),
        "array_col": C[keep].astype(np.int64),
        "spot_slide": np.column_stack([C[keep] * dx, Rr[keep] * dy]).astype(float),
        "image_shape": (height, width),
        "hires_shape": (round(height * s_hi), round(width * s_hi)),
        "lowres_shape": (round(height * s_lo), round(width * s_lo)),
        "scalefactors": {
            "spot_diameter_fullres": spot_d,
            "tissue_hires_scalef": s_hi,
            "fiducial_diameter_fullres": spot_d * 1.6153846153846154,
            "tissue_lowres_scalef": s_lo,
        },
    }


# ---------------------------------------------------------------------- Xenium
def _cell_areas(rng, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([CELL_AREA_UM2[t] for t in CELL_TYPES])[types]
    area = mean * rng.lognormal(0.0, 0.2, size=len(types))
    nucleus = area * rng.uniform(0.3, 0.5, size=len(types))
    return np.round(area, 4), np.round(nucleus, 4)


def _expected(genes: GeneSets, rate: np.ndarray, types: np.ndarray, sf: np.ndarray, egfr_mult: np.ndarray, cols):
    """Per-cell expected counts ``(n_cells, len(cols))`` of genes ``cols`` (universe indices)."""
    lam = rate[:, cols][types] * sf[:, None]
    e = genes.index("EGFR")
    hit = np.flatnonzero(np.asarray(cols) == e)
    if hit.size:
        lam[:, hit[0]] *= egfr_mult
    return lam


def _egfr_multiplier(tissue: TissueModel, xy: np.ndarray, types: np.ndarray) -> np.ndarray:
    mult = np.ones(len(xy))
    tum = types == CELL_TYPES.index("tumour")
    mult[tum] = EGFR_LOW + EGFR_SPAN * tissue.egfr_pattern(xy[tum])
    return mult


def _xenium_tables(rng, genes: GeneSets, tissue: TissueModel, xy: np.ndarray, types: np.ndarray) -> dict:
    from ._tenx import xenium_cell_ids

    n = len(xy)
    sf = rng.lognormal(0.0, 0.3, size=n)
    lam = _expected(genes, genes.rate, types, sf, _egfr_multiplier(tissue, xy, types), genes.xenium)
    gene_counts = sparse.csr_matrix(rng.poisson(lam).astype(np.int32))
    ctrl_names, ctrl_types, ctrl_rates = [], [], []
    for prefix, ftype, k, r in XENIUM_CONTROLS:
        start = 500 if prefix.startswith("NegControlCodeword") else 1
        width = 4
        ctrl_names += [f"{prefix}{i:0{width}d}" for i in range(start, start + k)]
        ctrl_types += [ftype] * k
        ctrl_rates += [r] * k
    ctrl = sparse.csr_matrix(
        rng.poisson(np.broadcast_to(np.asarray(ctrl_rates), (n, len(ctrl_rates)))).astype(np.int32)
    )
    counts = sparse.hstack([gene_counts, ctrl], format="csr")
    ctrl_types = np.asarray(ctrl_types)
    probe = np.asarray(ctrl[:, ctrl_types == "Negative Control Probe"].sum(axis=1)).ravel()
    codeword = np.asarray(ctrl[:, ctrl_types != "Negative Control Probe"].sum(axis=1)).ravel()
    tx_counts = np.asarray(gene_counts.sum(axis=1)).ravel()
    area, nucleus = _cell_areas(rng, types)
    cells = pd.DataFrame(
        {
            "cell_id": xenium_cell_ids(n),
            "x_centroid": np.round(xy[:, 0], 4),
            "y_centroid": np.round(xy[:, 1], 4),
            "transcript_counts": tx_counts.astype(np.int64),
            "control_probe_counts": probe.astype(np.int64),
            "control_codeword_counts": codeword.astype(np.int64),
            "total_counts": (tx_counts + probe + codeword).astype(np.int64),
            "cell_area": area,
            "nucleus_area": nucleus,
        }
    )
    return {
        "cells": cells,
        "counts": counts,
        "feature_ids": np.concatenate([genes.ids[genes.xenium], ctrl_names]),
        "feature_names": np.concatenate([genes.symbols[genes.xenium], ctrl_names]),
        "feature_types": np.concatenate([np.full(len(genes.xenium), "Gene Expression"), ctrl_types]),
    }


def _transcripts(rng, xen: dict, tissue: TissueModel, xy: np.ndarray) -> pd.DataFrame:
    """One transcript per counted molecule around its cell, plus unassigned ones over the tissue."""
    cells = xen["cells"]
    coo = xen["counts"].tocoo()
    reps = coo.data.astype(np.int64)
    cell_idx = np.repeat(coo.row, reps)
    feat_idx = np.repeat(coo.col, reps)
    n = len(cell_idx)
    cell_r = np.sqrt(cells["cell_area"].to_numpy() / np.pi)
    nuc_r = np.sqrt(cells["nucleus_area"].to_numpy() / np.pi)
    off = rng.normal(size=(n, 2)) * (cell_r[cell_idx] / 2.0)[:, None]
    pos = xy[cell_idx] + off
    in_nuc = np.hypot(off[:, 0], off[:, 1]) < nuc_r[cell_idx]
    # unassigned transcripts over the Xenium tissue (genes only)
    n_un = int(_UNASSIGNED_FRACTION * n)
    xmin, xmax, ymin, ymax = tissue.bbox()
    cand = np.column_stack([rng.uniform(xmin, xmax, 3 * n_un + 10), rng.uniform(ymin, ymax, 3 * n_un + 10)])
    cand = cand[tissue.section_signed_distance(cand, "xenium") > 0][:n_un]
    n_genes = int((xen["feature_types"] == "Gene Expression").sum())
    un_feat = rng.integers(0, n_genes, size=len(cand))
    n_all = n + len(cand)
    ids = np.append(cells["cell_id"].to_numpy().astype(object), "UNASSIGNED")
    df = pd.DataFrame(
        {
            "cell_id": pd.Categorical.from_codes(np.concatenate([cell_idx, np.full(len(cand), len(ids) - 1)]), ids),
            "overlaps_nucleus": np.concatenate([in_nuc, np.zeros(len(cand), bool)]).astype(np.uint8),
            "feature_name": pd.Categorical.from_codes(
                np.concatenate([feat_idx, un_feat]), xen["feature_names"].astype(object)
            ),
            "x_location": np.concatenate([pos[:, 0], cand[:, 0]]).astype(np.float32),
            "y_location": np.concatenate([pos[:, 1], cand[:, 1]]).astype(np.float32),
            "z_location": rng.normal(12.0, 2.0, size=n_all).astype(np.float32),
            "qv": rng.uniform(20.0, 40.0, size=n_all).astype(np.float32),
        }
    )
    df.insert(0, "transcript_id", np.arange(1, len(df) + 1, dtype=np.uint64))
    return df


# ---------------------------------------------------------------------- Visium
def _barcodes(rng, n: int) -> np.ndarray:
    out: list[str] = []
    seen: set[str] = set()
    letters = np.array(list("ACGT"))
    while len(out) < n:
        for row in letters[rng.integers(0, 4, size=(n, 16))]:
            bc = "".join(row)
            if bc not in seen:
                seen.add(bc)
                out.append(bc)
                if len(out) == n:
                    break
    return np.array([f"{b}-1" for b in sorted(out)])


def _visium_tables(rng, rng_bc, genes, tissue, truth: Truth, geo: dict, xy: np.ndarray, types: np.ndarray) -> dict:
    S, RF, t_slide = geo["S"], geo["RF"], geo["t_slide"]
    # integer pixel positions, as Space Ranger writes them; the physical spot centre follows them
    pxl = np.rint(geo["spot_slide"] @ S.T + truth.slide_affine[:2, 2])
    spot_slide = (pxl - truth.slide_affine[:2, 2]) @ np.linalg.inv(S).T
    spot_um = truth.inverse(pxl)
    in_tissue = (tissue.in_section(spot_um, "visium") > 0.5).astype(np.int64)
    n_spots = len(pxl)
    # cells under each 55 µm spot, in slide µm
    cell_slide = (xy + truth.displacement(xy)) @ RF.T + t_slide
    dist, idx = cKDTree(spot_slide).query(cell_slide, k=1, distance_upper_bound=VISIUM_SPOT_DIAMETER_UM / 2)
    under = np.isfinite(dist)
    spot_of = idx[under]
    n_cells = np.bincount(spot_of, minlength=n_spots)
    sf = rng.lognormal(0.0, 0.3, size=len(xy))
    tis = np.flatnonzero(in_tissue == 1)
    row_of = np.full(n_spots, -1)
    row_of[tis] = np.arange(len(tis))
    keep = row_of[spot_of] >= 0
    cells_in = np.flatnonzero(under)[keep]
    rows = row_of[spot_of[keep]]
    # expected UMIs: sum over cells of (size factor x type programme), EGFR per cell
    n_types = len(CELL_TYPES)
    A = sparse.csr_matrix((sf[cells_in], (rows, types[cells_in])), shape=(len(tis), n_types))
    vcols = genes.visium
    lam = np.asarray(A @ genes.visium_rate[:, vcols])
    e = genes.index("EGFR")
    ecol = int(np.flatnonzero(vcols == e)[0])
    mult = _egfr_multiplier(tissue, xy[cells_in], types[cells_in])
    lam[:, ecol] = np.bincount(
        rows, weights=sf[cells_in] * genes.visium_rate[types[cells_in], e] * mult, minlength=len(tis)
    )
    # ambient RNA (a little of the average profile everywhere under tissue) and per-spot efficiency
    ambient = 0.15 * genes.visium_rate[:, vcols].mean(axis=0)
    lam = (lam + ambient[None]) * rng.lognormal(0.0, 0.2, size=(len(tis), 1))
    lam = rng.gamma(_VISIUM_DISPERSION, lam / _VISIUM_DISPERSION)
    counts = sparse.csr_matrix(rng.poisson(lam).astype(np.int32))
    return {
        "barcodes": _barcodes(rng_bc, n_spots),
        "in_tissue": in_tissue,
        "array_row": geo["array_row"],
        "array_col": geo["array_col"],
        "pxl": pxl,
        "counts": counts,
        "n_cells": n_cells,
    }


# ---------------------------------------------------------------------- landmarks
def _farthest(points: np.ndarray, k: int, start: np.ndarray | None = None) -> list[int]:
    """Indices of ``k`` points picked by farthest-point sampling (deterministic)."""
    if len(points) == 0 or k <= 0:
        return []
    chosen = [int(np.argmax(np.linalg.norm(points - points.mean(0), axis=1)))] if start is None else []
    d = (
        np.full(len(points), np.inf)
        if start is None
        else np.min(np.linalg.norm(points[:, None] - start[None], axis=2), axis=1)
    )
    for c in chosen:
        d = np.minimum(d, np.linalg.norm(points - points[c], axis=1))
    while len(chosen) < min(k, len(points)):
        c = int(np.argmax(d))
        chosen.append(c)
        d = np.minimum(d, np.linalg.norm(points - points[c], axis=1))
    return chosen


def _landmarks(truth: Truth, margin: float = 40.0) -> tuple[np.ndarray, list[str]]:
    """At least 6 landmark points (µm) at recognisable structures inside both sections and the capture area."""
    tissue = truth.tissue
    x0, x1, y0, y1 = truth.capture_area

    def ok(p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        s = truth.to_slide(p)
        in_cap = (s[:, 0] > x0 + margin) & (s[:, 0] < x1 - margin) & (s[:, 1] > y0 + margin) & (s[:, 1] < y1 - margin)
        return (
            in_cap
            & (tissue.section_signed_distance(p, "xenium") > margin)
            & (tissue.section_signed_distance(p, "visium") > margin)
        )

    pts: list[np.ndarray] = []
    names: list[str] = []
    nests = tissue.nests
    good = np.flatnonzero(ok(nests.centre)) if len(nests) else np.zeros(0, int)
    big = good[np.argsort(-np.prod(nests.axes[good], axis=1))][: max(12, len(good) // 3)]
    for i in _farthest(nests.centre[big], 4):
        pts.append(nests.centre[big[i]])
        names.append(f"nest_{big[i]}")
    ducts = tissue.ducts
    if len(ducts):
        for k in np.argsort(-ducts.axes[:, 0])[:3]:
            a = ducts.axes[k, 0] * 0.8
            d = np.array([np.cos(ducts.angle[k]), np.sin(ducts.angle[k])])
            ends = [ducts.centre[k] + a * d, ducts.centre[k] - a * d]
            ends_ok = ok(np.asarray(ends))
            for tag, e, good_end in zip(("a", "b"), ends, ends_ok, strict=True):
                if good_end and sum(n.startswith("duct") for n in names) < 2:
                    pts.append(e)
                    names.append(f"duct_{k}_end_{tag}")
    imm = tissue.immune
    if len(imm):
        good = np.flatnonzero(ok(imm.centre))
        start = np.asarray(pts) if pts else None
        for i in _farthest(imm.centre[good], 2, start=start):
            pts.append(imm.centre[good[i]])
            names.append(f"immune_{good[i]}")
    for k, name in ((1, "tissue_lobe"), (2, "tissue_tail")):
        if k < len(tissue.outline) and ok(tissue.outline.centre[k])[0]:
            pts.append(tissue.outline.centre[k])
            names.append(name)
    if len(pts) < 6:  # small tissues: add well-spread tissue points
        xmin, xmax, ymin, ymax = tissue.bbox()
        X, Y = np.meshgrid(np.linspace(xmin, xmax, 60), np.linspace(ymin, ymax, 60))
        grid = np.column_stack([X.ravel(), Y.ravel()])
        grid = grid[ok(grid)]
        for i in _farthest(grid, 6 - len(pts), start=np.asarray(pts) if pts else None):
            pts.append(grid[i])
            names.append(f"tissue_{len(names)}")
    return np.asarray(pts, float).reshape(-1, 2), names


# ---------------------------------------------------------------------- Visium HD
#: ambient (free) RNA over the HD tissue, molecules per µm² (the Visium spots' ambient level)
_HD_AMBIENT_PER_UM2 = 0.01
_CELL_CHUNK = 4000


def _hd_levels(bin_sizes) -> tuple[int, ...]:
    sizes = tuple(sorted(int(b) for b in bin_sizes))
    if not sizes or any(b <= 0 for b in sizes) or any(b % a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"hd_bins must be positive bin sizes (µm), each a multiple of the previous, got {bin_sizes}.")
    return sizes


def _visium_hd_bins(rng, genes, tissue, truth: Truth, geo: dict, xy: np.ndarray, types: np.ndarray, bin_sizes) -> dict:
    """Visium HD bins of the Visium section: molecules of its cells (and ambient RNA) counted in square bins.

    Every molecule of a cell (Poisson, the Visium per-cell programme, EGFR per cell) lies uniformly in the cell's
    disc; a bin counts the molecules inside it. The bins nest exactly: an 8 µm bin holds the molecules of its 16
    2 µm bins. ``in_tissue`` is decided at 8 µm (or the smallest size above it): finer bins inherit it, coarser
    bins are in tissue when any of their 8 µm bins is; molecules outside in-tissue bins are not counted.
    """
    sizes = _hd_levels(bin_sizes)
    fine = sizes[0]
    tissue_level = next((b for b in sizes if b >= 8), sizes[-1])
    S, RF, t_slide = geo["S"], geo["RF"], geo["t_slide"]
    offset = truth.slide_affine[:2, 2]
    cap_w, cap_h = truth.capture_area[1], truth.capture_area[3]
    n_col = int(np.ceil(cap_w / sizes[-1])) * (sizes[-1] // fine)  # fine bins, a whole number of coarse bins
    n_row = int(np.ceil(cap_h / sizes[-1])) * (sizes[-1] // fine)
    # in-tissue flags at the tissue level, from the ground-truth section outline at the bin centres
    k = tissue_level // fine
    tr, tc = np.meshgrid(np.arange(n_row // k), np.arange(n_col // k), indexing="ij")
    centre = np.column_stack([tc.ravel() + 0.5, tr.ravel() + 0.5]) * tissue_level
    tissue_flag = (tissue.in_section(truth.inverse(centre @ S.T + offset), "visium") > 0.5).reshape(tr.shape)
    fine_in = np.repeat(np.repeat(tissue_flag, k, axis=0), k, axis=1)  # (n_row, n_col) fine bins
    # molecules of the cells, in slide µm
    vcols = genes.visium
    e = genes.index("EGFR")
    ecol = int(np.flatnonzero(vcols == e)[0])
    sf = rng.lognormal(0.0, 0.3, size=len(xy))
    mult = _egfr_multiplier(tissue, xy, types)
    cell_slide = (xy + truth.displacement(xy)) @ RF.T + t_slide
    radius = np.sqrt(np.array([CELL_AREA_UM2[t] for t in CELL_TYPES])[types] / np.pi)
    mol_cell, mol_gene = [], []
    for lo in range(0, len(xy), _CELL_CHUNK):
        sl = slice(lo, lo + _CELL_CHUNK)
        lam = genes.visium_rate[types[sl]][:, vcols] * sf[sl, None]
        lam[:, ecol] *= mult[sl]
        c = sparse.coo_matrix(rng.poisson(lam).astype(np.int32))
        mol_cell.append(np.repeat(c.row + lo, c.data))
        mol_gene.append(np.repeat(c.col, c.data))
    mol_cell, mol_gene = np.concatenate(mol_cell), np.concatenate(mol_gene)
    r = radius[mol_cell] * np.sqrt(rng.uniform(size=len(mol_cell)))
    th = rng.uniform(0, 2 * np.pi, size=len(mol_cell))
    pos = cell_slide[mol_cell] + np.column_stack([r * np.cos(th), r * np.sin(th)])
    col, row = np.floor(pos[:, 0] / fine).astype(np.int64), np.floor(pos[:, 1] / fine).astype(np.int64)
    ok = (col >= 0) & (col < n_col) & (row >= 0) & (row < n_row)
    ok[ok] = fine_in[row[ok], col[ok]]
    col, row, gene = col[ok], row[ok], mol_gene[ok]
    # ambient RNA: uniform over the in-tissue fine bins, genes in proportion to the mean programme
    in_idx = np.flatnonzero(fine_in.ravel())
    n_amb = int(rng.poisson(_HD_AMBIENT_PER_UM2 * len(in_idx) * fine**2))
    profile = genes.visium_rate[:, vcols].mean(axis=0)
    amb_bin = in_idx[rng.integers(0, len(in_idx), size=n_amb)] if len(in_idx) else np.zeros(0, np.int64)
    row = np.concatenate([row, amb_bin // n_col])
    col = np.concatenate([col, amb_bin % n_col])
    gene = np.concatenate([gene, rng.choice(len(vcols), size=n_amb, p=profile / profile.sum())])
    out = {}
    for size in sizes:
        f = size // fine
        nr, nc = n_row // f, n_col // f
        rr, cc = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
        flag = fine_in.reshape(nr, f, nc, f).any(axis=(1, 3)).ravel()
        centre = np.column_stack([cc.ravel() + 0.5, rr.ravel() + 0.5]) * size
        pxl = centre @ S.T + offset
        rank = np.full(nr * nc, -1)
        rank[flag] = np.arange(int(flag.sum()))
        bin_of = rank[(row // f) * nc + col // f]
        counts = sparse.csr_matrix(
            (np.ones(len(bin_of), np.int32), (bin_of, gene)), shape=(int(flag.sum()), len(vcols))
        )
        counts.sum_duplicates()
        out[size] = {
            "array_row": rr.ravel(),
            "array_col": cc.ravel(),
            "in_tissue": flag.astype(np.int64),
            "pxl_row_in_fullres": pxl[:, 1],
            "pxl_col_in_fullres": pxl[:, 0],
            "counts": counts,
        }
    coarse = out[sizes[-1]]
    cells_bin = np.floor(cell_slide / sizes[-1]).astype(np.int64)
    nc = n_col // (sizes[-1] // fine)
    inside = (cells_bin >= 0).all(1) & (cells_bin[:, 0] < nc) & (cells_bin[:, 1] < n_row // (sizes[-1] // fine))
    coarse["n_cells"] = np.bincount(
        cells_bin[inside, 1] * nc + cells_bin[inside, 0], minlength=len(coarse["in_tissue"])
    )
    return out
