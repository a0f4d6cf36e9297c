"""A small hand-built Xenium + Visium pair with a known alignment, for the ``sda.tl`` / ``sda.pl`` tests.

The pair follows the data model of ``sda.io.read_pair`` (element names and models from
``spatialdata_align._constants``):

* Visium: a hexagonal spot lattice (pitch 100 µm) in full-resolution pixels (``um_per_px`` µm per
  pixel), spots inside an elliptical tissue are ``in_tissue``; a hires RGB image mapped into ``visium``
  by ``Scale(1 / scalef)``.
* Xenium: cells in µm, sampled uniformly inside a second ellipse (the twin section: it overhangs the
  Visium tissue on one side and misses it on the other) and clipped to a capture window.
* Truth: ``forward(xy_um) -> xy_px`` is a rotation + scale + translation.
* Genes: every gene follows a smooth random field (Gaussian bumps, length scale ~250 µm) sampled at
  the true position; Xenium counts are Poisson per cell, Visium counts Poisson per spot with a
  spot-level library-size factor. Symbol quirks: ``Krt5`` in Visium vs ``KRT5`` in Xenium,
  ``MYDUP`` twice in Visium (``MYDUP`` / ``MYDUP-1``), ``NKX2-1`` in both, Xenium control probes
  ``NegControlProbe_00042`` and ``BLANK_0007`` in the Xenium table.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.sparse as sp
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence, set_transformation

from spatialdata_align._constants import (
    ALIGNED_SUFFIX,
    INSTANCE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_HIRES,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    XENIUM_CELLS,
    XENIUM_CS,
    XENIUM_TABLE,
)

UM_PER_PX = 0.2736
PITCH_UM = 100.0
SCALEF = 0.05  # hires pixels per full-res pixel
XENIUM_GENES = ["EGFR", "KRT5", "NKX2-1", "MYDUP", "CD3E", "ACTA2", "PTPRC", "EPCAM", "VIM", "FLAT1"]
XENIUM_CONTROLS = ["NegControlProbe_00042", "BLANK_0007"]
VISIUM_ONLY = ["GAPDH", "MALAT1", "XIST", "ACTB"]


@dataclass
class Pair:
    sdata: SpatialData
    rotation_deg: float
    translation_px: np.ndarray
    um_per_px: float
    cells_um: np.ndarray
    cells_px: np.ndarray
    spots_px: np.ndarray
    in_tissue: np.ndarray
    pitch_px: float

    def forward(self, xy_um: np.ndarray) -> np.ndarray:
        return np.asarray(xy_um, float) @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    def inverse(self, xy_px: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.matrix)
        return np.asarray(xy_px, float) @ inv[:2, :2].T + inv[:2, 2]

    @property
    def matrix(self) -> np.ndarray:
        th = np.radians(self.rotation_deg)
        m = np.eye(3)
        m[:2, :2] = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) / self.um_per_px
        m[:2, 2] = self.translation_px
        return m


def _field(rng, n_bumps: int, extent_px: np.ndarray, sigma_px: float):
    centres = rng.uniform(0, 1, size=(n_bumps, 2)) * extent_px
    amps = rng.normal(size=n_bumps)

    def f(xy):
        d2 = ((xy[:, None, :] - centres[None]) ** 2).sum(-1)
        return (amps * np.exp(-d2 / (2 * sigma_px**2))).sum(1)

    return f


def _in_ellipse(xy, c, a, b):
    return ((xy[:, 0] - c[0]) / a) ** 2 + ((xy[:, 1] - c[1]) / b) ** 2 < 1


def make_pair(n_cells: int = 6000, n_side: int = 30, seed: int = 0, n_extra_visium: int = 0) -> Pair:
    """Build the pair: ``n_side x n_side`` spots, ``n_cells`` cells (before clipping to the window)."""
    rng = np.random.default_rng(seed)
    pitch_px = PITCH_UM / UM_PER_PX
    # --- Visium lattice (full-res px), array_col = 2 * c + (r % 2) as in Space Ranger
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    margin = 3 * pitch_px
    spots = np.column_stack([margin + (cols + 0.5 * (rows % 2)) * pitch_px, margin + rows * pitch_px * np.sqrt(3) / 2])
    extent = spots.max(0) + margin
    centre = extent / 2
    in_tissue = _in_ellipse(spots, centre, 0.40 * extent[0], 0.36 * extent[1])
    # --- Xenium cells: true positions in px inside the twin-section ellipse and the capture window
    tis2_c = centre + np.array([0.12, 0.03]) * extent
    pts = []
    while sum(len(p) for p in pts) < n_cells:
        cand = rng.uniform(0, 1, size=(n_cells, 2)) * extent
        keep = _in_ellipse(cand, tis2_c, 0.36 * extent[0], 0.34 * extent[1])
        keep &= cand[:, 1] > 0.22 * extent[1]  # capture window misses the top of the tissue
        pts.append(cand[keep])
    cells_px = np.concatenate(pts)[:n_cells]
    pair = Pair(
        sdata=None,  # type: ignore[arg-type]
        rotation_deg=20.0,
        translation_px=np.array([0.0, 0.0]),
        um_per_px=UM_PER_PX,
        cells_um=None,  # type: ignore[arg-type]
        cells_px=cells_px,
        spots_px=spots,
        in_tissue=in_tissue,
        pitch_px=pitch_px,
    )
    # choose the translation so that Xenium µm coordinates are positive
    raw_um = pair.inverse(cells_px)
    pair.translation_px = pair.matrix[:2, :2] @ (raw_um.min(0) - 200.0)
    cells_um = pair.inverse(cells_px)
    pair.cells_um = cells_um
    # --- expression fields (length scale ~250 µm)
    sigma_px = 250.0 / UM_PER_PX
    genes_all = XENIUM_GENES + VISIUM_ONLY + [f"VIS{i:04d}" for i in range(n_extra_visium)]
    fields = {g: _field(rng, 40, extent, sigma_px) for g in genes_all}
    base = {g: rng.uniform(-1.0, 1.0) for g in genes_all}
    amp = {g: (2.0 if g == "EGFR" else 0.0 if g == "FLAT1" else 1.0) for g in genes_all}

    def rate(g, xy):
        return np.exp(base[g] + amp[g] * fields[g](xy))

    # Xenium counts
    cell_size = rng.lognormal(0.0, 0.3, size=len(cells_px))
    xen_cols = [rng.poisson(0.6 * rate(g, cells_px) * cell_size) for g in XENIUM_GENES]
    xen_cols += [rng.poisson(0.05, size=len(cells_px)) for _ in XENIUM_CONTROLS]
    xvar = XENIUM_GENES + XENIUM_CONTROLS
    X = sp.csr_matrix(np.column_stack(xen_cols).astype(np.float32))
    xobs = pd.DataFrame(
        {
            "cell_id": [f"cell{i:06d}" for i in range(len(cells_px))],
            REGION_KEY: pd.Categorical([XENIUM_CELLS] * len(cells_px)),
            INSTANCE_KEY: np.arange(len(cells_px)),
        },
        index=[f"cell{i:06d}" for i in range(len(cells_px))],
    )
    xvar_df = pd.DataFrame(
        {
            "gene_ids": [f"ENSG{i:011d}" for i in range(len(xvar))],
            "feature_types": ["Gene Expression"] * len(XENIUM_GENES) + ["Negative Control Probe", "Blank Codeword"],
        },
        index=xvar,
    )
    xt = ad.AnnData(X=X, obs=xobs, var=xvar_df, obsm={SPATIAL_KEY: cells_um.copy()})
    xt = TableModel.parse(xt, region=XENIUM_CELLS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    cells_gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(cells_um), 5.0)},
        geometry=gpd.points_from_xy(cells_um[:, 0], cells_um[:, 1]),
        index=np.arange(len(cells_um)),
    )
    cells = ShapesModel.parse(cells_gdf, transformations={XENIUM_CS: Identity()})
    # Visium counts (all lattice spots; out-of-tissue spots get background only)
    depth = rng.lognormal(0.0, 0.4, size=len(spots)) * np.where(in_tissue, 1.0, 0.05)
    vis_genes = [*XENIUM_GENES, "MYDUP", *genes_all[len(XENIUM_GENES) :]]
    vcols = [rng.poisson(8.0 * rate(g, spots) * depth) for g in vis_genes]
    vsym = list(vis_genes)
    vsym[XENIUM_GENES.index("KRT5")] = "Krt5"
    vnames = pd.Index(vsym)
    vnames = ad.utils.make_index_unique(vnames)
    V = sp.csr_matrix(np.column_stack(vcols).astype(np.float32))
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(len(spots))]
    vobs = pd.DataFrame(
        {
            "in_tissue": in_tissue.astype(int),
            "array_row": rows,
            "array_col": 2 * cols + rows % 2,
            REGION_KEY: pd.Categorical([VISIUM_SPOTS] * len(spots)),
            INSTANCE_KEY: np.arange(len(spots)),
        },
        index=barcodes,
    )
    vvar = pd.DataFrame({"gene_symbols": vsym, "gene_ids": [f"ENSV{i:011d}" for i in range(len(vsym))]}, index=vnames)
    spot_diam_px = 55.0 / UM_PER_PX
    vt = ad.AnnData(
        X=V,
        obs=vobs,
        var=vvar,
        obsm={SPATIAL_KEY: spots.copy()},
        uns={
            UNS_VISIUM_KEY: {
                "scalefactors": {
                    "tissue_hires_scalef": SCALEF,
                    "tissue_lowres_scalef": SCALEF / 4,
                    "spot_diameter_fullres": spot_diam_px,
                },
                "um_per_px": UM_PER_PX,
            }
        },
    )
    vt = TableModel.parse(vt, region=VISIUM_SPOTS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    spots_gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(spots), spot_diam_px / 2)},
        geometry=gpd.points_from_xy(spots[:, 0], spots[:, 1]),
        index=np.arange(len(spots)),
    )
    spots_el = ShapesModel.parse(spots_gdf, transformations={VISIUM_CS: Identity()})
    # hires H&E-like image: pink tissue on white
    h, w = int(np.ceil(extent[1] * SCALEF)), int(np.ceil(extent[0] * SCALEF))
    yy, xx = np.mgrid[0:h, 0:w]
    pix_full = np.column_stack([(xx.ravel() + 0.5) / SCALEF, (yy.ravel() + 0.5) / SCALEF])
    tis = _in_ellipse(pix_full, centre, 0.40 * extent[0], 0.36 * extent[1]).reshape(h, w)
    rgb = np.full((3, h, w), 245, dtype=np.uint8)
    rgb[:, tis] = np.array([200, 120, 180], dtype=np.uint8)[:, None]
    img = Image2DModel.parse(
        rgb,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={VISIUM_CS: Scale([1 / SCALEF] * 2, axes=("x", "y"))},
    )
    pair.sdata = SpatialData(
        shapes={XENIUM_CELLS: cells, VISIUM_SPOTS: spots_el},
        images={VISIUM_HIRES: img},
        tables={XENIUM_TABLE: xt, VISIUM_TABLE: vt},
    )
    return pair


def add_native_affine(pair: Pair, sdata: SpatialData | None = None) -> SpatialData:
    """Map ``xenium_cells`` into ``visium`` through the true affine (as ``sdata.align.affine`` would)."""
    sdata = pair.sdata if sdata is None else sdata
    aff = Affine(pair.matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    set_transformation(sdata[XENIUM_CELLS], Sequence([Identity(), aff]), to_coordinate_system=VISIUM_CS)
    return sdata


def add_aligned(pair: Pair, shift_um: float = 0.0, sdata: SpatialData | None = None) -> SpatialData:
    """Add ``xenium_cells_aligned`` / ``xenium_table_aligned`` at the true positions (+ a shift in µm along x)."""
    sdata = pair.sdata if sdata is None else sdata
    xy = pair.forward(pair.cells_um) + np.array([shift_um / pair.um_per_px, 0.0])
    return add_aligned_xy(sdata, xy, cell_radius_px=5.0 / pair.um_per_px)


def add_aligned_xy(sdata: SpatialData, xy: np.ndarray, cell_radius_px: float = 10.0) -> SpatialData:
    """Add ``xenium_cells_aligned`` / ``xenium_table_aligned`` with cell ``i`` (shapes order) at ``xy[i]`` (px)."""
    name = f"{XENIUM_CELLS}{ALIGNED_SUFFIX}"
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(xy), cell_radius_px)},
        geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
        index=sdata[XENIUM_CELLS].index.copy(),
    )
    sdata.shapes[name] = ShapesModel.parse(gdf, transformations={VISIUM_CS: Identity()})
    t = sdata.tables[XENIUM_TABLE].copy()
    pos = pd.Index(gdf.index).get_indexer(t.obs[INSTANCE_KEY].to_numpy())
    t.obs[REGION_KEY] = pd.Categorical([name] * t.n_obs)
    t.obsm[SPATIAL_KEY] = np.asarray(xy, dtype=float)[pos]
    t.uns.pop(TableModel.ATTRS_KEY, None)
    sdata.tables[f"{XENIUM_TABLE}{ALIGNED_SUFFIX}"] = TableModel.parse(
        t, region=name, region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
    return sdata


def twin_pair(out_dir, n_cells: int = 3000, n_spots: int = 300, seed: int = 0, **kw):
    """Twin sections (``sda.datasets``) read with ``sda.io.read_pair``: ``(twin, sdata)``."""
    import spatialdata_align as sda

    kw.setdefault("n_visium_genes", 400)
    kw.setdefault("transcripts", False)
    twin = sda.datasets.twin_sections(out_dir, n_cells=n_cells, n_spots=n_spots, seed=seed, **kw)
    return twin, sda.io.read_pair(twin.xenium_path, twin.visium_path)


def twin_truth_px(twin, sdata: SpatialData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positions (full-res px) of the Xenium cells (shapes order), of all lattice spots, and their in_tissue."""
    from spatialdata_align._elements import element_xy

    cells_px = twin.truth.forward(element_xy(sdata, XENIUM_CELLS, XENIUM_CS))
    spots = twin.visium_spots_truth()
    spots_px = twin.truth.forward(spots[["x_um", "y_um"]].to_numpy(dtype=float))
    return cells_px, spots_px, spots["in_tissue"].to_numpy().astype(bool)


# ------------------------------------------------------------------------------ a hand-countable pair
#: the tiny pair's spots (full-res px): shapes index -> centre; the Visium table lists them as TINY_ROWS
TINY_SPOTS = {10: (100.0, 100.0), 11: (300.0, 100.0), 12: (100.0, 300.0), 13: (300.0, 300.0)}
TINY_ROWS = [13, 11, 12, 10]  # table row order, unlike the shapes' order
#: cells (full-res px) and their counts of A, B, CTRL (a control by feature type only), NegControlProbe_1
TINY_CELLS = np.array(
    [
        [100, 100],  # spot 10, centre
        [130, 100],  # spot 10, 30 px
        [100, 149],  # spot 10, 49 px
        [100, 160],  # 60 px from spot 10: outside its 50 px radius
        [300, 100],  # spot 11
        [260, 100],  # spot 11, 40 px
        [100, 300],  # spot 12
        [310, 310],  # spot 13, 14 px
        [290, 300],  # spot 13, 10 px
    ],
    dtype=float,
)
TINY_X = np.array(
    [
        [1, 0, 5, 1],
        [2, 1, 0, 0],
        [0, 3, 0, 2],
        [7, 7, 7, 7],
        [4, 0, 1, 0],
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [3, 0, 0, 1],
        [1, 5, 2, 0],
    ],
    dtype=np.float32,
)


def tiny_pair(*, spot_radius: bool = True, um_per_px: bool = True, scalefactors: bool = True) -> SpatialData:
    """Four Visium spots (55 µm = 100 px across, so 0.55 µm/px) and nine Xenium cells at hand-picked places.

    ``spot_radius=False`` draws the spots as squares (no ``radius`` column); ``um_per_px`` / ``scalefactors``
    leave those entries out of ``visium_table.uns["visium"]``. Spot ids are 10-13 and the Visium table lists them
    out of order (:data:`TINY_ROWS`); cells are mapped into ``visium`` by identity.
    """
    import shapely

    ids = np.array(list(TINY_SPOTS))
    xy = np.array(list(TINY_SPOTS.values()))
    if spot_radius:
        gdf = gpd.GeoDataFrame({"radius": np.full(4, 50.0)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), index=ids)
    else:
        gdf = gpd.GeoDataFrame(geometry=[shapely.box(x - 40, y - 40, x + 40, y + 40) for x, y in xy], index=ids)
    spots = ShapesModel.parse(gdf, transformations={VISIUM_CS: Identity()})
    # Visium: A, B (as "b"), GAPDH; the counts of spot id i are (i, 2 * i - 19, 100)
    rows = np.array(TINY_ROWS)
    V = np.column_stack([rows, 2 * rows - 19, np.full(4, 100)]).astype(np.float32)
    vobs = pd.DataFrame(
        {
            "in_tissue": (rows != 12).astype(int),
            REGION_KEY: pd.Categorical([VISIUM_SPOTS] * 4),
            INSTANCE_KEY: rows,
        },
        index=[f"BC{i}-1" for i in rows],
    )
    info: dict = {}
    if scalefactors:
        info["scalefactors"] = {"spot_diameter_fullres": 100.0, "tissue_hires_scalef": 1.0}
    if um_per_px:
        info["um_per_px"] = 0.55
    vt = ad.AnnData(sp.csr_matrix(V), obs=vobs, var=pd.DataFrame(index=["A", "b", "GAPDH"]), uns={UNS_VISIUM_KEY: info})
    vt = TableModel.parse(vt, region=VISIUM_SPOTS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    n = len(TINY_CELLS)
    cells = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(n, 3.0)},
            geometry=gpd.points_from_xy(TINY_CELLS[:, 0], TINY_CELLS[:, 1]),
            index=np.arange(n),
        ),
        transformations={VISIUM_CS: Identity(), XENIUM_CS: Identity()},
    )
    xvar = pd.DataFrame(
        {"feature_types": ["Gene Expression", "Gene Expression", "Negative Control Probe", "Negative Control Probe"]},
        index=["A", "B", "CTRL", "NegControlProbe_1"],
    )
    xobs = pd.DataFrame(
        {REGION_KEY: pd.Categorical([XENIUM_CELLS] * n), INSTANCE_KEY: np.arange(n)}, index=[f"c{i}" for i in range(n)]
    )
    xt = ad.AnnData(sp.csr_matrix(TINY_X), obs=xobs, var=xvar)
    xt = TableModel.parse(xt, region=XENIUM_CELLS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(shapes={VISIUM_SPOTS: spots, XENIUM_CELLS: cells}, tables={VISIUM_TABLE: vt, XENIUM_TABLE: xt})


#: the tiny Visium HD grid: 3 x 3 bins of 10 px (named 16 µm), centres (5 + 10 i, 5 + 10 j); bin "s_<i>_<j>"
#: at column i, row j. Cells (full-res px) and the bin holding each (None: off the grid)
TINY_HD_CELLS = [
    ((4.0, 4.0), "s_0_0"),
    ((14.9, 5.0), "s_1_0"),
    ((15.2, 1.0), "s_1_0"),
    ((9.9, 25.0), "s_0_2"),
    ((25.0, 25.0), "s_2_2"),
    ((21.0, 29.0), "s_2_2"),
    ((24.0, 14.0), "s_2_1"),
    ((31.0, 5.0), None),  # 6 px right of the last column's centre: beyond half a side
    ((5.0, -2.0), None),  # above the grid
]
TINY_HD_ROWS = ["s_2_2", "s_0_0", "s_1_1", "s_2_1", "s_0_2", "s_1_0", "s_0_1", "s_2_0", "s_1_2"]  # table order


def tiny_hd(*, native: bool = True) -> SpatialData:
    """The tiny HD grid (:data:`TINY_HD_ROWS` order in its table, shapes in column-major order) and nine cells.

    Xenium counts (A, B, NegControlProbe_1) of cell ``k``: ``(k + 1, 2 * (k % 3), 1)``; Visium HD counts of the bin
    at column i, row j: ``A = 1 + i + 3 * j``, ``b = 9 - i - j``, ``GAPDH = 10``; bins of column 0 are out of tissue.
    """
    import shapely

    names = [f"s_{i}_{j}" for i in range(3) for j in range(3)]
    ctr = {f"s_{i}_{j}": (5.0 + 10 * i, 5.0 + 10 * j) for i in range(3) for j in range(3)}
    squares = [shapely.box(x - 5, y - 5, x + 5, y + 5) for x, y in (ctr[n] for n in names)]
    bins = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=squares, index=pd.Index(names)), transformations={VISIUM_CS: Identity()}
    )
    ij = np.array([[int(n.split("_")[1]), int(n.split("_")[2])] for n in TINY_HD_ROWS])
    V = np.column_stack([1 + ij[:, 0] + 3 * ij[:, 1], 9 - ij.sum(1), np.full(9, 10)]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "in_tissue": (ij[:, 0] > 0).astype(int),
            REGION_KEY: pd.Categorical(["visium_hd_bins_016um"] * 9),
            INSTANCE_KEY: TINY_HD_ROWS,
        },
        index=pd.Index(TINY_HD_ROWS),
    )
    uns = {UNS_VISIUM_KEY: {"scalefactors": {"spot_diameter_fullres": 10.0}, "um_per_px": 1.6}}
    vt = ad.AnnData(sp.csr_matrix(V), obs=obs, var=pd.DataFrame(index=["A", "b", "GAPDH"]), uns=uns)
    vt = TableModel.parse(vt, region="visium_hd_bins_016um", region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    xy = np.array([c for c, _ in TINY_HD_CELLS])
    n = len(xy)
    k = np.arange(n)
    X = np.column_stack([k + 1, 2 * (k % 3), np.ones(n)]).astype(np.float32)
    cells = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.ones(n)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), index=k),
        transformations={VISIUM_CS: Identity()},
    )
    xobs = pd.DataFrame(
        {REGION_KEY: pd.Categorical([XENIUM_CELLS] * n), INSTANCE_KEY: k}, index=[f"c{i}" for i in range(n)]
    )
    xt = ad.AnnData(sp.csr_matrix(X), obs=xobs, var=pd.DataFrame(index=["A", "B", "NegControlProbe_1"]))
    xt = TableModel.parse(xt, region=XENIUM_CELLS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(
        shapes={"visium_hd_bins_016um": bins, XENIUM_CELLS: cells},
        tables={"visium_hd_table_016um": vt, XENIUM_TABLE: xt},
    )
