"""Wrong inputs are caught before any work: a clear message naming the file, inputs untouched, no output left.

Each case copies the folders of one small generated twin into a temporary folder, corrupts the copy the way
a user's folder gets corrupted, and runs ``spatialdata-align run`` on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata
from PIL import Image

import spatialdata_align as sda
from spatialdata_align import _checks, _store
from spatialdata_align.cli import main


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return sda.datasets.twin_sections(tmp_path_factory.mktemp("checks"), n_cells=1500, n_spots=120, seed=4)


@pytest.fixture
def case(twin, tmp_path):
    """A private copy of the twin's folders (and landmarks) to corrupt."""
    root = tmp_path / "inputs"
    shutil.copytree(twin.xenium_path, root / "xenium")
    shutil.copytree(twin.visium_path, root / "visium" / "outs")
    shutil.copy(twin.landmarks_path, root / "landmarks.csv")
    return Case(root, tmp_path)


class Case:
    def __init__(self, root: Path, tmp: Path):
        self.root, self.tmp = root, tmp
        self.xenium, self.visium = root / "xenium", root / "visium" / "outs"
        self.landmarks = root / "landmarks.csv"
        self.spatial = self.visium / "spatial"
        self.out, self.report = tmp / "results" / "aligned.zarr", tmp / "results" / "report"
        self._before = None

    def snapshot(self) -> dict:
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        }

    def freeze(self) -> None:
        """Remember the (corrupted) inputs, to check they stay byte-identical."""
        self._before = self.snapshot()

    def run(self, capsys, *extra, landmarks=True, out=None, report=None, xenium=None, visium=None):
        self.freeze()
        args = ["run", "--xenium", str(xenium or self.xenium), "--visium", str(visium or self.visium)]
        if landmarks:
            args += ["--landmarks", str(self.landmarks)]
        args += ["--out", str(out or self.out), "--report", str(report or self.report), "--quiet", *extra]
        rc = main(args)
        captured = capsys.readouterr()
        return rc, captured.err

    def assert_untouched(self) -> None:
        assert self.snapshot() == self._before, "an input file changed"
        results = self.tmp / "results"
        left = sorted(p.name for p in results.iterdir()) if results.exists() else []
        assert left == [], f"output left behind: {left}"
        assert not list(self.tmp.rglob("*sda-tmp*")), "a temporary output was left behind"


def _positions(case: Case) -> pd.DataFrame:
    return pd.read_csv(case.spatial / "tissue_positions.csv")


def _refused(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in the message:\n{err}"


# ---------------------------------------------------------------------------------------------- landmarks
def test_landmark_typo_is_named_before_any_work(case, capsys):
    lm = pd.read_csv(case.landmarks)
    lm.loc[3, "target_x"] += 1e6
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", f"'{lm.loc[3, 'name']}'", "line 5", "typo")
    assert err.count("landmark '") == 1  # only the wrong one is named
    case.assert_untouched()


def test_a_repeated_landmark_row_is_refused_naming_both_lines(case, capsys):
    """A pasted duplicate row would count twice in the fit and be held out with its copy still in the fit."""
    lm = pd.read_csv(case.landmarks)
    pd.concat([lm, lm.iloc[[1]]]).to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    name = lm.loc[1, "name"]
    _refused(rc, err, "landmarks.csv", f"'{name}', line 3", f"'{name}', line {len(lm) + 2}", "more than once")
    case.assert_untouched()
    # two distinct landmarks 1.5 µm apart at both ends are not a repeat
    src = np.array([[500.0, 800.0], [2500.0, 900.0], [1400.0, 2600.0], [1401.5, 2600.0]])
    assert _checks.check_landmarks(src, src * 3.6 + 4000.0, um_per_px=1 / 3.6).findings == []


def test_target_landmarks_off_the_image_are_refused_before_the_work(case, capsys):
    """Every target landmark shifted off the H&E (consistent with each other, so no typo check fires): refused
    naming the image's extent, instead of a whole alignment ending in "the modalities share no tissue"."""
    lm = pd.read_csv(case.landmarks)
    lm["target_x"] -= 50000
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", f"{len(lm)} of {len(lm)} target landmarks lie outside the Visium image")
    case.assert_untouched()


def test_no_spot_in_tissue_is_refused_before_the_work(case, capsys):
    pos = _positions(case)
    pos["in_tissue"] = 0
    pos.to_csv(case.spatial / "tissue_positions.csv", index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "marks none of the", "in_tissue is 0 everywhere")
    case.assert_untouched()


def test_landmark_rows_out_of_order_are_called_mismatched_not_typos_or_a_mirror(case, capsys):
    """Target rows shifted by one against the source rows: no affine fits most pairs, so the message says the rows
    do not belong together (it named single "typos", or a mirror with --allow-flip as the fix)."""
    lm = pd.read_csv(case.landmarks)
    assert len(lm) >= 5
    lm[["target_x", "target_y"]] = np.roll(lm[["target_x", "target_y"]].to_numpy(), 1, axis=0)
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", "do not belong together, or several are wrong")
    assert "--allow-flip" not in err and "a typo" not in err, err
    case.assert_untouched()


def test_two_swapped_landmark_targets_are_both_named(case, capsys):
    """Another form of a bad landmark: two rows whose targets were exchanged."""
    lm = pd.read_csv(case.landmarks)
    lm.loc[[0, 5], ["target_x", "target_y"]] = lm.loc[[5, 0], ["target_x", "target_y"]].to_numpy()
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", f"'{lm.loc[0, 'name']}'", f"'{lm.loc[5, 'name']}'")
    case.assert_untouched()


def test_yx_target_landmarks_are_a_reflection(case, capsys):
    lm = pd.read_csv(case.landmarks)
    lm[["target_x", "target_y"]] = lm[["target_y", "target_x"]].to_numpy()
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", "mirrored", "(y, x)", "--allow-flip")
    case.assert_untouched()


def test_reflection_is_accepted_with_flip(twin):
    src, dst = twin.truth.landmarks_source, twin.truth.landmarks_target
    mirrored = dst[:, ::-1]
    upp = twin.truth.um_per_px
    with pytest.raises(_checks.PlausibilityError, match="mirrored"):
        _checks.check_landmarks(src, mirrored, um_per_px=upp)
    res = _checks.check_landmarks(src, mirrored, um_per_px=upp, flip=True)
    assert res.reflection and not res.outliers
    # the right landmarks pass, and their held-out residuals are small
    ok = _checks.check_landmarks(src, dst, um_per_px=upp)
    assert not ok.reflection and not ok.outliers and np.nanmedian(ok.loo_um) < 30


def test_collinear_landmarks_suggest_what_the_cli_offers(case, capsys):
    lm = pd.read_csv(case.landmarks).iloc[:4].copy()
    t = np.linspace(0, 1, 4)
    lm["source_x"], lm["source_y"] = 500 + 1000 * t, 800 + 400 * t
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", "line", "--auto-init")
    assert "kind='similarity'" not in err.split("Python:")[0]  # the CLI hint comes first
    case.assert_untouched()


def test_landmarks_in_hires_pixels_get_the_units_hint(case, capsys, twin):
    lm = pd.read_csv(case.landmarks)
    lm[["target_x", "target_y"]] *= twin.scalefactors["tissue_hires_scalef"]
    lm.to_csv(case.landmarks, index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "landmarks.csv", "--landmark-units hires")
    case.assert_untouched()


def test_landmarks_in_hires_pixels_are_converted_with_landmark_units_hires(case, capsys, twin):
    """The same hires-pixel landmarks with ``--landmark-units hires``: accepted and converted to full resolution.

    Fails when the flag is ignored (the run is refused as above) or the conversion is wrong (the stored targets and
    the affine fitted from them are off by the hires scale factor), and when ``--dx`` does not reach the fit.
    """
    lm = pd.read_csv(case.landmarks)
    full = lm[["target_x", "target_y"]].to_numpy()
    lm[["target_x", "target_y"]] *= twin.scalefactors["tissue_hires_scalef"]
    lm.to_csv(case.landmarks, index=False)
    args = ["run", "--xenium", str(case.xenium), "--visium", str(case.visium), "--landmarks", str(case.landmarks)]
    args += ["--out", str(case.out), "--quiet", "--landmark-units", "hires", "--loo", "none", "--dx", "40"]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    back = spatialdata.read_zarr(case.out)
    src, dst = back.align.landmarks()
    np.testing.assert_allclose(src, lm[["source_x", "source_y"]].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(dst, full, rtol=1e-9)
    # the affine is fitted to the full-resolution targets: residuals of the landmarks' placement noise (a few µm)
    a = back.align.get("xenium_to_visium_affine").affine
    residual_um = np.linalg.norm(src @ a[:2, :2].T + a[:2, 2] - full, axis=1) * twin.truth.um_per_px
    assert np.median(residual_um) < 20.0
    assert _store.get_entry(back, "xenium_to_visium_lddmm")["dx"] == 40.0  # --dx reached the fit too


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("source in Xenium pixels", "morphology-image pixels"),
        ("target in µm", "look like µm"),
        ("source and target exchanged", "swap the two column pairs"),
        ("source in nm", "look like nm"),
        ("target in lowres pixels", "tissue_lowres_scalef"),
        ("target in hires pixels", "look like hires-image pixels; pass --landmark-units hires"),
        ("target declared hires but full resolution", "look like full-resolution pixels, not hires ones"),
        ("source in µm times the Xenium pixel size", "look like µm multiplied by 0.2125"),
    ],
)
def test_landmarks_in_other_units_get_a_specific_hint(twin, what, needle):
    src, dst = twin.truth.landmarks_source, twin.truth.landmarks_target
    upp = twin.truth.um_per_px
    s, d = {
        "source in Xenium pixels": (src / 0.2125, dst),
        "target in µm": (src, dst * upp),
        "source and target exchanged": (dst, src),
        "source in nm": (src * 1000, dst),
        "target in lowres pixels": (src, dst * twin.scalefactors["tissue_lowres_scalef"]),
        "target in hires pixels": (src, dst * twin.scalefactors["tissue_hires_scalef"]),
        # declared hires, so the run divided the (full-resolution) targets by the hires scale factor
        "target declared hires but full resolution": (src, dst / twin.scalefactors["tissue_hires_scalef"]),
        "source in µm times the Xenium pixel size": (src * 0.2125, dst),
    }[what]
    units = "hires" if what.startswith("target declared hires") else "fullres"
    with pytest.raises(_checks.PlausibilityError, match="scale factors imply") as e:
        _checks.check_landmarks(
            s, d, file="lm.csv", um_per_px=upp, scalefactors=twin.scalefactors, flip=True, landmark_units=units
        )
    assert needle in str(e.value)


def test_correct_landmarks_outside_the_others_spread_are_not_called_typos():
    """Four correct landmarks of a validation pair (``cortex`` at 900 cells/mm², seed 7: 8-15 µm clicks, a smooth
    warp and anisotropic scale): ``granular_-0.20`` lies outside the triangle of the other three, whose affine places
    it 659 µm away by extrapolation. The plain held-out error called it a typo and refused the run; at its leverage
    in the others' fit it is an ordinary click. Fails when the held-out errors are compared without the leverage."""
    src = np.array([[3411.82, 1061.57], [1393.34, 1946.52], [2517.54, 1403.74], [1255.83, 998.94]])
    dst = np.array([[1535.60, 4841.37], [3364.96, 1100.82], [2440.25, 3223.08], [4677.81, 2397.21]])
    res = _checks.check_landmarks(src, dst, file="lm.csv", um_per_px=0.63006, flip=True)
    assert not res.outliers and res.findings == []
    assert res.loo_um[3] > 600  # the held-out error itself is still reported as it is
    # a click 600 µm off among six well-spread landmarks is still named
    src6 = np.array([[0.0, 0.0], [2000.0, 0.0], [0.0, 2000.0], [2000.0, 2000.0], [1000.0, 1000.0], [1000.0, 2600.0]])
    dst6 = src6 * 3.6 + [4000.0, 3000.0] + np.random.default_rng(0).normal(0, 30, src6.shape)
    dst6[4] += [600.0 * 3.6, 0.0]
    with pytest.raises(_checks.PlausibilityError, match="typo") as e:
        _checks.check_landmarks(src6, dst6, file="lm.csv", um_per_px=1 / 3.6)
    assert "line 6" in str(e.value)


def test_too_few_and_disagreeing_landmarks():
    """Two pairs are refused as too few (not as a line); three that no rotation + scale maps onto each other are
    flagged, since with three the wrong one cannot be named."""
    src = np.array([[500.0, 800.0], [2500.0, 900.0], [1400.0, 2600.0]])
    dst = src * 3.6 + [4000.0, 3000.0]
    with pytest.raises(
        _checks.PlausibilityError, match=r"lm\.csv: 2 landmark pair\(s\): an affine needs at least 3"
    ) as e:
        _checks.check_landmarks(src[:2], dst[:2], file="lm.csv", um_per_px=1 / 3.6)
    assert e.value.code == "too_few_landmarks"
    assert _checks.check_landmarks(src, dst, file="lm.csv", um_per_px=1 / 3.6).findings == []
    bad = dst.copy()
    bad[2] += [600.0 * 3.6, 0.0]  # 600 µm off
    with pytest.raises(_checks.PlausibilityError, match="the 3 landmarks disagree") as e:
        _checks.check_landmarks(src, bad, file="lm.csv", um_per_px=1 / 3.6)
    assert e.value.code == "landmark_outlier"


def test_landmarks_along_a_line_whose_affine_has_the_wrong_scale_get_the_line_hint():
    """Four landmarks within 60 x 10 µm, clicked with ~100 µm of error: even the affine with its shape prior
    stretches across their line (2.35x the expected scale, the check fires), while a rotation + scale of the same
    landmarks has the expected scale, so the message blames their geometry, not the units. (With the shape prior,
    only tightly clustered or nearly collinear landmarks with large click errors reach this branch: 6 of 1500
    random landmark sets of 3-5 over 0.3-8 mm with 5-150 µm of click noise.)"""
    upp = 0.2737
    src = np.array([[1145.5, 1017.6], [1118.6, 1008.6], [1083.5, 1014.1], [1124.3, 1013.2]])
    clicks_um = np.array([[33.7, 81.3], [-67.4, -126.7], [149.3, 32.3], [-152.0, 59.2]])
    dst = (src + clicks_um) / upp + [4000.0, 3000.0]
    with _checks.relaxed():
        check = _checks.check_landmarks(src, dst, file="lm.csv", um_per_px=upp, flip=True)
    (scale,) = [f for f in check.findings if f.code == "landmark_scale"]
    assert check.scale_ratio == pytest.approx(2.35, abs=0.05)
    assert "lie close to a line" in scale.message and "kind='similarity'" in scale.fix


def test_landmarks_close_to_a_line_do_not_fail_the_scale_check():
    """Three landmarks 1 % off a line, one clicked 12 µm off: the plain affine's scale is 0.63x, but the fit the run
    uses (the affine with its shape prior) keeps the expected scale, so the check lets them through."""
    from spatialdata_align.registration import fit_affine

    upp = 0.2737
    th = np.radians(30)
    lin = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) / upp
    src = np.array([[500.0, 800.0], [1500.0, 870.0], [2500.0, 980.0]])
    dst = src @ lin.T + [4000.0, 3000.0]
    along = src[2] - src[0]
    across = np.array([-along[1], along[0]]) / np.linalg.norm(along)
    dst[1] += 12.0 * (lin @ across)  # a 12 µm click error across the line
    plain = np.sqrt(abs(np.linalg.det(fit_affine(src, dst, shape_prior=0.0).matrix[:2, :2]))) * upp
    assert plain == pytest.approx(0.631, abs=0.001)  # what the check used to judge, and refuse
    check = _checks.check_landmarks(src, dst, file="lm.csv", um_per_px=upp)
    assert check.scale_ratio == pytest.approx(1.0, abs=0.05)
    assert not [f for f in check.findings if f.code == "landmark_scale"]
    # the same landmarks without the click error pass
    _checks.check_landmarks(src, src @ lin.T + [4000.0, 3000.0], file="lm.csv", um_per_px=upp)


def test_force_accepts_a_named_outlier_and_marks_the_run_unreliable(case, capsys):
    lm = pd.read_csv(case.landmarks)
    lm.loc[3, "target_x"] += 1e6
    lm.to_csv(case.landmarks, index=False)
    case.freeze()
    with pytest.warns(_checks.PlausibilityWarning, match="typo"):
        rc = main(
            [
                "run",
                *("--xenium", str(case.xenium), "--visium", str(case.visium), "--landmarks", str(case.landmarks)),
                *("--out", str(case.out), "--report", str(case.report), "--quiet", "--force", "--loo", "affine"),
                *("--dx", "40"),
            ]
        )
    out = capsys.readouterr()
    assert rc == 0
    summary = json.loads((case.report / "summary.json").read_text())
    assert summary["verdict"]["level"] == "unreliable"
    assert any("typo" in r for r in summary["verdict"]["reasons"])
    assert out.err.strip().splitlines()[-1].startswith("verdict: unreliable")
    # the outlier stayed out of the fit: the other landmarks are matched to a few µm
    loo = pd.read_csv(case.report / "landmarks_loo.csv")
    assert loo.loc[~loo["inlier"], "name"].tolist() == [lm.loc[3, "name"]]
    assert loo.loc[loo["inlier"], "fit_residual_um"].max() < 40
    assert case.snapshot() == case._before


# ---------------------------------------------------------------------------------------------- Visium folder
def test_swapped_pixel_columns(case, capsys):
    pos = _positions(case)
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    pos.to_csv(case.spatial / "tissue_positions.csv", index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_positions.csv", "pxl_row_in_fullres", "swapped")
    case.assert_untouched()


def test_swapped_pixel_columns_in_an_old_headerless_file(case, capsys):
    """Space Ranger 1 layout (no header), columns swapped."""
    pos = _positions(case)
    pos = pos[["barcode", "in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"]]
    (case.spatial / "tissue_positions.csv").unlink()
    pos.to_csv(case.spatial / "tissue_positions_list.csv", index=False, header=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_positions_list.csv", "swapped")
    case.assert_untouched()


def test_swapped_array_columns(case, capsys):
    pos = _positions(case)
    pos[["array_row", "array_col"]] = pos[["array_col", "array_row"]].to_numpy()
    pos.to_csv(case.spatial / "tissue_positions.csv", index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_positions.csv", "array_row", "swapped")
    case.assert_untouched()


def _resize(path: Path, factor: float) -> None:
    with Image.open(path) as im:
        im.resize((max(1, round(im.width * factor)), max(1, round(im.height * factor)))).save(path)


def test_hires_image_at_half_size(case, capsys):
    _resize(case.spatial / "tissue_hires_image.png", 0.5)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_hires_image.png", "tissue_hires_scalef", "2x smaller")
    case.assert_untouched()


def test_lowres_image_enlarged(case, capsys):
    """The other image and the other direction: lowres resized up by 1.6."""
    _resize(case.spatial / "tissue_lowres_image.png", 1.6)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_lowres_image.png", "tissue_lowres_scalef")
    case.assert_untouched()


def test_hires_image_rotated(case, capsys):
    with Image.open(case.spatial / "tissue_hires_image.png") as im:
        im.transpose(Image.Transpose.ROTATE_90).save(case.spatial / "tissue_hires_image.png")
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_hires_image.png", "aspect ratio")
    case.assert_untouched()


def test_hires_and_lowres_scalefactors_swapped(case, capsys):
    f = case.spatial / "scalefactors_json.json"
    sf = json.loads(f.read_text())
    sf["tissue_hires_scalef"], sf["tissue_lowres_scalef"] = sf["tissue_lowres_scalef"], sf["tissue_hires_scalef"]
    f.write_text(json.dumps(sf))
    rc, err = case.run(capsys)
    _refused(rc, err, "scalefactors_json.json", "swapped", "tissue_hires_scalef")
    case.assert_untouched()


def test_one_pixel_hires_image(case, capsys):
    Image.new("RGB", (1, 1), (255, 255, 255)).save(case.spatial / "tissue_hires_image.png")
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_hires_image.png", "is only 1 x 1 px", "too small to be a tissue image")
    case.assert_untouched()


def test_spot_diameter_inconsistent_with_the_grid(case, capsys):
    f = case.spatial / "scalefactors_json.json"
    sf = json.loads(f.read_text())
    sf["spot_diameter_fullres"] *= 3
    f.write_text(json.dumps(sf))
    rc, err = case.run(capsys)
    _refused(rc, err, "scalefactors_json.json", "spot_diameter_fullres")
    case.assert_untouched()


# ---------------------------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_infinite_centroids_are_named(case, capsys, value):
    f = case.xenium / "cells.csv.gz"
    cells = pd.read_csv(f)
    cells.loc[7, "x_centroid"] = float(value)
    cells.to_csv(f, index=False, compression="gzip")
    rc, err = case.run(capsys)
    _refused(rc, err, "cells.csv.gz", "non-finite", str(cells.loc[7, "cell_id"]))
    case.assert_untouched()


def test_infinite_pixel_positions_are_named(case, capsys):
    pos = _positions(case)
    pos.loc[2, "pxl_row_in_fullres"] = np.inf
    pos.to_csv(case.spatial / "tissue_positions.csv", index=False)
    rc, err = case.run(capsys)
    _refused(rc, err, "tissue_positions.csv", "non-finite", str(pos.loc[2, "barcode"]))
    case.assert_untouched()


# ---------------------------------------------------------------------------------------------- folders
def test_swapped_modalities_detected_at_read_time(case, capsys, monkeypatch):
    import spatialdata_align.io._xenium as xen

    def never(*a, **k):  # reading must not even start
        raise AssertionError("the reader ran")

    monkeypatch.setattr(xen, "_read_minimal", never)
    rc, err = case.run(capsys, xenium=case.visium, visium=case.xenium)
    _refused(rc, err, "swapped", f"--xenium {case.xenium}")
    case.assert_untouched()


def test_one_folder_of_the_wrong_kind(case, capsys):
    rc, err = case.run(capsys, xenium=case.xenium, visium=case.xenium)
    _refused(rc, err, str(case.xenium), "Xenium output folder")
    with pytest.raises(ValueError, match="--visium"):
        sda.io.read_xenium(case.visium)


# ---------------------------------------------------------------------------------------------- outputs
def _can_create_in(folder: Path) -> bool:
    """The fixture's own probe (not ``_checks._writable``, which the tests below check: with it, a broken
    ``_writable`` made the fixture skip them instead of letting them fail)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError:
        return False
    return True


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only, also for root (chattr +i); skip where that is impossible."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o555)
        made.append(folder)
        if _can_create_in(folder) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
        if _can_create_in(folder):
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        return folder

    yield make
    for folder in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)
        os.chmod(folder, 0o755)


def test_out_in_a_read_only_folder(case, capsys, read_only):
    ro = read_only(case.tmp / "locked")
    rc, err = case.run(capsys, out=ro / "aligned.zarr")
    _refused(rc, err, "--out", "cannot be written")
    case.assert_untouched()
    assert list(ro.iterdir()) == []


def test_report_in_a_read_only_folder(case, capsys, read_only):
    ro = read_only(case.tmp / "locked")
    rc, err = case.run(capsys, report=ro / "report")
    _refused(rc, err, "--report", "cannot be written")
    case.assert_untouched()


def test_report_that_is_an_existing_file(case, capsys):
    f = case.tmp / "report.html"
    f.write_text("keep me")
    rc, err = case.run(capsys, report=f)
    _refused(rc, err, "--report", "existing file")
    assert f.read_text() == "keep me"
    case.assert_untouched()


@pytest.mark.parametrize("where", ["xenium", "visium", "parent"])
def test_outputs_inside_or_around_the_inputs(case, capsys, where):
    target = {"xenium": case.xenium / "report", "visium": case.visium / "spatial" / "r", "parent": case.root}[where]
    rc, err = case.run(capsys, report=target)
    _refused(rc, err, "--report", "input")
    case.assert_untouched()
    rc, err = case.run(capsys, out=case.xenium / "aligned.zarr")
    _refused(rc, err, "--out", "inside the input")
    case.assert_untouched()


def test_a_failure_after_the_work_started_leaves_no_partial_output(case, capsys, monkeypatch):
    """The report stage fails: the zarr store, already written to its temporary path, is not left behind."""
    import spatialdata_align._report as report

    def boom(*a, **k):
        raise ValueError("simulated failure in the report")

    monkeypatch.setattr(report, "write_report", boom)
    rc, err = case.run(capsys, "--loo", "none", "--dx", "40")
    _refused(rc, err, "simulated failure")
    case.assert_untouched()


def test_staged_outputs_replace_an_earlier_output_only_on_commit(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    (final / "summary.json").write_text("old")
    with _checks.StagedOutputs({"report": final}) as st:
        st.path("report").mkdir()
        (st.path("report") / "summary.json").write_text("new")
        assert (final / "summary.json").read_text() == "old"
    assert (final / "summary.json").read_text() == "old"  # not committed: discarded
    with _checks.StagedOutputs({"report": final}) as st:
        st.path("report").mkdir()
        (st.path("report") / "summary.json").write_text("new")
        st.commit()
    assert (final / "summary.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_non_finite_check_names_rows():
    df = pd.DataFrame({"x": [1.0, np.nan, 3.0], "y": [0.0, 1.0, -np.inf]})
    with pytest.raises(_checks.PlausibilityError, match=r"2 of 3 rows.*'x': 1, 'y': 1.*c1, c2") as e:
        _checks.check_finite(df, "f.csv", ("x", "y"), ids=["c0", "c1", "c2"])
    assert str(e.value).startswith("f.csv:")


def test_relaxed_turns_suspects_into_recorded_warnings():
    with warnings.catch_warnings(record=True) as w, _checks.relaxed() as found:
        warnings.simplefilter("always")
        _checks.suspect("x", "looks wrong.", file="a.csv", fix="fix it.")
    assert [f.code for f in found] == ["x"] and "a.csv: looks wrong. Fix: fix it." in str(w[0].message)
    with pytest.raises(_checks.PlausibilityError, match=r"a\.csv: looks wrong"):
        _checks.suspect("x", "looks wrong.", file="a.csv", fix="fix it.")


def test_unreliable_verdict_exits_3_unless_forced(monkeypatch, capsys, tmp_path):
    import spatialdata_align._pipeline as pipeline

    verdict = {"level": "unreliable", "reasons": ["held-out landmark error 80.0 µm (median) exceeds a spot diameter"]}
    summary = {"n_cells": 1, "n_spots": 1, "n_shared_genes": 1, "verdict": verdict, "accuracy": {}}
    fake = pipeline.PipelineResult(sdata=None, shared=None, comparison=None, summary=summary)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: fake)
    args = ["run", "--xenium", "x", "--visium", "v", "--auto-init", "--out", str(tmp_path / "o.zarr"), "--quiet"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "verdict: unreliable" in err and "exceeds a spot diameter" in err and "--force" in err
    assert main([*args, "--force"]) == 0
    summary["verdict"] = {"level": "check", "reasons": ["only 3 landmarks"]}
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "verdict: check"


def test_accessor_affine_flags_a_mirrored_fit(twin):
    sdata = sda.io.read_pair(twin.xenium_path, twin.visium_path, transcripts=False)
    src, dst = twin.truth.landmarks_source, twin.truth.landmarks_target
    sdata.align.set_landmarks(source=src, target=dst[:, ::-1])  # (y, x) targets
    with pytest.raises(_checks.PlausibilityError, match="mirrored"):
        sdata.align.affine(flip=False)
    with pytest.warns(_checks.PlausibilityWarning, match=r"\(y, x\)"):
        assert sdata.align.affine().reflection
    with warnings.catch_warnings():
        warnings.simplefilter("error", _checks.PlausibilityWarning)
        assert sdata.align.affine(flip=True).reflection
        sdata.align.set_landmarks(source=src, target=dst)
        assert not sdata.align.affine(flip=False).reflection


def test_image_checks_on_arrays():
    """check_visium_images on its own: consistent images pass; a too-small scale factor on a single image warns."""
    rng = np.random.default_rng(0)
    xy = rng.uniform([1000, 800], [9000, 7000], (300, 2))  # full-res px
    hires = ("spatial/tissue_hires_image.png", (800, 1000), 0.1, "tissue_hires_scalef")
    lowres = ("spatial/tissue_lowres_image.png", (240, 300), 0.03, "tissue_lowres_scalef")
    cover = _checks.check_visium_images(xy, [hires, lowres], radius_px=60)
    assert cover["tissue_hires_image.png"] == pytest.approx(cover["tissue_lowres_image.png"])
    small = ("spatial/tissue_hires_image.png", (800, 1000), 0.02, "tissue_hires_scalef")
    with _checks.collecting() as found, pytest.warns(_checks.PlausibilityWarning, match="span only 16%"):
        _checks.check_visium_images(xy, [small], radius_px=60)
    assert [f.severity for f in found] == ["warning"]
    with pytest.raises(_checks.PlausibilityError, match="look swapped"):
        _checks.check_visium_images(xy, [(*hires[:2], 0.03, hires[3]), (*lowres[:2], 0.1, lowres[3])])


def test_spot_grid_positions_shuffled_off_the_array_grid():
    """A hex grid whose pixel positions were shuffled between spots no longer follows its array grid: flagged,
    naming the file; the intact grid passes, with its steps (100 µm spot pitch at 0.5 µm per pixel)."""
    rows, cols = np.mgrid[0:12, 0:24]
    keep = (rows + cols) % 2 == 0  # the Visium hex grid: array_row + array_col even
    ar, ac = rows[keep].astype(float), cols[keep].astype(float)
    px, py = 300.0 + 100.0 * ac, 200.0 + 173.2 * ar  # 50 µm per column step, 86.6 µm per row step, 0.5 µm/px
    pos = pd.DataFrame({"array_row": ar, "array_col": ac, "pxl_col_in_fullres": px, "pxl_row_in_fullres": py})
    info = _checks.check_spot_grid(pos, "tissue_positions.csv", spot_diameter_fullres=110.0)
    assert info["col_step_px"] == pytest.approx(100.0) and info["row_step_px"] == pytest.approx(173.2)
    assert info["um_per_px_grid"] == pytest.approx(0.5, rel=1e-3)
    shuffled = pos.copy()
    order = np.random.default_rng(0).permutation(len(pos))
    shuffled[["pxl_col_in_fullres", "pxl_row_in_fullres"]] = pos[
        ["pxl_col_in_fullres", "pxl_row_in_fullres"]
    ].to_numpy()[order]
    with pytest.raises(_checks.PlausibilityError, match=r"tissue_positions\.csv: the pixel positions do not follow"):
        _checks.check_spot_grid(shuffled, "tissue_positions.csv", spot_diameter_fullres=110.0)
