"""Small hand-built 10x inputs (Xenium + Visium) with known values, for ``tests/test_io.py``.

The arrays are built here and written with ``spatialdata_align.datasets._tenx``; the tests read them back and
compare with these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from spatialdata_align.datasets._tenx import write_visium, write_xenium, xenium_cell_ids

PIXEL_SIZE = 0.2125
MORPH_MARKER = 60000  # morphology channel i holds MORPH_MARKER + i at the marker cell's centroid pixel


@dataclass
class XeniumInputs:
    cells: pd.DataFrame
    counts: sparse.csr_matrix
    feature_ids: list[str]
    feature_names: list[str]
    feature_types: list[str]
    transcripts: pd.DataFrame
    morphology: np.ndarray  # (4, y, x): DAPI + three stains; channel i holds MORPH_MARKER + i at the marker cell
    gene_mask: np.ndarray = field(init=False)
    marker_cell: int = 7

    def __post_init__(self) -> None:
        self.gene_mask = np.array([t == "Gene Expression" for t in self.feature_types])

    def marker_pixel(self) -> tuple[int, int]:
        """(row, col) of the marker cell's centroid in the morphology image."""
        c = self.cells.iloc[self.marker_cell]
        return int(np.floor(c["y_centroid"] / PIXEL_SIZE)), int(np.floor(c["x_centroid"] / PIXEL_SIZE))

    def write(self, out: Path, **kwargs) -> Path:
        return write_xenium(
            out,
            cells=self.cells,
            counts=self.counts,
            feature_ids=self.feature_ids,
            feature_names=self.feature_names,
            feature_types=self.feature_types,
            transcripts=self.transcripts,
            morphology=kwargs.pop("morphology", self.morphology),
            pixel_size=PIXEL_SIZE,
            **kwargs,
        )


def make_xenium(n_cells: int = 60, n_tx: int = 400, seed: int = 0) -> XeniumInputs:
    rng = np.random.default_rng(seed)
    genes = ["EGFR", "KRT5", "NKX2-1", "CD3E", "ACTA2"]
    controls = ["NegControlProbe_00042", "NegControlCodeword_0500", "BLANK_0007", "UnassignedCodeword_0001"]
    ctypes = ["Negative Control Probe", "Negative Control Codeword", "Blank Codeword", "Unassigned Codeword"]
    names = genes + controls
    types = ["Gene Expression"] * len(genes) + ctypes
    ids = [f"ENSG{i:011d}" for i in range(len(genes))] + controls
    dense = rng.poisson(3.0, size=(n_cells, len(names)))
    dense[:, len(genes) :] = rng.poisson(0.3, size=(n_cells, len(controls)))
    counts = sparse.csr_matrix(dense)
    # cells inside [10, 90] x [10, 60] µm; the morphology image covers [0, 100) x [0, 70) µm
    x = rng.uniform(10, 90, n_cells)
    y = rng.uniform(10, 60, n_cells)
    cells = pd.DataFrame(
        {
            "cell_id": xenium_cell_ids(n_cells, start=1000),
            "x_centroid": x,
            "y_centroid": y,
            "transcript_counts": dense[:, : len(genes)].sum(1),
            "control_probe_counts": dense[:, len(genes)],
            "control_codeword_counts": dense[:, len(genes) + 1],
            "total_counts": dense.sum(1),
            "cell_area": rng.uniform(20, 60, n_cells),
            "nucleus_area": rng.uniform(5, 15, n_cells),
        }
    )
    cell_of_tx = rng.integers(-1, n_cells, n_tx)
    transcripts = pd.DataFrame(
        {
            "transcript_id": np.arange(281474976710656, 281474976710656 + n_tx, dtype=np.uint64),
            "cell_id": np.where(cell_of_tx >= 0, cells["cell_id"].to_numpy()[cell_of_tx], "UNASSIGNED"),
            "overlaps_nucleus": rng.integers(0, 2, n_tx).astype(np.uint8),
            "feature_name": rng.choice(names, n_tx),
            "x_location": rng.uniform(0, 100, n_tx).astype(np.float32),
            "y_location": rng.uniform(0, 70, n_tx).astype(np.float32),
            "z_location": rng.uniform(10, 20, n_tx).astype(np.float32),
            "qv": rng.uniform(20, 40, n_tx).astype(np.float32),
        }
    )
    h, w = round(70 / PIXEL_SIZE), round(100 / PIXEL_SIZE)
    morphology = rng.integers(0, 4000, size=(4, h, w)).astype(np.uint16)
    out = XeniumInputs(cells, counts, ids, names, types, transcripts, morphology)
    r, c = out.marker_pixel()
    morphology[:, r, c] = MORPH_MARKER + np.arange(4)
    return out


@dataclass
class VisiumInputs:
    barcodes: np.ndarray
    in_tissue: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    pxl_row: np.ndarray
    pxl_col: np.ndarray
    counts: sparse.csr_matrix  # in-tissue spots x features
    feature_ids: list[str]
    feature_names: list[str]
    scalefactors: dict
    hires: np.ndarray
    lowres: np.ndarray
    fullres: np.ndarray
    cytassist: np.ndarray
    marker_spot: int  # index (into barcodes) of the spot whose pixel is painted MARKER in every image
    marker_rc: tuple[int, int]  # its hires (row, col)

    def marker_pixel(self, scalef: float) -> tuple[int, int]:
        """(row, col) of the marker spot's centre in an image of ``scalef`` image px per full-res px."""
        return int(np.floor(self.pxl_row[self.marker_spot] * scalef)), int(
            np.floor(self.pxl_col[self.marker_spot] * scalef)
        )

    def write(self, out: Path, images=("hires", "lowres", "fullres"), **kwargs) -> Path:
        """Write the folder with only ``images`` (any of hires, lowres, fullres, cytassist)."""
        kwargs.setdefault("hires_image", self.hires if "hires" in images else None)
        kwargs.setdefault("lowres_image", self.lowres if "lowres" in images else None)
        kwargs.setdefault("fullres_image", self.fullres if "fullres" in images else None)
        kwargs.setdefault("cytassist_image", self.cytassist if "cytassist" in images else None)
        kwargs.setdefault("scalefactors", self.scalefactors)
        return write_visium(
            out,
            barcodes=self.barcodes,
            in_tissue=self.in_tissue,
            array_row=self.array_row,
            array_col=self.array_col,
            pxl_row_in_fullres=self.pxl_row,
            pxl_col_in_fullres=self.pxl_col,
            counts=self.counts,
            feature_ids=self.feature_ids,
            feature_names=self.feature_names,
            **kwargs,
        )


MARKER = np.array([12, 250, 7], dtype=np.uint8)


def make_visium(n_rows: int = 8, n_cols: int = 10, seed: int = 1) -> VisiumInputs:
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    array_row = rows.ravel()
    array_col = (2 * cols + rows % 2).ravel()
    spot_d = 80.0  # full-res px -> 55 / 80 µm per px
    pitch = 100.0 / (55.0 / spot_d)  # full-res px between neighbouring spots
    # not a square grid and not symmetric in x/y, so a row/col swap shows
    pxl_col = np.round(300.0 + array_col * pitch / 2).astype(np.int64)
    pxl_row = np.round(150.0 + array_row * pitch * np.sqrt(3) / 2).astype(np.int64)
    n = len(array_row)
    barcodes = np.array([f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n)])
    in_tissue = (rng.random(n) < 0.7).astype(np.int64)
    genes = ["EGFR", "KRT5", "MYDUP", "ACTB", "MYDUP", "GAPDH"]
    ids = [f"ENSG{i:011d}" for i in range(len(genes))]
    counts = sparse.csr_matrix(rng.poisson(2.0, size=(int(in_tissue.sum()), len(genes))))
    sf = {
        "spot_diameter_fullres": spot_d,
        "tissue_hires_scalef": 0.2,
        "tissue_lowres_scalef": 0.05,
        "fiducial_diameter_fullres": 1.6 * spot_d,
        "regist_target_img_scalef": 0.125,
    }
    extent_x = int(pxl_col.max() + 300)
    extent_y = int(pxl_row.max() + 200)
    hires = np.full((int(extent_y * 0.2), int(extent_x * 0.2), 3), 240, dtype=np.uint8)
    lowres = np.full((int(extent_y * 0.05), int(extent_x * 0.05), 3), 240, dtype=np.uint8)
    in_idx = np.flatnonzero(in_tissue)
    marker_spot = int(in_idx[len(in_idx) // 2 + 3])
    r = int(np.floor(pxl_row[marker_spot] * 0.2))
    c = int(np.floor(pxl_col[marker_spot] * 0.2))
    hires[r, c] = MARKER
    # every other image: the marker spot's centre pixel at the image's scale factor (fullres: 1)
    lowres[int(np.floor(pxl_row[marker_spot] * 0.05)), int(np.floor(pxl_col[marker_spot] * 0.05))] = MARKER
    fullres = np.full((extent_y, extent_x, 3), 180, dtype=np.uint8)
    fullres[int(pxl_row[marker_spot]), int(pxl_col[marker_spot])] = MARKER
    cytassist = np.full((int(extent_y * 0.125), int(extent_x * 0.125), 3), 90, dtype=np.uint8)
    cytassist[int(np.floor(pxl_row[marker_spot] * 0.125)), int(np.floor(pxl_col[marker_spot] * 0.125))] = MARKER
    return VisiumInputs(
        barcodes,
        in_tissue,
        array_row,
        array_col,
        pxl_row,
        pxl_col,
        counts,
        ids,
        genes,
        sf,
        hires,
        lowres,
        fullres,
        cytassist,
        marker_spot,
        (r, c),
    )


@dataclass
class VisiumHDInputs:
    bins: dict  # {size: {array_row, array_col, in_tissue, pxl_row_in_fullres, pxl_col_in_fullres, counts}}
    feature_ids: list[str]
    feature_names: list[str]
    scalefactors: dict
    hires: np.ndarray
    lowres: np.ndarray
    cytassist: np.ndarray
    marker_bin: int  # index (into the 8 µm bins) of the bin whose centre pixel is MARKER in every image

    def write(self, out: Path, images=("hires", "lowres"), **kwargs) -> Path:
        from spatialdata_align.datasets._tenx import write_visium_hd

        return write_visium_hd(
            out,
            bins=self.bins,
            feature_ids=self.feature_ids,
            feature_names=self.feature_names,
            scalefactors=self.scalefactors,
            hires_image=self.hires if "hires" in images else None,
            lowres_image=self.lowres if "lowres" in images else None,
            cytassist_image=self.cytassist if "cytassist" in images else None,
            **kwargs,
        )


def make_visium_hd(seed: int = 3) -> VisiumHDInputs:
    """2, 8 and 16 µm bins on a 96 x 64 µm capture area, 0.5 µm per full-res px, bins offset and anisotropic."""
    rng = np.random.default_rng(seed)
    upp = 0.5
    genes = ["EGFR", "KRT5", "MYDUP", "ACTB", "MYDUP", "GAPDH"]
    ids = [f"ENSG{i:011d}" for i in range(len(genes))]
    bins = {}
    for size in (2, 8, 16):
        nr, nc = 64 // size, 96 // size
        rr, cc = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
        in_tissue = (rng.random(rr.size) < 0.8).astype(np.int64)
        in_tissue[(rr.ravel() == 1) & (cc.ravel() == 2)] = 1  # the marker bin (8 µm) is in tissue
        bins[size] = {
            "array_row": rr.ravel(),
            "array_col": cc.ravel(),
            "in_tissue": in_tissue,
            "pxl_row_in_fullres": 40.0 + (rr.ravel() + 0.5) * size / upp,
            "pxl_col_in_fullres": 30.0 + (cc.ravel() + 0.5) * size / upp * 1.02,
            "counts": sparse.random(int(in_tissue.sum()), len(genes), density=0.3, random_state=seed + size)
            .multiply(20)
            .ceil()
            .astype(np.int32)
            .tocsr(),
        }
    sf = {
        "microns_per_pixel": upp,
        "tissue_hires_scalef": 0.4,
        "tissue_lowres_scalef": 0.1,
        "regist_target_img_scalef": 0.25,
        "fiducial_diameter_fullres": 300.0,
    }
    b8 = bins[8]
    marker_bin = int(np.flatnonzero((b8["array_row"] == 1) & (b8["array_col"] == 2))[0])
    px = np.array([b8["pxl_col_in_fullres"][marker_bin], b8["pxl_row_in_fullres"][marker_bin]])
    extent = (260, 260)  # full-res px (y, x) covering all bins
    images = []
    for s, fill in ((0.4, 240), (0.1, 240), (0.25, 90)):
        im = np.full((int(extent[0] * s), int(extent[1] * s), 3), fill, dtype=np.uint8)
        im[int(np.floor(px[1] * s)), int(np.floor(px[0] * s))] = MARKER
        images.append(im)
    return VisiumHDInputs(bins, ids, genes, sf, *images, marker_bin)
