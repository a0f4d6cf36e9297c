"""Landmark and affine files: Xenium Explorer keypoints / image-alignment matrix, read and written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import spatialdata_align as sda
from spatialdata_align.registration import fit_affine

#: a Xenium µm -> Visium full-resolution px affine: rotation, anisotropic scale, shear, translation
A = np.array([[1.21, -1.62, 3100.5], [1.58, 1.25, -220.25], [0.0, 0.0, 1.0]])
PIXEL_SIZE = 0.2125


def _pairs(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    src = np.random.default_rng(seed).uniform(0, 3000, size=(n, 2)) + np.pi / 7  # not round numbers
    return src, src @ A[:2, :2].T + A[:2, 2]


def test_explorer_keypoints_round_trip_gives_the_same_affine(tmp_path):
    src, dst = _pairs()
    path = sda.io.write_explorer_keypoints(tmp_path / "keypoints.csv", src, dst)
    assert path.read_text().splitlines()[0] == "fixedX,fixedY,alignmentX,alignmentY"
    s, d, names = sda.io.read_explorer_keypoints(path)
    np.testing.assert_array_equal(s, src)  # full precision on disk
    np.testing.assert_array_equal(d, dst)
    assert names == [f"keypoint_{i}" for i in range(len(src))]
    np.testing.assert_allclose(fit_affine(s, d).matrix, fit_affine(src, dst).matrix, rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit_affine(s, d, shape_prior=0.0).matrix, A, rtol=0, atol=1e-9)
    # read_landmarks (and so --landmarks) recognises the Explorer header
    s2, d2, _ = sda.io.read_landmarks(path)
    np.testing.assert_array_equal(s2, src)
    np.testing.assert_array_equal(d2, dst)
    # fixed coordinates in Xenium pixels instead of µm
    pd.DataFrame(
        {
            "fixedX": src[:, 0] / PIXEL_SIZE,
            "fixedY": src[:, 1] / PIXEL_SIZE,
            "alignmentX": dst[:, 0],
            "alignmentY": dst[:, 1],
        }
    ).to_csv(tmp_path / "px.csv", index=False)
    s3, _, _ = sda.io.read_explorer_keypoints(tmp_path / "px.csv", fixed_units="px", pixel_size=PIXEL_SIZE)
    np.testing.assert_allclose(s3, src, rtol=1e-12)


def test_explorer_alignment_matrix_round_trip_and_convention(tmp_path):
    path = sda.io.write_explorer_alignment(tmp_path / "matrix.csv", A, pixel_size=PIXEL_SIZE)
    M = pd.read_csv(path, header=None).to_numpy()
    assert M.shape == (3, 3) and list(M[2]) == [0, 0, 1]
    np.testing.assert_allclose(sda.io.read_explorer_alignment(path, pixel_size=PIXEL_SIZE), A, rtol=0, atol=1e-9)
    # Explorer's matrix takes image pixels to Xenium pixels: keypoints written from the same pairs agree with it
    src, dst = _pairs()
    np.testing.assert_allclose(dst @ M[:2, :2].T + M[:2, 2], src / PIXEL_SIZE, rtol=1e-12)


def test_explorer_matrix_convention_matches_spatialdata_io(tmp_path):
    """spatialdata_io.xenium_aligned_image places an image with the matrix: it lands where our affine says."""
    import spatialdata_io
    import tifffile
    from spatialdata.transformations import get_transformation

    tifffile.imwrite(tmp_path / "he.ome.tif", np.zeros((40, 60, 3), dtype=np.uint8), photometric="rgb")
    matrix = sda.io.write_explorer_alignment(tmp_path / "matrix.csv", A, pixel_size=PIXEL_SIZE)
    image = spatialdata_io.xenium_aligned_image(tmp_path / "he.ome.tif", matrix)
    to_xenium_px = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    to_xenium_um = np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]) @ to_xenium_px
    np.testing.assert_allclose(to_xenium_um, np.linalg.inv(A), rtol=0, atol=1e-9)


def test_explorer_files_bad_input(tmp_path):
    (tmp_path / "m.csv").write_text("1,0,0\n0,1,0\n")
    with pytest.raises(ValueError, match=r"m\.csv: expected 3 rows of 3 numbers"):
        sda.io.read_explorer_alignment(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("1,0,0\n0,1,0\n0.5,0,1\n")
    with pytest.raises(ValueError, match=r"m\.csv: the last row must be 0, 0, 1"):
        sda.io.read_explorer_alignment(tmp_path / "m.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        sda.io.read_explorer_alignment(tmp_path / "nope.csv")
    (tmp_path / "k.csv").write_text("fixedX,fixedY,alignmentX\n1,2,3\n")
    with pytest.raises(ValueError, match=r"k\.csv: Xenium Explorer keypoints CSV lacks \['alignmentY'\]"):
        sda.io.read_explorer_keypoints(tmp_path / "k.csv")
    (tmp_path / "k.csv").write_text("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,x\n")
    with pytest.raises(ValueError, match=r"k\.csv: non-numeric or missing coordinates on line\(s\) \[2\]"):
        sda.io.read_landmarks(tmp_path / "k.csv")


def test_landmark_names_and_stalign_dicts_pair_by_name(tmp_path):
    """CSV names are kept; STalign-style .npy dicts are paired by name whatever their order, a name holding several
    points giving ``name_0``, ``name_1`` in order, and a name with different counts on the two sides is refused."""
    from spatialdata_align._landmark_files import read_landmarks, write_landmarks_csv

    src = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.5]])
    dst = src * 2.0 + 7.0
    path = write_landmarks_csv(tmp_path / "lm.csv", src, dst, names=["duct", "vessel", "fold"])
    assert read_landmarks(path)[2] == ["duct", "vessel", "fold"]
    s_dict = {"vessel": [[3.0, 4.0], [5.0, 6.5]], "duct": [[1.0, 2.0]]}
    d_dict = {"duct": [list(dst[0])], "vessel": [list(dst[1]), list(dst[2])]}  # another order
    np.save(tmp_path / "s.npy", s_dict, allow_pickle=True)
    np.save(tmp_path / "d.npy", d_dict, allow_pickle=True)
    s, d, names = read_landmarks(tmp_path / "s.npy", tmp_path / "d.npy")
    assert names == ["duct", "vessel_0", "vessel_1"]
    np.testing.assert_array_equal(s, src)
    np.testing.assert_array_equal(d, dst)
    d_dict["vessel"] = d_dict["vessel"][:1]
    np.save(tmp_path / "d.npy", d_dict, allow_pickle=True)
    with pytest.raises(ValueError, match="'vessel': 2 source vs 1 target"):
        read_landmarks(tmp_path / "s.npy", tmp_path / "d.npy")


def test_export_explorer_uses_the_datasets_own_pixel_size(tmp_path):
    """The matrix is written in Xenium pixels of the dataset's pixel size (``table.uns['xenium']``), not the
    common 0.2125 µm: read back at that size it is the stored affine, at 0.2125 it is not; without a Xenium table
    0.2125 µm is assumed."""
    from spatialdata_align._constants import VISIUM_HIRES, XENIUM_CELLS, XENIUM_TABLE
    from spatialdata_align._landmark_files import export_explorer

    tw = sda.datasets.twin_sections(tmp_path / "data", n_cells=1500, n_spots=60, seed=2, transcripts=False)
    s = sda.io.read_pair(tw.xenium_path, tw.visium_path, transcripts=False)
    s.align.set_landmarks(source=tw.truth.landmarks_source, target=tw.truth.landmarks_target)
    fit = s.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    s.tables[XENIUM_TABLE].uns["xenium"]["pixel_size"] = 0.5
    files = export_explorer(s, tmp_path / "explorer")
    matrix = files["explorer_alignment"]
    np.testing.assert_allclose(sda.io.read_explorer_alignment(matrix, pixel_size=0.5), fit.matrix, atol=1e-9)
    assert not np.allclose(sda.io.read_explorer_alignment(matrix, pixel_size=PIXEL_SIZE), fit.matrix, atol=1e-3)
    kp_src, kp_dst, _ = sda.io.read_explorer_keypoints(files["explorer_keypoints"])
    np.testing.assert_allclose(kp_src, tw.truth.landmarks_source)
    np.testing.assert_allclose(kp_dst, tw.truth.landmarks_target)
    del s.tables[XENIUM_TABLE]
    bare = export_explorer(s, tmp_path / "bare")["explorer_alignment"]
    np.testing.assert_allclose(sda.io.read_explorer_alignment(bare, pixel_size=PIXEL_SIZE), fit.matrix, atol=1e-9)


def test_landmark_csv_headers_as_typed_and_misplaced_files_get_clear_messages(tmp_path):
    """Headers with spaces or capitals are read (as batch manifests are); a CSV given with --landmarks-target and a
    .npy without it say which flag goes with which file."""
    from spatialdata_align._landmark_files import read_landmarks

    path = tmp_path / "typed.csv"
    path.write_text("Name, Source_X, Source_Y, Target_X, Target_Y\na,1,2,10,20\nb,3,4,30,40\nc,5,7,50,71\n")
    s, d, names = read_landmarks(path)
    np.testing.assert_array_equal(s, [[1, 2], [3, 4], [5, 7]])
    np.testing.assert_array_equal(d, [[10, 20], [30, 40], [50, 71]])
    assert names == ["a", "b", "c"]
    np.save(tmp_path / "s.npy", {"a": [[1.0, 2.0]]}, allow_pickle=True)
    with pytest.raises(ValueError, match="a CSV holds both sides"):
        read_landmarks(path, tmp_path / "s.npy")
    with pytest.raises(ValueError, match="--landmarks-target"):
        read_landmarks(tmp_path / "s.npy")
