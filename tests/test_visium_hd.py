"""Visium HD: the reader (own path and through spatialdata-io), the twin generator's HD layout, bin-level comparison."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from _io_data import MARKER, make_visium_hd
from spatialdata.transformations import get_transformation

import spatialdata_align as sda
from spatialdata_align._constants import (
    VISIUM_CS,
    VISIUM_CYTASSIST,
    VISIUM_HIRES,
    VISIUM_LOWRES,
    XENIUM_CELLS,
    XENIUM_CS,
)
from spatialdata_align.datasets._tenx import hd_barcodes

XY = ("x", "y")


def _matrix(el, cs=VISIUM_CS):
    return get_transformation(el, to_coordinate_system=cs).to_affine_matrix(input_axes=XY, output_axes=XY)


def _scale0(image):
    return image["scale0"]["image"] if hasattr(image, "children") and "scale0" in image else image


@pytest.fixture(scope="module")
def hin():
    return make_visium_hd()


@pytest.fixture(scope="module")
def hd_dirs(hin, tmp_path_factory):
    root = tmp_path_factory.mktemp("hd")
    return {
        # a full Space Ranger outs/ (feature_slice.h5: read through spatialdata_io.visium_hd)
        "outs": hin.write(root / "outs", images=("hires", "lowres", "cytassist"), feature_slice=True),
        # the binned outputs as downloaded: no feature_slice.h5, read by our own code
        "binned": hin.write(root / "binned" / "outs", images=("hires", "lowres", "cytassist")),
        "lowres_only": hin.write(root / "lowres" / "outs", images=("lowres",)),
    }


@pytest.mark.parametrize("layout", ["outs", "binned"])
def test_read_visium_hd_bins_exactly(hd_dirs, hin, layout):
    sdata = sda.io.read_visium_hd(hd_dirs[layout])  # bins=(8, 16) by default
    assert set(sdata.shapes) == {"visium_hd_bins_008um", "visium_hd_bins_016um"}
    assert set(sdata.tables) == {"visium_hd_table_008um", "visium_hd_table_016um"}
    assert set(sdata.coordinate_systems) == {VISIUM_CS}
    for size in (8, 16):
        b = hin.bins[size]
        tissue = b["in_tissue"] == 1
        table = sdata.tables[f"visium_hd_table_{size:03d}um"]
        barcodes = hd_barcodes(size, b["array_row"], b["array_col"])[tissue]
        assert list(table.obs_names) == list(barcodes)
        assert table.X.dtype == np.int32
        np.testing.assert_array_equal(table.X.toarray(), b["counts"].toarray())
        assert list(table.var_names) == ["EGFR", "KRT5", "MYDUP", "ACTB", "MYDUP-1", "GAPDH"]
        xy = np.column_stack([b["pxl_col_in_fullres"], b["pxl_row_in_fullres"]])[tissue]
        np.testing.assert_array_equal(table.obsm["spatial"], xy)
        np.testing.assert_array_equal(table.obs["array_row"], b["array_row"][tissue])
        sf = sda.io.visium_scalefactors(table)
        assert sf["microns_per_pixel"] == 0.5 and sf["bin_size_um"] == size and sf["um_per_px"] == 0.5
        assert sf["spot_diameter_fullres"] == size / 0.5
        # squares of the bin's side around each centre
        squares = sdata.shapes[f"visium_hd_bins_{size:03d}um"]
        assert list(squares.index) == list(barcodes)
        np.testing.assert_allclose(squares.geometry.centroid.x, xy[:, 0])
        np.testing.assert_allclose(squares.geometry.area, (size / 0.5) ** 2)
        node = table.uns["spatial"]["visium_hd"]
        assert set(node["images"]) == {"hires", "lowres"} and node["scalefactors"]["bin_size_um"] == size
    # the marker bin lands on its marker pixel in every image (CytAssist placed by Space Ranger's matrices in
    # the delegated path, by regist_target_img_scalef in ours: the same place)
    t8 = sdata.tables["visium_hd_table_008um"]
    mb = hd_barcodes(8, hin.bins[8]["array_row"], hin.bins[8]["array_col"])[hin.marker_bin]
    x, y = t8.obsm["spatial"][list(t8.obs_names).index(mb)]
    assert set(sdata.images) == {VISIUM_HIRES, VISIUM_LOWRES, VISIUM_CYTASSIST}
    for name, s in ((VISIUM_HIRES, 0.4), (VISIUM_LOWRES, 0.1), (VISIUM_CYTASSIST, 0.25)):
        img = sdata.images[name]
        np.testing.assert_allclose(_matrix(img), np.diag([1 / s, 1 / s, 1.0]), atol=1e-9)
        arr = np.asarray(_scale0(img).values)
        np.testing.assert_array_equal(arr[:, int(np.floor(y * s)), int(np.floor(x * s))], MARKER, err_msg=name)
    assert sda.io.registration_target(sdata) == VISIUM_HIRES


def test_delegated_and_own_paths_agree(hd_dirs):
    a = sda.io.read_visium_hd(hd_dirs["outs"], bins=(2, 8, 16))
    b = sda.io.read_visium_hd(hd_dirs["binned"], bins=(2, 8, 16))
    for name in a.tables:
        ta, tb = a.tables[name], b.tables[name]
        assert (ta.X != tb.X).nnz == 0
        pd.testing.assert_frame_equal(ta.obs, tb.obs)
        pd.testing.assert_frame_equal(ta.var, tb.var)
        np.testing.assert_array_equal(ta.obsm["spatial"], tb.obsm["spatial"])
    for name in a.shapes:
        assert a.shapes[name].geometry.geom_equals_exact(b.shapes[name].geometry, tolerance=1e-9).all()
    for name in a.images:
        np.testing.assert_allclose(_matrix(a.images[name]), _matrix(b.images[name]), atol=1e-9)
        np.testing.assert_array_equal(np.asarray(_scale0(a.images[name])), np.asarray(_scale0(b.images[name])))


def test_visium_hd_folders_as_users_have_them(hd_dirs, hin, tmp_path):
    # lowres only: a warning naming the missing hires image, the lowres image is the registration target
    with pytest.warns(UserWarning, match=r"tissue_hires_image\.png not found"):
        sd = sda.io.read_visium_hd(hd_dirs["lowres_only"], bins=(16,))
    assert sda.io.registration_target(sd) == VISIUM_LOWRES
    # the binned_outputs folder itself, or the run folder holding outs/
    assert set(sda.io.read_visium_hd(hd_dirs["binned"] / "binned_outputs").tables) >= {"visium_hd_table_008um"}
    assert sda.io.is_visium_hd(hd_dirs["binned"].parent) and not sda.io.is_visium_hd(tmp_path)
    # clear errors naming what is missing
    with pytest.raises(FileNotFoundError, match=r"no 32 µm bins \(square_032um/\).*holds: square_002um/"):
        sda.io.read_visium_hd(hd_dirs["binned"], bins=(32,))
    broken = shutil.copytree(hd_dirs["binned"], tmp_path / "outs")
    (broken / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"'tissue_positions\.parquet' found in .*square_016um/spatial"):
        sda.io.read_visium_hd(broken)
    (broken / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"filtered_feature_bc_matrix\.h5.*square_008um"):
        sda.io.read_visium_hd(broken, bins=(8,))
    # a feature_slice.h5 spatialdata_io cannot read: a warning, then the same bins from our own path
    odd = shutil.copytree(hd_dirs["outs"], tmp_path / "odd")
    (odd / "feature_slice.h5").write_bytes(b"not hdf5")
    with pytest.warns(UserWarning, match=r"spatialdata_io\.visium_hd could not read .*read directly"):
        sd = sda.io.read_visium_hd(odd, bins=(16,))
    assert sd.tables["visium_hd_table_016um"].n_obs == int(hin.bins[16]["in_tissue"].sum())
    # swapped pixel columns in the bin positions: caught by the same plausibility checks as Visium
    swapped = shutil.copytree(hd_dirs["binned"], tmp_path / "swapped")
    pos = swapped / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    df = pd.read_parquet(pos)
    df[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = df[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    df.to_parquet(pos, index=False)
    with pytest.raises(ValueError, match=r"tissue_positions\.parquet"):
        sda.io.read_visium_hd(swapped, bins=(16,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Visium HD binned outputs.*binned_outputs/square_<size>um/"):
        sda.io.read_visium_hd(tmp_path / "empty")


def test_visium_hd_download_of_some_bin_sizes_and_one_bin_folder(hd_dirs, hin, tmp_path):
    """Users share what they downloaded: one or two bin sizes, or one bin's square_<size>um/ folder."""
    from spatialdata_align.io._visium_hd import default_bins

    only8 = shutil.copytree(hd_dirs["binned"], tmp_path / "only8")
    for s in ("square_002um", "square_016um"):
        shutil.rmtree(only8 / "binned_outputs" / s)
    sd = sda.io.read_visium_hd(only8)  # the default (8, 16): the one present
    assert set(sd.tables) == {"visium_hd_table_008um"}
    assert sd.tables["visium_hd_table_008um"].n_obs == int(hin.bins[8]["in_tissue"].sum())
    assert default_bins(only8) == (8,) and default_bins(only8, include=(16,)) == (8, 16)
    assert default_bins(hd_dirs["binned"]) == (8, 16) and default_bins(hd_dirs["binned"], include=(2,)) == (2, 8, 16)
    only2 = shutil.copytree(hd_dirs["binned"], tmp_path / "only2")
    shutil.rmtree(only2 / "binned_outputs" / "square_008um")
    assert default_bins(only2) == (16,)  # 16 present: 2 µm bins only when asked for
    # one bin size's folder: detected as HD (read_pair and the CLI route it), read from its parent
    one = hd_dirs["binned"] / "binned_outputs" / "square_008um"
    assert sda.io.is_visium_hd(one)
    assert set(sda.io.read_visium_hd(one).tables) == {"visium_hd_table_008um", "visium_hd_table_016um"}
    # read_visium on an HD folder says which reader to use (it read a bin folder as 55 µm spots, 7x off in scale)
    for path in (hd_dirs["binned"], one):
        with pytest.raises(ValueError, match=r"is a Visium HD folder .*read_visium_hd"):
            sda.io.read_visium(path)


# ------------------------------------------------------------------------------------------ the twin's HD layout
@pytest.fixture(scope="module")
def hd_twin(tmp_path_factory):
    return sda.datasets.twin_sections(
        tmp_path_factory.mktemp("hdtwin"), n_cells=4500, n_spots=110, seed=4, visium_hd=True
    )


def test_twin_writes_the_visium_hd_layout(hd_twin):
    binned = hd_twin.visium_path / "binned_outputs"
    assert sorted(p.name for p in binned.iterdir()) == ["square_002um", "square_008um", "square_016um"]
    for size in (2, 8, 16):
        spatial = binned / f"square_{size:03d}um" / "spatial"
        assert {"tissue_positions.parquet", "scalefactors_json.json", "tissue_hires_image.png"} <= {
            p.name for p in spatial.iterdir()
        }
    sdata = sda.io.read_visium_hd(hd_twin.visium_path, bins=(2, 8, 16))
    totals = {s: sdata.tables[f"visium_hd_table_{s:03d}um"].X.sum(axis=0).A1 for s in (2, 8, 16)}
    # the bins nest exactly: every molecule is counted once at every size
    np.testing.assert_array_equal(totals[2], totals[8])
    np.testing.assert_array_equal(totals[8], totals[16])
    t8 = sdata.tables["visium_hd_table_008um"]
    assert 10 < np.median(np.asarray(t8.X.sum(1)).ravel()) < 200  # UMIs per 8 µm bin
    # bin centres are where the truth puts them: pulled back to the Xenium frame they lie on the Visium section
    sf = sda.io.visium_scalefactors(t8)
    assert sf["microns_per_pixel"] == pytest.approx(hd_twin.truth.um_per_px)
    um = hd_twin.truth.inverse(t8.obsm["spatial"][::50])
    assert np.mean(hd_twin.tissue.section_signed_distance(um, "visium") > -10) > 0.98
    # read_pair detects the HD folder
    pair = sda.io.read_pair(hd_twin.xenium_path, hd_twin.visium_path, transcripts=False)
    assert {"visium_hd_bins_008um", "visium_hd_bins_016um", XENIUM_CELLS} <= set(pair.shapes)


def test_bin_level_comparison_with_the_true_affine(hd_twin):
    """Cells placed by an affine fitted to the exact landmarks: EGFR agrees at 16 µm bins, not when shuffled."""
    sdata = sda.io.read_pair(hd_twin.xenium_path, hd_twin.visium_path, transcripts=False)
    sdata.align.set_landmarks(source=hd_twin.truth.landmarks_source, target=hd_twin.truth.landmarks_target)
    sdata.align.affine(XENIUM_CELLS)
    sda.tl.bin_cells(sdata, 16)  # writes table xenium_bins_016um
    binned = sdata.tables["xenium_bins_016um"]
    assert binned.n_obs == sdata.tables["visium_hd_table_016um"].n_obs
    assert binned.obs["n_cells"].sum() > 0.8 * sdata.tables["xenium_table"].n_obs * 0.8  # most cells land in bins
    assert sda.tl.compare_bins(sdata, 16, binned="xenium_bins_016um") is None  # written, scanpy-style
    comp = sdata.tables["visium_hd_table_016um"].uns["sda_compare_bins"].set_index("gene")
    assert comp.loc["EGFR", "pearson"] > 0.3 and comp.loc["EGFR", "bin_size_um"] == 16
    from spatialdata_align.datasets._genes import MARKERS

    assert len(set(comp.index[:10]) & set(MARKERS)) >= 8  # the cell-type markers agree best; most fillers are noise
    pd.testing.assert_frame_equal(sda.tl.compare_bins(sdata, 16, copy=True), comp.reset_index())
    # the same with the Xenium cells shuffled among themselves: no agreement left
    table = sdata.tables["xenium_table"]
    table.X = table.X[np.random.default_rng(0).permutation(table.n_obs)]
    shuffled = sda.tl.compare_bins(sdata, 16, copy=True).set_index("gene")
    assert abs(shuffled.loc["EGFR", "pearson"]) < 0.15


def test_spot_functions_on_a_visium_hd_object_point_to_the_bin_functions(hd_twin):
    """pl.overlay draws the cells without spots on a Visium HD object (no spots there); spot-level functions say it
    is a Visium HD object and name the bin-level ones (they said: read the folder with read_pair, which was done)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = sda.io.read_pair(hd_twin.xenium_path, hd_twin.visium_path)
    sdata.align.set_landmarks(source=hd_twin.truth.landmarks_source, target=hd_twin.truth.landmarks_target)
    sdata.align.affine(XENIUM_CELLS)
    sdata.align.apply(XENIUM_CELLS)
    ax = sda.pl.overlay(sdata)
    assert any("Xenium cells" in t.get_text() for t in ax.get_legend().get_texts())
    assert not any("Visium spots" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close("all")
    for f in (lambda: sda.pl.gene(sdata, "EGFR"), lambda: sda.tl.shared_region(sdata)):
        with pytest.raises(ValueError, match=r"Visium HD object.*sda\.tl\.bin_cells.*sda\.pl\.bins_gene"):
            f()


def test_run_aligns_xenium_onto_visium_hd(hd_twin, tmp_path):
    from spatialdata_align.cli import main

    report = tmp_path / "report"
    args = ["run", "--xenium", str(hd_twin.xenium_path), "--visium", str(hd_twin.visium_path)]
    args += ["--landmarks", str(hd_twin.landmarks_path), "--out", str(tmp_path / "a.zarr"), "--report", str(report)]
    assert main([*args, "--dx", "30", "--quiet"]) == 0
    import json

    import spatialdata

    summary = json.loads((report / "summary.json").read_text())
    assert summary["visium_hd"]["bin_size_um"] == 16 and summary["visium_hd"]["n_bins_compared"] > 100
    assert summary["registration_target"] == VISIUM_HIRES
    corr = pd.read_csv(report / "gene_correlations.csv").set_index("gene")
    assert corr.loc["EGFR", "pearson"] > 0.3
    assert {"overlay.png", "EGFR_side_by_side.png", "xenium_explorer_alignment.csv"} <= {
        p.name for p in report.iterdir()
    }
    back = spatialdata.read_zarr(tmp_path / "a.zarr")
    from spatialdata_align._elements import element_xy

    cells = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(back, "xenium_cells_aligned", VISIUM_CS) - hd_twin.truth.forward(cells), axis=1)
    assert np.median(err * hd_twin.truth.um_per_px) < 10.0
    assert "xenium_bins_016um" in back.tables
    # 'in_shared' and n_cells_shared: the cells over an in-tissue 16 µm bin (not every cell: the capture area and
    # the tissue end somewhere), counted here from the written bins
    exported = pd.read_csv(report / "aligned_cells.csv.gz")
    bins = back.tables["visium_hd_table_016um"]
    xy = element_xy(back, "visium_hd_bins_016um", VISIUM_CS)
    half = 16 / 2 / (summary["n_cells"] and hd_twin.truth.um_per_px)
    from scipy.spatial import cKDTree

    order = back["visium_hd_bins_016um"].index.get_indexer(bins.obs[bins.uns["spatialdata_attrs"]["instance_key"]])
    tissue = bins.obs["in_tissue"].to_numpy(bool)[np.argsort(order)]
    dist, nearest = cKDTree(xy).query(exported[["x_px", "y_px"]].to_numpy(), p=np.inf)
    expect = (dist <= half * 1.0001) & tissue[nearest]
    assert 0 < expect.sum() < len(exported)
    assert (exported["in_shared"].to_numpy(bool) == expect).mean() > 0.995
    assert summary["n_cells_shared"] == int(exported["in_shared"].sum())


@pytest.mark.slow
def test_demo_visium_hd_within_the_visium_bounds(tmp_path, capsys):
    """``demo --visium-hd`` (default size): the same TRE bounds as ``demo``, and EGFR agrees at 16 µm bins."""
    import json

    from spatialdata_align.cli import main

    for flag, out in (([], tmp_path / "sd"), (["--visium-hd"], tmp_path / "hd")):
        assert main(["demo", "--out", str(out), "--quiet", *flag]) == 0
    sd, hd = (json.loads((tmp_path / k / "report" / "summary.json").read_text()) for k in ("sd", "hd"))
    for s in (sd, hd):
        assert s["tre_um"]["affine+lddmm"]["median"] < 7.0 and s["tre_um"]["affine+lddmm"]["p95"] < 15.0
    assert hd["tre_um"]["affine+lddmm"]["median"] <= sd["tre_um"]["affine+lddmm"]["median"] * 1.2
    assert hd["gene_correlation"]["level"] == "16 um bins" and hd["gene_correlation"]["pearson"] > 0.3
