"""The report a person opens, and the accuracy estimate it carries, on one generated twin with known truth.

One ``spatialdata-align run`` (module fixture) writes the report; the tests check the held-out landmark error
against the truth, the self-contained ``index.html`` (also rendered in headless Chromium), and the exports for R.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import spatialdata

import spatialdata_align as sda
from spatialdata_align._constants import MATCH_WEIGHT_KEY, VISIUM_CS, XENIUM_CELLS, XENIUM_CS, XENIUM_TABLE
from spatialdata_align._elements import element_xy
from spatialdata_align.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    twin = sda.datasets.twin_sections(root / "data", n_cells=4000, n_spots=300, seed=0)
    out, report = root / "aligned.zarr", root / "report"
    args = ["run", "--xenium", str(twin.xenium_path), "--visium", str(twin.visium_path)]
    args += ["--landmarks", str(twin.landmarks_path), "--out", str(out), "--report", str(report), "--quiet"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    return {"twin": twin, "out": out, "report": report, "rc": rc, "stdout": buf.getvalue()}


def test_verdict_in_the_summary_and_the_last_lines(run):
    assert run["rc"] == 0
    summary = json.loads((run["report"] / "summary.json").read_text())
    assert summary["verdict"]["level"] == "good", summary["verdict"]
    last = run["stdout"].strip().splitlines()[-1]
    assert last.startswith("verdict: good; held-out landmark error median")
    assert "Verdict: good" in (run["report"] / "summary.md").read_text()


def test_held_out_landmark_error_is_within_2x_of_the_truth(run):
    """Leave-one-out TRE of affine + LDDMM vs the true TRE of the final alignment at the same landmarks."""
    twin = run["twin"]
    loo = pd.read_csv(run["report"] / "landmarks_loo.csv")
    back = spatialdata.read_zarr(run["out"])
    final = back.align.get("xenium_to_visium_lddmm")
    src = loo[["source_x_um", "source_y_um"]].to_numpy()
    true = np.linalg.norm(final.transform_points(src) - twin.truth.forward(src), axis=1) * twin.truth.um_per_px
    est = loo["loo_lddmm_um"].to_numpy()
    assert np.all(np.isfinite(est)) and len(est) == len(twin.truth.landmark_names)
    ratio = np.median(est) / np.median(true)
    assert 0.5 <= ratio <= 2.0, (est, true)
    assert np.all(est <= 2 * true + 5.0) and np.all(est >= true / 2 - 5.0), (est, true)
    # the affine alone, held out, is worse than affine + LDDMM (as the truth says over every cell)
    assert np.median(loo["loo_affine_um"]) > np.median(est)
    summary = json.loads((run["report"] / "summary.json").read_text())
    assert summary["accuracy"]["loo_lddmm_um"]["median"] == pytest.approx(np.median(est), rel=1e-3)
    assert summary["accuracy"]["jacobian"]["fold_fraction"] == 0.0
    # the stored map (sampled forward and inverse fields) inverts to a fraction of a µm
    assert summary["accuracy"]["inverse_consistency_um"]["max"] < 0.5


def test_html_is_one_self_contained_file(run):
    page = (run["report"] / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page), "a resource is fetched from outside"
    assert "<link" not in page and "@import" not in page and "url(" not in page
    imgs = re.findall(r'<img class="panel" id="([\w-]+)"[^>]*src="data:image/png;base64,', page)
    expected = {"panel-zoom", "panel-overlay", "panel-checkerboard", "panel-jacobian", "panel-confidence"}
    assert expected | {"panel-energy", "panel-gene", "panel-compare"} <= set(imgs)
    assert 'id="verdict"' in page and "Verdict: good" in page
    # the two tables: leave-one-out (one row per landmark) and the sortable gene correlations
    assert page.count("<tr", page.index('id="loo-table"'), page.index("</table>", page.index('id="loo-table"'))) == 11
    corr = pd.read_csv(run["report"] / "gene_correlations.csv")
    gene_table = page[page.index('id="gene-table"') :]
    assert gene_table.count('onclick="sdaSort(this)"') == corr.shape[1]
    assert gene_table[: gene_table.index("</table>")].count("<tr>") == len(corr) + 1
    assert "function sdaSort" in page


def test_exports_for_r(run):
    twin = run["twin"]
    cells = pd.read_csv(run["report"] / "aligned_cells.csv.gz")
    cols = ["cell_id", "x_um", "y_um", "x_px", "y_px", "in_shared", "match_weight", "landmark_extrapolation"]
    assert list(cells.columns) == [*cols, "near_cut"]
    back = spatialdata.read_zarr(run["out"])
    assert len(cells) == twin.n_cells
    aligned = element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS)
    np.testing.assert_allclose(cells[["x_px", "y_px"]].to_numpy(), aligned, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(cells[["x_um", "y_um"]].to_numpy(), element_xy(back, XENIUM_CELLS, XENIUM_CS), atol=1e-2)
    weight = back.tables[XENIUM_TABLE].obs[MATCH_WEIGHT_KEY].to_numpy()
    np.testing.assert_allclose(cells["match_weight"].to_numpy(), weight, rtol=1e-5, atol=1e-6)
    summary = json.loads((run["report"] / "summary.json").read_text())
    assert cells["in_shared"].sum() == summary["n_cells_shared"]
    # the landmark coverage per cell: the summary's 95th percentile, and the landmarks' own layout
    ext = cells["landmark_extrapolation"].to_numpy()
    p95 = summary["accuracy"]["landmark_extrapolation"]["p95"]
    assert np.percentile(ext, 95) == pytest.approx(p95, abs=2e-3) and 0 < ext.min() < ext.max() < 5
    # cells near a cut of the Xenium region through the Visium tissue: as many as the summary says
    assert cells["near_cut"].sum() == summary["accuracy"]["near_cut"]["n"]
    spots = pd.read_csv(run["report"] / "visium_spots.csv.gz")
    assert len(spots) == summary["n_spots"] and spots["in_shared"].sum() == summary["n_spots_shared"]
    assert {"barcode", "x_px", "y_px", "x_um", "y_um", "array_row", "array_col", "in_tissue", "n_cells"} <= set(spots)
    # spots mapped back into Xenium µm agree with the truth to the alignment's accuracy
    truth = twin.visium_spots_truth().set_index("barcode").loc[spots["barcode"]]
    err = np.linalg.norm(spots[["x_um", "y_um"]].to_numpy() - truth[["x_um", "y_um"]].to_numpy(), axis=1)
    assert np.median(err[spots["in_shared"].to_numpy()]) < 15.0


def test_csv_export_prints_what_pandas_percent_6g_prints(tmp_path):
    """The fast CSV writer: 6 significant digits, TRUE/FALSE, empty for NaN, quoted only via its fallback."""
    import gzip

    from spatialdata_align._report import _write_csv

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-2e4, 2e4, 500), rng.uniform(0, 1, 500) * 10.0 ** rng.integers(-9, 9, 500)])
    x[[3, 17]] = np.nan
    x[5] = 0.0
    df = pd.DataFrame(
        {
            "cell_id": [f"c{i}-1" for i in range(len(x))],
            "x": x,
            "flag": rng.random(len(x)) > 0.5,
            "n": rng.integers(-5, 500, len(x)),
        }
    )
    ref = df.assign(flag=np.where(df["flag"], "TRUE", "FALSE")).to_csv(index=False, float_format="%.6g")
    for frame in (df, df.assign(cell_id=df["cell_id"].str.replace("-", ", "))):  # the second needs quoting
        path = _write_csv(frame, tmp_path / "t.csv.gz")
        text = gzip.decompress(path.read_bytes()).decode()
        assert text.splitlines()[0] == "cell_id,x,flag,n"
        a = pd.read_csv(tmp_path / "t.csv.gz", keep_default_na=False, na_values=[""])
        b = pd.read_csv(io.StringIO(ref), keep_default_na=False, na_values=[""])
        b["cell_id"] = frame["cell_id"]
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # the numbers %.6g prints, exactly
        assert a["flag"].dtype == bool and "True" not in text and "TRUE" in text
        assert "nan" not in text.lower() and text.count(",,") >= 2  # NaN: an empty field


def test_r_snippet_reads_the_exports(run, tmp_path):
    rscript = shutil.which("Rscript")
    if rscript is None:
        pytest.skip("R is not installed")
    readme = (sda_root() / "README.md").read_text()
    block = readme[readme.index("<!-- r-exports -->") :]
    code = block.split("```r", 1)[1].split("```", 1)[0]
    res = subprocess.run(
        [
            rscript,
            "-e",
            code + "\ncat(class(cells$in_shared), nrow(shared_cells), nrow(cells), ncol(cells), nrow(spots))",
        ],
        cwd=run["report"].parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    cells = pd.read_csv(run["report"] / "aligned_cells.csv.gz")
    n_kept = int((cells["in_shared"] & (cells["match_weight"] > 0.5)).sum())
    twin = run["twin"]
    assert res.stdout.split()[-5:] == ["logical", str(n_kept), str(twin.n_cells), "8", str(twin.n_spots_in_tissue)]


def sda_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- browser
_BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "chrome")


def _browser() -> str | None:
    for name in _BROWSERS:
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def _chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    base += ["--disable-background-networking", "--disable-dev-shm-usage", "--virtual-time-budget=10000"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=180, check=False)


def test_report_renders_in_a_headless_browser(run, tmp_path):
    exe = _browser()
    if exe is None:
        if os.environ.get("SDA_REQUIRE_BROWSER") == "1":
            pytest.fail("SDA_REQUIRE_BROWSER=1 but no Chromium binary was found (apt-get install chromium)")
        pytest.skip("no Chromium binary (apt-get install chromium)")
    from PIL import Image

    url = (run["report"] / "index.html").resolve().as_uri()
    width = 1300
    dom = _chromium(exe, f"--window-size={width},2000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', html)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 8, "images did not load"
    height = int(re.search(r'data-height="(\d+)"', html).group(1))
    boxes = {
        m.group(1): [int(v) for v in m.group(2).split(",")]
        for m in re.finditer(r'<img[^>]*id="([\w-]+)"[^>]*data-box="([\d,-]+)"', html)
    }
    shot = tmp_path / "report.png"
    res = _chromium(exe, f"--window-size={width},{height}", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    page = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert page.shape[0] >= height - 5
    blank = []
    for panel, (x, y, w, h) in boxes.items():
        crop = page[y + 2 : y + h - 2, x + 2 : x + w - 2]
        assert crop.size, panel
        # a drawn panel: not one flat colour, and more than a few colours
        distinct = len(np.unique(crop.reshape(-1, 3)[::7].round(), axis=0))
        if crop.std() < 10 or distinct < 50:
            blank.append((panel, float(crop.std()), distinct))
    assert not blank, f"blank panels: {blank}"
    assert len(boxes) >= 8
    # the verdict box is drawn in its colour (green for "good")
    top = page[: min(600, height)]
    green = (np.abs(top - np.array([0xE3, 0xF5, 0xE1])).sum(axis=2) < 6).mean()
    assert green > 0.01


def test_held_out_refits_use_the_fitted_source_channels(run, monkeypatch):
    """The accuracy estimate refits the pipeline that ran: the same source channels (density + cell types) and
    the landmark term."""
    from spatialdata_align import _report
    from spatialdata_align import _store as sda_store
    from spatialdata_align._landmark_files import read_landmarks
    from spatialdata_align.registration import _quality
    from spatialdata_align.registration._landmarks import AFFINE_SHAPE_PRIOR

    back = spatialdata.read_zarr(run["out"])
    final = back.align.get("xenium_to_visium_lddmm")
    seen = {}

    def fake_loo(source, image, src, dst, **kw):
        seen["channels"] = int(source.shape[0])
        seen["target"] = list(image.coords["c"].values)
        seen["dx"] = float(source.x[1] - source.x[0])
        seen["landmark_term"] = kw.get("landmark_term")
        seen["sigma_p"] = kw.get("sigma_p")
        seen["kind"], seen["shape_prior"] = kw.get("kind"), kw.get("shape_prior")
        seen["target_blur"] = kw.get("target_blur")
        seen["field_of_view"] = kw.get("field_of_view", "not passed")
        n = len(src)
        return _quality.LooResult(errors=np.zeros(n), affine_errors=np.zeros(n), folds=[], runtime_s=0.0)

    monkeypatch.setattr(_quality, "lddmm_loo", fake_loo)
    src, dst, names = read_landmarks(run["twin"].landmarks_path)
    # (a different tissue-grid dx: the refits still repeat the fit's raster)
    a = _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), loo="lddmm", dx=35.0)
    # the refits' affines are fitted as the run's was: an affine with the default shape prior, stored with the fit
    assert sda_store.get_entry(back, "xenium_to_visium_lddmm")["init_shape_prior"] == AFFINE_SHAPE_PRIOR > 0
    assert (seen["kind"], seen["shape_prior"]) == ("affine", AFFINE_SHAPE_PRIOR)
    assert a.metrics["landmark_fit"] == {"kind": "affine", "shape_prior": AFFINE_SHAPE_PRIOR}
    assert seen["dx"] == pytest.approx(sda_store.get_entry(back, "xenium_to_visium_lddmm")["dx"])
    assert final.params["source_channels"] == 4  # the default: density + 3 cell types
    assert seen["channels"] == final.params["source_channels"], seen
    # the fit pulled the map through the landmarks it was initialised from; so do the refits (with their own)
    assert final.params["n_landmarks"] == len(src) and seen["landmark_term"] is True
    assert seen["sigma_p"] == pytest.approx(final.params["sigma_p"])
    # and the target channels it registered onto: the H&E as stain densities (the default)
    assert sda_store.get_entry(back, "xenium_to_visium_lddmm")["target_channels"] == "stains"
    assert final.params["target_channels"] == 2 and seen["target"] == ["haematoxylin", "eosin"]
    # blurred as the fit's target was: by the source raster's blur (dx, 20 µm, by default)
    assert final.params["target_blur"] == pytest.approx(20.0) and seen["target_blur"] == pytest.approx(20.0)
    # and with the fit's field of view, as stored (None for an open side; the engine takes it back, see
    # test_lddmm_field_of_view_keeps_a_cut_edge_in_place)
    assert seen["field_of_view"] == final.params["field_of_view"]
    # a store written before the target channels were recorded registered the raw image: so do its refits
    entry = sda_store.get_entry(back, "xenium_to_visium_lddmm")
    del entry["target_channels"]
    monkeypatch.setattr(sda_store, "get_entry", lambda sd, key: entry)
    _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), loo="lddmm")
    assert len(seen["target"]) == 3


def test_affine_held_out_errors_refit_the_stored_landmark_fit_in_micrometres(run, monkeypatch):
    """The affine's leave-one-out errors: each landmark predicted by the stored kind of fit on the others, in µm
    (Visium pixels times the scale factors' µm per pixel); a fit stored as a similarity is refitted as one."""
    from spatialdata_align import _report
    from spatialdata_align import _store as sda_store
    from spatialdata_align._landmark_files import read_landmarks
    from spatialdata_align.registration import fit_affine
    from spatialdata_align.registration._landmarks import AFFINE_SHAPE_PRIOR

    back = spatialdata.read_zarr(run["out"])
    src, dst, names = read_landmarks(run["twin"].landmarks_path)
    upp = run["twin"].truth.um_per_px

    def expected(kind: str) -> np.ndarray:
        out = []
        for i in range(len(src)):
            keep = np.arange(len(src)) != i
            kw = {"shape_prior": AFFINE_SHAPE_PRIOR} if kind == "affine" else {}
            m = fit_affine(src[keep], dst[keep], kind, **kw).matrix
            out.append(np.linalg.norm(src[i] @ m[:2, :2].T + m[:2, 2] - dst[i]) * upp)
        return np.array(out)

    key = "xenium_to_visium_lddmm"
    a = _report.assess_alignment(back, key, landmarks=(src, dst, names), loo="affine")
    np.testing.assert_allclose(a.landmarks["loo_affine_um"], expected("affine"), rtol=1e-4)
    assert a.landmarks["loo_affine_um"].max() > 1.0  # the landmarks carry some error: the check is not vacuous
    final = back.align.get(key)
    np.testing.assert_allclose(
        a.landmarks["fit_residual_um"], np.linalg.norm(final.transform_points(src) - dst, axis=1) * upp, rtol=1e-4
    )
    entry = sda_store.get_entry(back, key)
    entry["init_kind"] = "similarity"
    monkeypatch.setattr(sda_store, "get_entry", lambda sd, k: entry)
    a = _report.assess_alignment(back, key, landmarks=(src, dst, names), loo="affine")
    assert a.metrics["landmark_fit"]["kind"] == "similarity"
    np.testing.assert_allclose(a.landmarks["loo_affine_um"], expected("similarity"), rtol=1e-4)
    assert not np.allclose(expected("similarity"), expected("affine"), rtol=1e-3)


def test_the_verdict_judges_the_lddmm_held_out_error_and_respects_the_inliers(run, monkeypatch):
    """With LDDMM refits, their held-out error (not the affine's) is what the verdict judges; an outlier accepted
    with --force is measured against the fit on the inliers. The Jacobian statistics cover the tissue only, and the
    confidence tiles are 500 µm wide (in Visium pixels)."""
    from spatialdata_align import _report
    from spatialdata_align._landmark_files import read_landmarks
    from spatialdata_align.registration import _quality, fit_affine
    from spatialdata_align.registration._landmarks import AFFINE_SHAPE_PRIOR

    back = spatialdata.read_zarr(run["out"])
    src, dst, names = read_landmarks(run["twin"].landmarks_path)
    upp = run["twin"].truth.um_per_px

    def fake_loo(source, image, s, d, **kw):  # the refits miss every landmark by 80 µm
        n = len(s)
        return _quality.LooResult(errors=np.full(n, 80.0 / upp), affine_errors=np.zeros(n), folds=[], runtime_s=0.0)

    monkeypatch.setattr(_quality, "lddmm_loo", fake_loo)
    inliers = np.ones(len(src), bool)
    inliers[2] = False
    a = _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), inliers=inliers)
    assert a.landmarks["loo_affine_um"].max() < 55.0  # the affine's own held-out error would pass
    assert a.verdict.level == "unreliable", a.verdict
    assert any("held-out" in r for r in a.verdict.reasons), a.verdict.reasons
    assert a.landmarks["inlier"].tolist() == inliers.tolist()
    m = fit_affine(src[inliers], dst[inliers], shape_prior=AFFINE_SHAPE_PRIOR).matrix
    outlier = np.linalg.norm(src[2] @ m[:2, :2].T + m[:2, 2] - dst[2]) * upp
    assert a.landmarks["loo_affine_um"][2] == pytest.approx(outlier, rel=1e-4)
    keep = inliers.copy()
    keep[0] = False
    m0 = fit_affine(src[keep], dst[keep], shape_prior=AFFINE_SHAPE_PRIOR).matrix
    assert a.landmarks["loo_affine_um"][0] == pytest.approx(
        np.linalg.norm(src[0] @ m0[:2, :2].T + m0[:2, 2] - dst[0]) * upp, rel=1e-4
    )
    # the extrapolation factor at the cells is the inliers' fit's (the outlier left out of the design)
    xy = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    own = _quality.landmark_extrapolation(src[inliers], xy, shape_prior=AFFINE_SHAPE_PRIOR)
    np.testing.assert_allclose(a.extrapolation, own, rtol=1e-9)
    assert not np.allclose(own, _quality.landmark_extrapolation(src, xy, shape_prior=AFFINE_SHAPE_PRIOR), rtol=0.01)
    # the Jacobian over the tissue (not the whole grid); the confidence tiles of 500 µm
    assert a.metrics["jacobian"]["n"] == int(a.tissue.sum()) < a.tissue.size
    widths = (a.regions["x1"] - a.regions["x0"]).to_numpy() * upp
    assert len(widths) and np.allclose(widths, _report.TILE_UM)
    # a fit whose optimiser diverged (the last good state kept) is unreliable whatever the landmarks say
    from spatialdata_align import _store as sda_store

    load = sda_store.load_registration

    def diverged(sd, key):
        reg = load(sd, key)
        reg.params["diverged"] = True
        return reg

    # low-confidence regions: 500 µm tiles of >= 20 aligned cells whose mean match weight is under 0.3; the weights
    # set to 0.1 left of the section's middle (x < xm) and 0.9 right of it, counted here by hand
    reg0 = load(back, "xenium_to_visium_lddmm")
    xm = float(np.median(reg0.match_weight.coords["x"].values))

    def half_matched(sd, key):
        reg = load(sd, key)
        gx = reg.match_weight.coords["x"].values
        half = np.broadcast_to(np.where(gx[None, :] < xm, 0.1, 0.9), reg.match_weight.shape)
        reg.match_weight = reg.match_weight.copy(data=half.copy())
        return reg

    monkeypatch.setattr(sda_store, "load_registration", half_matched)
    a = _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), loo="affine")
    reg = half_matched(back, "xenium_to_visium_lddmm")
    w, at = reg.match_weight_at(xy), reg.transform_points(xy)
    tiles = np.floor((at - at.min(axis=0)) / (_report.TILE_UM / upp)).astype(int)
    _, inverse, counts = np.unique(tiles, axis=0, return_inverse=True, return_counts=True)
    means = np.bincount(inverse.ravel(), weights=w) / counts
    low = int(((means < 0.3) & (counts >= 20)).sum())
    assert 0 < low < int((counts >= 20).sum())
    assert a.metrics["low_confidence_regions"] == low
    monkeypatch.setattr(sda_store, "load_registration", diverged)
    a = _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), loo="affine")
    assert a.verdict.level == "unreliable" and any("diverged" in r for r in a.verdict.reasons), a.verdict
    # ... also when it diverged at the start of its first level and kept the affine alone (no velocity: --dx 300 on a
    # small section; the verdict said "good" and exit 0)
    from spatialdata_align.registration import Registration

    def diverged_at_start(sd, key):
        out = Registration.from_affine(load(sd, key).affine, source_units="um", target_units="px")
        out.params.update(diverged=True, levels=[])
        return out

    monkeypatch.setattr(sda_store, "load_registration", diverged_at_start)
    a = _report.assess_alignment(back, "xenium_to_visium_lddmm", landmarks=(src, dst, names), loo="affine")
    assert a.verdict.level == "unreliable" and any("diverged" in r for r in a.verdict.reasons), a.verdict


def test_landmark_coverage_in_the_verdict_and_the_confidence_figure(run):
    """Landmarks all in one corner: the verdict asks for a check and the figure outlines the extrapolated tissue.

    The twin's landmarks spread over the section: no such reason, no line. Fails when the coverage figures are not
    measured at the cells, the verdict ignores them, or the figure draws no level line (or draws one regardless).
    """
    from matplotlib.contour import ContourSet

    from spatialdata_align._report import assess_alignment, fig_confidence

    twin = run["twin"]
    back = spatialdata.read_zarr(run["out"])
    src, dst = twin.truth.landmarks_source, twin.truth.landmarks_target
    names = list(twin.truth.landmark_names)
    corner = np.argsort(np.linalg.norm(src - src.min(axis=0), axis=1))[:3]
    for pick, flagged in ((np.arange(len(src)), False), (corner, True)):
        a = assess_alignment(back, landmarks=(src[pick], dst[pick], [names[i] for i in pick]), loo="none")
        ext = a.metrics["landmark_extrapolation"]
        assert (ext["p95"] > 1.5) is flagged, ext
        assert a.extrapolation.shape == (len(element_xy(back, XENIUM_CELLS, XENIUM_CS)),)
        assert any("extrapolating the landmark fit" in r for r in a.verdict.reasons) is flagged, a.verdict.reasons
        fig = fig_confidence(back, a)
        lines = [c for c in fig.axes[0].findobj(ContourSet)]
        assert bool(lines) is flagged
        if flagged:  # the level line lies over the tissue, between the landmarks and the far cells
            seg = np.concatenate([p for p in lines[0].allsegs[0]])
            assert len(seg) > 10
        fig.clf()


def test_zoom_figure_without_landmarks_draws_no_empty_legend(run):
    """Without landmarks (--auto-init) nothing in the zooms is labelled: no legend, and no matplotlib warning through
    --quiet; with landmarks the legend names them."""
    import warnings

    from spatialdata_align._report import assess_alignment, fig_zooms

    back = spatialdata.read_zarr(run["out"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fig = fig_zooms(back, assess_alignment(back, landmarks=None, loo="none"))
    assert fig.axes[0].get_legend() is None
    fig.clf()
    twin = run["twin"]
    lm = (twin.truth.landmarks_source, twin.truth.landmarks_target, list(twin.truth.landmark_names))
    fig = fig_zooms(back, assess_alignment(back, landmarks=lm, loo="none"))
    assert "landmark (Visium)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig.clf()


def test_accuracy_estimate_refits_a_fit_that_found_a_cut(tmp_path):
    """A torn section whose Xenium region cuts through the tissue on one side (``damaged``, seed 0, 900 cells/mm²):
    the fit's field of view has open sides (stored as None), and the held-out refits, which repeat the fit's
    parameters, take it back. Until 2026-12-03 every such run died at the accuracy estimate (TypeError)."""
    import spatialdata_align as sda
    from spatialdata_align._pipeline import run_pipeline

    pair = sda.datasets.pair_family("damaged", tmp_path / "pair", seed=0, density=900)
    res = run_pipeline(
        pair.xenium_path,
        pair.visium_path,
        landmarks=pair.landmarks_path,
        dx=40.0,
        max_refits=2,
        flip=True,
        verbose=False,
        progress=False,
    )
    fov = res.sdata.align.get("xenium_to_visium_lddmm").params["field_of_view"]
    assert fov is not None and None in fov and any(b is not None for b in fov)
    assert res.assessment.metrics["loo_refits"] == 2
    # a sparse section (900 cells/mm²): optimised longer, and the summary says so
    lsum = res.summary["lddmm"]
    assert lsum["sparse_optimisation"] is True and 700 < lsum["cells_per_mm2"] < 1100
    assert lsum["tol"] == 0.005 and list(lsum["max_iter"]) == [400, 300, 300]
    assert np.isfinite(res.assessment.metrics["loo_lddmm_um"]["median"])
