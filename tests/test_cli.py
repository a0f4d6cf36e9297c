"""The ``spatialdata-align`` console script: ``run`` reproduces the Python API, bad inputs give clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import spatialdata

import spatialdata_align as sda
from spatialdata_align._constants import VISIUM_CS, VISIUM_HIRES, XENIUM_CELLS, XENIUM_CS
from spatialdata_align._elements import element_xy
from spatialdata_align.cli import main


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return sda.datasets.twin_sections(tmp_path_factory.mktemp("cli"), n_cells=8000, n_spots=300, seed=2)


def _run_args(twin, out, *extra, visium=None):
    """``spatialdata-align run`` arguments for the twin folders (landmarks and flags in ``extra``)."""
    folders = ["--xenium", str(twin.xenium_path), "--visium", str(visium or twin.visium_path)]
    return ["run", *folders, "--out", str(out), *extra]


def test_run_reproduces_the_python_api(twin, tmp_path, capsys):
    out, report = tmp_path / "aligned.zarr", tmp_path / "report"
    # (--loo affine: the LDDMM refits of the held-out error are tested in test_report.py)
    args = ("--landmarks", str(twin.landmarks_path), "--report", str(report), "--quiet", "--loo", "affine")
    rc = main(_run_args(twin, out, *args))
    assert rc == 0
    # the same calls through the Python API
    sdata = sda.io.read_pair(twin.xenium_path, twin.visium_path)
    lm = pd.read_csv(twin.landmarks_path)
    sdata.align.set_landmarks(
        source=lm[["source_x", "source_y"]].to_numpy(), target=lm[["target_x", "target_y"]].to_numpy()
    )
    sdata.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    sdata.align.lddmm(XENIUM_CELLS, VISIUM_HIRES, progress=False)
    sdata.align.apply(XENIUM_CELLS)
    back = spatialdata.read_zarr(out)
    np.testing.assert_allclose(
        element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS),
        element_xy(sdata, f"{XENIUM_CELLS}_aligned", VISIUM_CS),
        atol=1e-6,
    )
    # and it is a good alignment: the truth agrees to a few µm
    cells = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 10.0
    # the report folder
    names = {p.name for p in report.iterdir()}
    assert {"overlay.png", "energy.png", "EGFR_side_by_side.png", "gene_correlations.csv", "summary.md"} <= names
    # the alignment in Xenium Explorer's formats: its affine part and the landmarks, exactly
    pixel_size = back.tables["xenium_table"].uns["xenium"]["pixel_size"]
    explorer = sda.io.read_explorer_alignment(report / "xenium_explorer_alignment.csv", pixel_size=pixel_size)
    np.testing.assert_allclose(explorer, back.align.get("xenium_to_visium_lddmm").affine, rtol=1e-12, atol=1e-9)
    kp_src, kp_dst, _ = sda.io.read_explorer_keypoints(report / "xenium_explorer_keypoints.csv")
    np.testing.assert_allclose(kp_src, lm[["source_x", "source_y"]].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(kp_dst, lm[["target_x", "target_y"]].to_numpy(), rtol=1e-12)
    assert all((report / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_cells"] == 8000 and summary["n_shared_genes"] > 50
    assert set(summary["time_per_stage_s"]) >= {"LDDMM", "read Xenium + Visium", f"write {out}", f"report {report}"}
    corr = pd.read_csv(report / "gene_correlations.csv")
    assert corr.set_index("gene").loc["EGFR", "pearson"] > 0.3


def test_run_with_automatic_initialisation(twin, tmp_path, monkeypatch):
    """No landmarks: the automatic affine search, then LDDMM, still lands within a few µm of the truth.

    The search's margin and expression agreement are in the summary, and an ambiguous search (its margin lowered
    here) is one of the verdict's reasons.
    """
    import dataclasses

    from spatialdata_align import _accessor
    from spatialdata_align._pipeline import run_pipeline

    real = _accessor.auto_init
    monkeypatch.setattr(_accessor, "auto_init", lambda *a, **k: dataclasses.replace(real(*a, **k), margin=0.05))
    res = run_pipeline(twin.xenium_path, twin.visium_path, auto_init=True, verbose=False, progress=False)
    assert res.summary["affine"]["method"] == "auto"
    assert res.summary["affine"]["margin"] == 0.05 and res.summary["affine"]["expression_r"] > 0.5
    assert any("initialisation is ambiguous" in r for r in res.summary["verdict"]["reasons"])
    sd = res.sdata
    cells = element_xy(sd, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(sd, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 10.0


def test_run_on_a_folder_with_the_lowres_image_only(twin, tmp_path, capsys):
    """A real Space Ranger 3 CytAssist download has only the lowres image: read with defaults, run completes."""
    outs = shutil.copytree(twin.visium_path, tmp_path / "outs")
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    out = tmp_path / "aligned.zarr"
    with pytest.warns(UserWarning, match="tissue_hires_image.png not found"):
        args = _run_args(twin, out, "--landmarks", str(twin.landmarks_path), "--dx", "30", "--quiet", visium=outs)
        args += ["--loo", "affine"]  # (the LDDMM refits are tested in test_report.py)
        rc = main(args)
    assert rc == 0, capsys.readouterr().err
    back = spatialdata.read_zarr(out)
    assert "visium_hires_image" not in back.images and "visium_lowres_image" in back.images
    assert back.align.transforms.loc["xenium_to_visium_lddmm", "target_element"] == "visium_lowres_image"
    cells = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 12.0


def test_run_with_stalign_style_npy_landmarks(twin, tmp_path):
    names = [f"p{i}" for i in range(4)]
    src = {n: [list(p)] for n, p in zip(names, twin.truth.landmarks_source[:4], strict=True)}
    dst = {n: [list(p)] for n, p in zip(names, twin.truth.landmarks_target[:4], strict=True)}
    np.save(tmp_path / "src.npy", src, allow_pickle=True)
    np.save(tmp_path / "dst.npy", dst, allow_pickle=True)
    from spatialdata_align._landmark_files import read_landmarks

    s, d, n = read_landmarks(tmp_path / "src.npy", tmp_path / "dst.npy")
    np.testing.assert_allclose(s, twin.truth.landmarks_source[:4])
    np.testing.assert_allclose(d, twin.truth.landmarks_target[:4])
    assert n == names


def test_bad_inputs_give_clear_errors(twin, tmp_path, capsys):
    base = _run_args(twin, tmp_path / "o.zarr")
    assert main(base) == 2
    assert "--landmarks" in capsys.readouterr().err
    # landmarks and --auto-init together: a clear error, not a silently ignored flag
    assert main([*base, "--landmarks", str(twin.landmarks_path), "--auto-init"]) == 2
    err = capsys.readouterr().err
    assert "--auto-init and --landmarks exclude each other" in err
    assert "error together with --landmarks" in " ".join(_help_text("run", capsys).split())
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main([*base, "--landmarks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "source_x" in err
    assert main([*base, "--landmarks", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    # a Visium folder without its scale factors: the file is named
    broken = tmp_path / "outs"
    shutil.copytree(twin.visium_path, broken)
    (broken / "spatial" / "scalefactors_json.json").unlink()
    assert main(_run_args(twin, tmp_path / "o2.zarr", "--auto-init", visium=broken)) == 2
    assert "scalefactors_json.json" in capsys.readouterr().err
    # --out pointing at something that is not a zarr store is never deleted
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    rc = main(_run_args(twin, precious, "--landmarks", str(twin.landmarks_path), "--quiet"))
    assert rc == 2 and (precious / "keep.txt").exists()


def _help_text(command: str, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("spatialdata-align") or f"{sys.executable} -m spatialdata_align.cli"
    res = subprocess.run([*exe.split(), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0
    assert "run" in res.stdout and "demo" in res.stdout
