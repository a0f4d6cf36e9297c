"""Synthetic twin sections (``sda.datasets.twin_sections``): truth, files, biology, rendering, read-back."""

from __future__ import annotations

import hashlib
import json
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse
from scipy.spatial import cKDTree

import spatialdata_align as sda
from spatialdata_align._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM
from spatialdata_align._landmark_files import read_landmarks
from spatialdata_align.datasets import CELL_TYPES, Truth, load_truth, load_twin, twin_sections
from spatialdata_align.datasets._genes import MARKERS

SMALL = dict(n_cells=3000, n_spots=300, seed=7)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return twin_sections(tmp_path_factory.mktemp("twin"), **SMALL)


@pytest.fixture(scope="module")
def twin_variant(tmp_path_factory):
    """Pure affine, mirrored, every alternative file format, full Xenium layout."""
    return twin_sections(
        tmp_path_factory.mktemp("twin_variant"),
        n_cells=600,
        n_spots=60,
        seed=3,
        warp=0.0,
        flip=True,
        layout="full",
        matrix_format="mtx",
        positions_file="tissue_positions_list.csv",
        transcripts_format="csv.gz",
    )


def _xenium_cells(twin) -> pd.DataFrame:
    return pd.read_csv(twin.xenium_path / "cells.csv.gz")


def _xenium_matrix(twin) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """(cells x features) counts, feature names, feature types from ``cell_feature_matrix.h5``."""
    with h5py.File(twin.xenium_path / "cell_feature_matrix.h5") as f:
        m = f["matrix"]
        n_feat, n_bc = m["shape"][()]
        mat = sparse.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=(n_feat, n_bc))
        names = m["features/name"][()].astype(str)
        types = m["features/feature_type"][()].astype(str)
    return mat.T.tocsr(), names, types


def _positions(twin) -> pd.DataFrame:
    return pd.read_csv(twin.visium_path / "spatial" / "tissue_positions.csv")


def _hires(twin) -> np.ndarray:
    return np.asarray(Image.open(twin.visium_path / "spatial" / "tissue_hires_image.png"), dtype=float)


# ---------------------------------------------------------------------------------------- truth
def test_forward_inverse_round_trip(twin):
    xmin, xmax, ymin, ymax = twin.truth.tissue.bbox()
    rng = np.random.default_rng(0)
    xy = np.column_stack([rng.uniform(xmin - 300, xmax + 300, 5000), rng.uniform(ymin - 300, ymax + 300, 5000)])
    px = twin.truth.forward(xy)
    back = twin.truth.inverse(px)
    assert np.abs(back - xy).max() < 1e-6  # µm
    assert np.abs(twin.truth.forward(back) - px).max() < 1e-6  # px
    # the warp is really there: forward differs from the affine alone by up to `warp` µm
    aff = xy @ twin.truth.affine[:2, :2].T + twin.truth.affine[:2, 2]
    dev_um = np.linalg.norm(px - aff, axis=1) * twin.truth.um_per_px
    assert 15.0 < dev_um.max() < 45.0
    assert twin.truth.warp_max_um == pytest.approx(40.0, abs=1e-6)
    assert twin.truth.jacobian_det_min() > 0.5


def test_affine_is_rotation_scale_and_matches_scalefactors(twin):
    lin = twin.truth.affine[:2, :2]
    sv = np.linalg.svd(lin, compute_uv=False)
    assert np.linalg.det(lin) > 0  # no flip by default
    assert 1.01 < sv[0] / sv[1] < 1.06  # a few % anisotropy
    um_per_px = twin.truth.um_per_px
    assert 0.3 <= um_per_px <= 0.7
    assert um_per_px == pytest.approx(VISIUM_SPOT_DIAMETER_UM / twin.scalefactors["spot_diameter_fullres"])
    assert np.sqrt(sv[0] * sv[1]) == pytest.approx(1.0 / um_per_px)
    rot = np.degrees(np.arctan2(lin[1, 0], lin[0, 0]))
    assert 20.0 - 2 <= rot <= 40.0 + 2
    assert twin.params["rotation_deg"] == pytest.approx(rot, abs=2.0)


def test_pure_affine_and_flip(twin_variant):
    t = twin_variant.truth
    assert len(t.warp_centres) == 0 and t.warp_max_um == 0.0
    xy = np.random.default_rng(1).uniform(0, 2000, size=(500, 2))
    aff = xy @ t.affine[:2, :2].T + t.affine[:2, 2]
    np.testing.assert_allclose(t.forward(xy), aff, rtol=0, atol=1e-9)
    np.testing.assert_allclose(t.inverse(aff), xy, rtol=0, atol=1e-9)
    assert np.linalg.det(t.affine[:2, :2]) < 0  # flip=True mirrors


def test_truth_save_load(twin):
    t2 = load_truth(twin.truth_path.parent)
    t3 = Truth.load(twin.truth_path / "truth.npz")
    xy = np.random.default_rng(2).uniform(200, 2000, size=(300, 2))
    np.testing.assert_array_equal(t2.forward(xy), twin.truth.forward(xy))
    np.testing.assert_array_equal(t3.inverse(twin.truth.forward(xy)), twin.truth.inverse(twin.truth.forward(xy)))
    np.testing.assert_array_equal(t2.egfr_pattern(xy), twin.truth.egfr_pattern(xy))
    assert t2.landmark_names == twin.truth.landmark_names
    assert t2.seed == SMALL["seed"]
    with np.load(twin.truth_path / "truth.npz") as z:
        # the saved displacement grid is the warp on that grid
        gx, gy, fld = z["grid_x"], z["grid_y"], z["displacement"]
        j, i = 3, 5
        np.testing.assert_allclose(fld[:, i, j], twin.truth.displacement(np.array([[gx[j], gy[i]]]))[0], atol=1e-9)
    meta = json.loads((twin.truth_path / "truth.json").read_text())
    assert meta["params"]["seed"] == SMALL["seed"] and meta["sizes"]["n_cells"] == SMALL["n_cells"]
    again = load_twin(twin.truth_path.parent)
    assert again.n_spots_in_tissue == twin.n_spots_in_tissue
    assert again.shared_genes == twin.shared_genes
    with pytest.raises(FileNotFoundError, match=r"truth\.npz"):
        load_truth(twin.xenium_path)


def test_landmarks(twin):
    t = twin.truth
    assert len(t.landmark_names) >= 6 and len(set(t.landmark_names)) == len(t.landmark_names)
    np.testing.assert_allclose(t.forward(t.landmarks_source), t.landmarks_target, atol=1e-9)
    assert all(t.shared(t.landmarks_source))
    assert sum(n.startswith("nest_") for n in t.landmark_names) >= 2
    # nest landmarks sit in nests, immune ones in aggregates
    reg = t.tissue.regions(t.landmarks_source)
    for k, name in enumerate(t.landmark_names):
        if name.startswith("nest_"):
            assert reg["nest"][k] > 0.99
        if name.startswith("immune_"):
            assert reg["immune"][k] > 0.99
    # well spread: not all on one side
    span = np.ptp(t.landmarks_source, axis=0)
    assert span.min() > 500.0
    src, dst, names = read_landmarks(twin.landmarks_path)
    np.testing.assert_allclose(src, t.landmarks_source)
    np.testing.assert_allclose(dst, t.landmarks_target)
    assert names == t.landmark_names


# ---------------------------------------------------------------------------------------- files
def test_files_default_layout(twin):
    x, v, tr = twin.xenium_path, twin.visium_path, twin.truth_path
    assert x.name == "xenium" and v.name == "outs" and v.parent.name == "visium"
    assert sorted(p.name for p in x.iterdir()) == ["cell_feature_matrix.h5", "cells.csv.gz", "transcripts.parquet"]
    for f in (
        "filtered_feature_bc_matrix.h5",
        "spatial/tissue_positions.csv",
        "spatial/scalefactors_json.json",
        "spatial/tissue_hires_image.png",
        "spatial/tissue_lowres_image.png",
    ):
        assert (v / f).is_file(), f
    for f in ("truth.npz", "truth.json", "landmarks.csv", "genes.csv", "xenium_cells.parquet", "visium_spots.parquet"):
        assert (tr / f).is_file(), f
    sf = json.loads((v / "spatial" / "scalefactors_json.json").read_text())
    assert sf == twin.scalefactors
    hires, lowres = Image.open(v / "spatial/tissue_hires_image.png"), Image.open(v / "spatial/tissue_lowres_image.png")
    assert max(hires.size) <= 2000 and max(lowres.size) == 600
    pos = _positions(twin)
    fullres_size = np.array(hires.size) / sf["tissue_hires_scalef"]  # (width, height) in full-res px
    np.testing.assert_allclose(np.array(lowres.size), fullres_size * sf["tissue_lowres_scalef"], atol=1.0)
    # the image covers every spot
    assert (pos["pxl_col_in_fullres"].max(), pos["pxl_row_in_fullres"].max()) < tuple(fullres_size)
    assert list(pos.columns) == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert len(pos) == twin.n_spots and pos["in_tissue"].sum() == twin.n_spots_in_tissue
    assert pos["barcode"].str.fullmatch(r"[ACGT]{16}-1").all() and pos["barcode"].is_unique


def test_files_variant_layout(twin_variant):
    x, v = twin_variant.xenium_path, twin_variant.visium_path
    for f in ("experiment.xenium", "cells.parquet", "cells.zarr.zip", "cell_feature_matrix.h5", "transcripts.csv.gz"):
        assert (x / f).is_file(), f
    assert (v / "filtered_feature_bc_matrix" / "matrix.mtx.gz").is_file()
    assert not (v / "filtered_feature_bc_matrix.h5").exists()
    plist = v / "spatial" / "tissue_positions_list.csv"
    first = plist.read_text().splitlines()[0].split(",")
    assert len(first) == 6 and first[0].endswith("-1")  # no header
    assert json.loads((x / "experiment.xenium").read_text())["pixel_size"] == pytest.approx(0.85)


def test_bad_arguments(tmp_path, twin):
    with pytest.raises(ValueError, match="layout"):
        twin_sections(tmp_path / "a", layout="tiny")
    with pytest.raises(ValueError, match="matrix_format"):
        twin_sections(tmp_path / "a", matrix_format="csv")
    with pytest.raises(ValueError, match="fold"):
        twin_sections(tmp_path / "a", n_cells=200, n_spots=40, warp=400.0, warp_length=200.0)
    with pytest.raises(FileExistsError, match="overwrite"):
        twin_sections(twin.truth_path.parent, overwrite=False)


# ---------------------------------------------------------------------------------------- sizes, spots
def test_sizes_and_spot_grid(twin):
    assert twin.n_cells == SMALL["n_cells"] == len(_xenium_cells(twin))
    assert abs(twin.n_spots_in_tissue - SMALL["n_spots"]) < 0.12 * SMALL["n_spots"]
    assert 0.7 < twin.n_cells_visium / twin.n_cells < 1.4  # same density, different cells
    pos = _positions(twin)
    assert ((pos["array_row"] + pos["array_col"]) % 2 == 0).all()  # hex parity
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    d, _ = cKDTree(xy).query(xy, k=2)
    pitch_um = d[:, 1] * twin.truth.um_per_px
    assert np.median(pitch_um) == pytest.approx(VISIUM_SPOT_PITCH_UM, rel=0.03)
    # spot positions are where the tissue is: pulled back, in-tissue spots lie in the Visium tissue
    um = twin.truth.inverse(xy)
    inside = twin.truth.tissue.in_section(um, "visium") > 0.5
    np.testing.assert_array_equal(inside, pos["in_tissue"].to_numpy() == 1)


def test_partial_overlap(twin):
    truth = pd.read_parquet(twin.truth_path / "xenium_cells.parquet")
    shared = truth["shared"].to_numpy()
    assert 0.75 < shared.mean() < 0.98  # most tissue is shared, not all
    spots = twin.visium_spots_truth()
    it = spots["in_tissue"] == 1
    assert 0.85 < spots.loc[it, "shared"].mean() < 1.0  # some spots have no Xenium tissue
    cap = twin.truth.in_capture_area(truth[["x", "y"]].to_numpy())
    assert 0.0 < (~cap).mean() < 0.2  # some Xenium cells lie outside the capture area


def test_hires_image_matches_tissue(twin):
    img = _hires(twin)
    s = twin.scalefactors["tissue_hires_scalef"]
    pos = _positions(twin)
    ij = np.floor(pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(float) * s).astype(int)
    bright = img[ij[:, 0], ij[:, 1]].mean(axis=1)
    it = pos["in_tissue"].to_numpy() == 1
    um = twin.truth.inverse(pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    far = twin.truth.tissue.section_signed_distance(um, "visium") < -60  # well outside the tissue
    assert (bright[it] < 225).mean() > 0.97  # stained where the spots say tissue
    assert (bright[far] > 235).all()  # glass
    # the image border is white glass
    assert img[:5].mean() > 240 and img[:, -5:].mean() > 240


def test_he_colours_nest_vs_stroma(twin):
    img = _hires(twin)
    s = twin.scalefactors["tissue_hires_scalef"]
    t = twin.truth
    tissue = t.tissue

    def window_mean(xy_um, r=3):
        i, j = np.floor(t.forward(np.atleast_2d(xy_um))[0][::-1] * s).astype(int)
        return img[i - r : i + r + 1, j - r : j + r + 1].reshape(-1, 3).mean(axis=0)

    inside = tissue.in_section(tissue.nests.centre, "visium") > 0.99
    nests = np.array([window_mean(c) for c in tissue.nests.centre[inside]])
    # stroma: tissue points far from any structure
    xmin, xmax, ymin, ymax = tissue.bbox()
    X, Y = np.meshgrid(np.linspace(xmin, xmax, 80), np.linspace(ymin, ymax, 80))
    g = np.column_stack([X.ravel(), Y.ravel()])
    g = g[(tissue.section_signed_distance(g, "visium") > 80) & (tissue.regions(g)["stroma"] > 0.999)]
    stroma = np.array([window_mean(p) for p in g[:40]])
    nest_mean, stroma_mean = nests.mean(axis=0), stroma.mean(axis=0)
    assert nest_mean.sum() < stroma_mean.sum() - 60  # darker
    # purple vs pink: nests have more blue relative to red than stroma
    assert nest_mean[2] / nest_mean[0] > stroma_mean[2] / stroma_mean[0] + 0.08
    assert stroma_mean[0] > stroma_mean[1] + 30  # stroma is pink (red > green)


# ---------------------------------------------------------------------------------------- biology
def test_genes(twin):
    assert len(twin.xenium_genes) == 300 and len(twin.visium_genes) == 3000
    for g in ("EGFR", "ERBB2", "KRT8", "PTPRC"):
        assert g in twin.shared_genes
    assert set(MARKERS) <= set(twin.shared_genes)
    assert set(twin.shared_genes) == set(twin.xenium_genes) & set(twin.visium_genes)
    assert len(set(twin.xenium_genes) - set(twin.visium_genes)) > 0  # panel add-ons absent from Visium
    genes = pd.read_csv(twin.truth_path / "genes.csv")
    assert genes["gene_id"].str.fullmatch(r"ENSG\d{11}").all()
    _, _, types = _xenium_matrix(twin)
    assert {"Negative Control Probe", "Negative Control Codeword", "Blank Codeword"} <= set(types)

    def ids(path):
        with h5py.File(path) as f:
            feats = f["matrix/features"]
            return dict(zip(feats["name"][()].astype(str), feats["id"][()].astype(str), strict=True))

    v_ids = ids(twin.visium_path / "filtered_feature_bc_matrix.h5")
    x_ids = ids(twin.xenium_path / "cell_feature_matrix.h5")
    assert all(v_ids[g] == x_ids[g] for g in twin.shared_genes)  # same ids across platforms


def test_xenium_counts_and_cell_types(twin):
    mat, names, types = _xenium_matrix(twin)
    cells = _xenium_cells(twin)
    gene = types == "Gene Expression"
    totals = np.asarray(mat[:, gene].sum(axis=1)).ravel()
    assert 50 <= np.median(totals) <= 300
    np.testing.assert_array_equal(totals, cells["transcript_counts"].to_numpy())
    np.testing.assert_array_equal(np.asarray(mat.sum(axis=1)).ravel(), cells["total_counts"].to_numpy())
    assert (cells["nucleus_area"] < cells["cell_area"]).all()
    truth = twin.xenium_cells_truth()
    assert (truth["cell_id"] == cells["cell_id"]).all()
    col = {n: i for i, n in enumerate(names)}
    ct = truth["cell_type"].to_numpy()

    def mean(g, t):
        return mat[ct == t, col[g]].mean()

    assert mean("PTPRC", "t_cell") > 10 * mean("PTPRC", "fibroblast")
    assert mean("COL1A1", "fibroblast") > 10 * mean("COL1A1", "tumour")
    assert mean("ERBB2", "tumour") > 10 * mean("ERBB2", "fibroblast")
    # nests are denser than stroma (cells per area)
    reg = truth["region"].value_counts(normalize=True)
    assert reg["nest"] > 1.5 * 0.24 * reg["stroma"] / 0.65  # 3.5x density at ~24% vs ~65% area
    assert set(ct) <= set(CELL_TYPES)


def test_egfr_follows_known_pattern(twin):
    mat, names, _ = _xenium_matrix(twin)
    truth = twin.xenium_cells_truth()
    tum = truth["cell_type"].to_numpy() == "tumour"
    egfr = mat[:, list(names).index("EGFR")].toarray().ravel()[tum]
    field = twin.truth.egfr_pattern(truth[["x", "y"]].to_numpy()[tum])
    np.testing.assert_allclose(field, truth["egfr_field"].to_numpy()[tum])
    assert np.corrcoef(egfr, field)[0, 1] > 0.4
    assert egfr[field > 0.8].mean() > 4 * egfr[field < 0.2].mean()


def test_visium_counts(twin):
    with h5py.File(twin.visium_path / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_feat, n_bc = m["shape"][()]
        mat = sparse.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=(n_feat, n_bc)).T.tocsr()
        names = list(m["features/name"][()].astype(str))
        bcs = m["barcodes"][()].astype(str)
    spots = twin.visium_spots_truth().set_index("barcode").loc[bcs]
    totals = np.asarray(mat.sum(axis=1)).ravel()
    n_cells = spots["n_cells"].to_numpy()
    assert np.corrcoef(totals, n_cells)[0, 1] > 0.6  # counts come from the cells under each spot
    # lower capture per cell than Xenium on the shared genes
    shared = [names.index(g) for g in twin.shared_genes]
    per_cell = mat[:, shared].sum() / max(n_cells.sum(), 1)
    assert per_cell < 0.6 * 150
    # EGFR follows the field in Visium too (spots rich in cells, high vs low field)
    egfr = mat[:, names.index("EGFR")].toarray().ravel()
    field = twin.truth.egfr_pattern(spots[["x_um", "y_um"]].to_numpy())
    erbb2 = mat[:, names.index("ERBB2")].toarray().ravel()  # tumour content
    tumour_rich = erbb2 > np.quantile(erbb2, 0.5)
    hi, lo = tumour_rich & (field > 0.7), tumour_rich & (field < 0.3)
    assert hi.sum() > 5 and lo.sum() > 5
    assert egfr[hi].sum() / erbb2[hi].sum() > 2.5 * egfr[lo].sum() / erbb2[lo].sum()


def test_transcripts_match_counts(twin):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(twin.xenium_path / "transcripts.parquet")  # plain strings, as XOA writes them
    assert schema.field("feature_name").type == pa.string() and schema.field("cell_id").type == pa.string()
    tx = pd.read_parquet(twin.xenium_path / "transcripts.parquet")
    mat, names, _ = _xenium_matrix(twin)
    assigned = tx["cell_id"] != "UNASSIGNED"
    assert assigned.sum() == mat.sum()
    per_feature = tx.loc[assigned, "feature_name"].value_counts().reindex(names, fill_value=0)
    np.testing.assert_array_equal(per_feature.to_numpy(), np.asarray(mat.sum(axis=0)).ravel())
    assert 0.02 < (~assigned).mean() < 0.08
    per_cell = tx.loc[assigned, "cell_id"].value_counts()
    cells = _xenium_cells(twin).set_index("cell_id")
    np.testing.assert_array_equal(per_cell.loc[cells.index].to_numpy(), cells["total_counts"].to_numpy())


# ---------------------------------------------------------------------------------------- determinism
def _digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(n_cells=300, n_spots=40, seed=11)
    a = twin_sections(tmp_path / "a", **kw)
    b = twin_sections(tmp_path / "b", **kw)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da == db and len(da) >= 12
    c = twin_sections(tmp_path / "c", **{**kw, "seed": 12})
    assert _digest(tmp_path / "c")["xenium/cells.csv.gz"] != da["xenium/cells.csv.gz"]
    assert a.truth.landmark_names == b.truth.landmark_names
    assert not np.allclose(a.truth.affine, c.truth.affine)
    # format switches never change the biology
    d = twin_sections(tmp_path / "d", **kw, cells_format="parquet", matrix_format="mtx", transcripts=False)
    cd = pd.read_parquet(d.xenium_path / "cells.parquet")
    pd.testing.assert_frame_equal(cd, pd.read_csv(a.xenium_path / "cells.csv.gz"), check_dtype=False)


# ---------------------------------------------------------------------------------------- read-back
def test_read_back_with_sda_io(twin):
    from spatialdata_align._constants import SPATIAL_KEY, VISIUM_TABLE, XENIUM_TABLE

    sdata = sda.io.read_pair(twin.xenium_path, twin.visium_path, transcripts=False)
    xt, vt = sdata.tables[XENIUM_TABLE], sdata.tables[VISIUM_TABLE]
    mat, _, types = _xenium_matrix(twin)
    assert xt.n_obs == twin.n_cells and xt.n_vars == len(twin.xenium_genes)
    assert xt.X.sum() == mat[:, types == "Gene Expression"].sum()
    cells = _xenium_cells(twin)
    np.testing.assert_allclose(xt.obsm[SPATIAL_KEY], cells[["x_centroid", "y_centroid"]].to_numpy(), atol=1e-6)
    assert vt.n_obs == twin.n_spots_in_tissue and vt.n_vars == len(twin.visium_genes)
    pos = _positions(twin).set_index("barcode")
    spot_xy = pos.loc[vt.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    np.testing.assert_allclose(vt.obsm[SPATIAL_KEY], spot_xy)
    # coordinates agree with the truth: spots pulled back into µm sit on the Xenium tissue they cover
    um = twin.truth.inverse(vt.obsm[SPATIAL_KEY])
    assert (twin.truth.tissue.in_section(um, "visium") > 0.5).all()
    assert set(twin.shared_genes) <= set(xt.var_names) & set(vt.var_names)


def test_read_back_full_layout_and_variants(twin_variant):
    from spatialdata_align._constants import VISIUM_TABLE, XENIUM_TABLE

    sdata = sda.io.read_pair(twin_variant.xenium_path, twin_variant.visium_path, transcripts=False)
    assert sdata.tables[XENIUM_TABLE].n_obs == twin_variant.n_cells
    assert sdata.tables[VISIUM_TABLE].n_obs == twin_variant.n_spots_in_tissue


# ---------------------------------------------------------------------------------------- engine, sizes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("flip", [False, True])
def test_auto_init_recovers_rotation_and_scale(tmp_path, flip):
    import xarray as xr

    from spatialdata_align.registration import auto_init, decompose_affine, rasterize

    tw = twin_sections(tmp_path, seed=0, flip=flip, transcripts=False)
    cells = _xenium_cells(tw)[["x_centroid", "y_centroid"]].to_numpy()
    src = rasterize(cells, dx=25.0, blur=25.0)
    img = _hires(tw) / 255.0
    s = tw.scalefactors["tissue_hires_scalef"]
    f = max(1, round(25.0 / (tw.truth.um_per_px / s)))
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    blocks = img[:h, :w].reshape(h // f, f, w // f, f, 3).mean((1, 3)).transpose(2, 0, 1)
    coords = {"c": [0, 1, 2], "y": (np.arange(h // f) * f + f / 2) / s, "x": (np.arange(w // f) * f + f / 2) / s}
    res = auto_init(src, xr.DataArray(blocks, dims=("c", "y", "x"), coords=coords))
    got, want = decompose_affine(res.matrix), decompose_affine(tw.truth.affine)
    assert got["reflection"] == want["reflection"] == flip
    d = (got["rotation_deg"] - want["rotation_deg"] + 180) % 360 - 180
    assert abs(d) < 2.0
    assert got["scale"] == pytest.approx(want["scale"], rel=0.05)


@pytest.mark.slow
def test_benchmark_size(tmp_path):
    t = time.perf_counter()
    tw = twin_sections(tmp_path, n_cells=100_000, n_spots=4000, seed=0, transcripts=False)
    assert time.perf_counter() - t < 60
    assert tw.n_cells == 100_000
    assert abs(tw.n_spots_in_tissue - 4000) < 400
    xy = tw.truth.landmarks_source
    np.testing.assert_allclose(tw.truth.inverse(tw.truth.forward(xy)), xy, atol=1e-6)
