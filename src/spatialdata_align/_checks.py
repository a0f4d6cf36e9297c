"""Plausibility checks of the inputs and outputs, run before any work.

Every problem names the file it comes from and says how to fix it. Two kinds:

* **errors** (:class:`PlausibilityError`, a :class:`ValueError`): the input cannot be right (non-finite
  coordinates, a 1-pixel image, an output inside an input folder). Always raised.
* **suspects**: the input is almost certainly wrong (a landmark 1 mm off the others, swapped pixel columns,
  a mirrored landmark fit, images that disagree with their scale factors). Raised as
  :class:`PlausibilityError` too, unless the caller runs inside :func:`relaxed` (the CLI's ``--force``):
  then each becomes a :class:`PlausibilityWarning`, is recorded, and the run's verdict is "unreliable".

The readers (:mod:`spatialdata_align.io`) call :func:`check_finite`, :func:`check_folder_modality`,
:func:`check_pair_modalities` and :func:`check_visium_geometry`; the pipeline calls :func:`check_outputs`,
:func:`check_landmarks` and writes through :class:`StagedOutputs` (a temporary path, moved into place only
when everything succeeded). All are usable from Python.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM

__all__ = [
    "Finding",
    "LandmarkCheck",
    "PlausibilityError",
    "PlausibilityWarning",
    "StagedOutputs",
    "check_finite",
    "check_folder_modality",
    "check_landmarks",
    "check_outputs",
    "check_pair_modalities",
    "check_spot_grid",
    "check_visium_geometry",
    "check_visium_images",
    "collecting",
    "folder_modality",
    "relaxed",
    "report_suspects",
    "soft_warning",
]

#: a landmark is never called an outlier when its held-out error is below this (µm): serial sections deform
#: and hand-placed landmarks are off by a few cells
LANDMARK_OUTLIER_FLOOR_UM = 100.0
#: ... nor below this multiple of the other landmarks' median held-out error
LANDMARK_OUTLIER_FACTOR = 4.0
#: accepted ratio range between the landmark fit's scale and the one the scale factors imply
SCALE_TOLERANCE = 1.5
#: landmarks whose spread across their main axis is below this fraction of the spread along it are "close to a
#: line": a scale mismatch of their affine is then blamed on that, not on units, when a similarity of the same
#: landmarks has the expected scale (three synthetic landmark sets at 5 % gave an affine scale of 0.42x, the
#: similarity 1.03x)
ELONGATED_LANDMARKS = 0.2
#: spots spanning less than this fraction of a hires/lowres image (both axes) get a warning
LOW_COVERAGE = 0.25
#: images smaller than this (pixels, either side) cannot be tissue images
MIN_IMAGE_PX = 16
#: default Xenium morphology pixel size (µm), for hints
_XENIUM_PX_UM = 0.2125


class PlausibilityError(ValueError):
    """An input or output that cannot be (or almost certainly is not) right; the message names file and fix."""

    def __init__(self, message: str, *, code: str = "input", findings: Sequence[Finding] = ()):
        super().__init__(message)
        self.code = code
        self.findings = list(findings)


class PlausibilityWarning(UserWarning):
    """A suspect input accepted under :func:`relaxed` (``--force``), or a softer problem worth a look."""


class LandmarkCoverageWarning(PlausibilityWarning):
    """Landmarks that leave part of the tissue far from them (``sdata.align.affine``); the report says it too."""


@dataclass
class Finding:
    """One problem: ``code`` (e.g. ``"landmark_outlier"``), ``message`` (names the file), ``fix``."""

    code: str
    message: str
    fix: str = ""
    file: str | None = None
    severity: str = "suspect"

    def __str__(self) -> str:
        return f"{self.message} Fix: {self.fix}" if self.fix else self.message


@dataclass
class _Sink:
    findings: list
    force: bool


_SINK: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar("sda_checks_sink", default=None)


@contextlib.contextmanager
def collecting(findings: list | None = None, *, force: bool = False):
    """Record the problems found inside this block; with ``force``, suspects warn instead of raising.

    Parameters
    ----------
    findings
        List receiving every :class:`Finding`: suspects accepted with ``force`` (severity ``"suspect"``) and
        softer problems (severity ``"warning"``). A new list by default.
    force
        Accept suspect inputs (a :class:`PlausibilityWarning` each) instead of raising.

    Yields
    ------
    The list of findings.
    """
    findings = [] if findings is None else findings
    token = _SINK.set(_Sink(findings, force))
    try:
        yield findings
    finally:
        _SINK.reset(token)


def relaxed(findings: list | None = None):
    """Inside this block suspect inputs warn (:class:`PlausibilityWarning`) instead of raising (``--force``).

    Shorthand for ``collecting(findings, force=True)``.
    """
    return collecting(findings, force=True)


def _fmt(file, problem: str) -> str:
    return f"{file}: {problem}" if file is not None else problem


#: how the hint of a refused suspect input names the override (``sda.batch`` rewrites it into its own flag)
FORCE_HINT = "--force (Python: force=True)"


def report_suspects(findings: Sequence[Finding]) -> None:
    """Raise the suspects as one :class:`PlausibilityError`, or, when forced (:func:`relaxed`), warn and record them."""
    if not findings:
        return
    sink = _SINK.get()
    if sink is None or not sink.force:
        text = "\n".join(str(f) for f in findings)
        more = "" if len(findings) == 1 else f"{len(findings)} problems:\n"
        raise PlausibilityError(
            more + text + f"\n(If you are sure the input is right, {FORCE_HINT} runs anyway; the "
            "result is then marked unreliable.)",
            code=findings[0].code,
            findings=findings,
        )
    for f in findings:
        sink.findings.append(f)
        warnings.warn(str(f), PlausibilityWarning, stacklevel=3)


def soft_warning(finding: Finding) -> None:
    """A problem worth a look that does not block the run: warned, and recorded by :func:`collecting`."""
    finding.severity = "warning"
    sink = _SINK.get()
    if sink is not None:
        sink.findings.append(finding)
    warnings.warn(str(finding), PlausibilityWarning, stacklevel=3)


def suspect(code: str, problem: str, *, file=None, fix: str = "") -> None:
    """One suspect input (see :func:`report_suspects`)."""
    report_suspects([Finding(code, _fmt(file, problem), fix, None if file is None else str(file))])


def fail(problem: str, *, file=None, fix: str = "", code: str = "input") -> None:
    """Raise a :class:`PlausibilityError` (never relaxed)."""
    msg = _fmt(file, problem)
    raise PlausibilityError(f"{msg} Fix: {fix}" if fix else msg, code=code)


# ----------------------------------------------------------------------------------------------------------------
# coordinates
# ----------------------------------------------------------------------------------------------------------------
def check_finite(values, file, columns: Sequence[str], ids=None, *, what: str = "coordinates") -> None:
    """Raise if any value is NaN or ±inf, naming the file, the column, the count and the first rows.

    Parameters
    ----------
    values
        ``(N, len(columns))`` array or DataFrame with those columns.
    file
        The file the values come from (named in the message).
    columns
        Column names, in order.
    ids
        Optional ``(N,)`` row labels (cell ids, barcodes) shown for the first bad rows.
    what
        What the values are, for the message.
    """
    arr = values[list(columns)].to_numpy(dtype=float) if hasattr(values, "columns") else np.asarray(values, float)
    arr = arr.reshape(len(arr), -1)
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    rows = np.flatnonzero(bad.any(axis=1))
    per_col = ", ".join(f"{c!r}: {int(bad[:, j].sum())}" for j, c in enumerate(columns) if bad[:, j].any())
    labels = np.asarray(ids) if ids is not None else np.array([f"data row {r + 1}" for r in range(len(arr))])
    examples = [str(labels[r]) for r in rows[:3]]
    vals = sorted({str(v) for v in arr[bad][:10]})
    fail(
        f"{len(rows)} of {len(arr)} rows have non-finite {what} ({', '.join(vals)}) in {per_col} "
        f"(e.g. {', '.join(examples)}).",
        file=file,
        fix="correct or remove those rows (the file was probably edited or exported with missing values).",
        code="non_finite",
    )


# ----------------------------------------------------------------------------------------------------------------
# which 10x output is this folder?
# ----------------------------------------------------------------------------------------------------------------
_XENIUM_MARKERS = (
    "experiment.xenium",
    "cells.parquet",
    "cells.csv.gz",
    "cells.csv",
    "cell_feature_matrix.h5",
    "cell_feature_matrix",
    "cells.zarr.zip",
    "transcripts.parquet",
    "transcripts.csv.gz",
    "morphology_focus",
    "morphology_mip.ome.tif",
    "morphology.ome.tif",
)
_VISIUM_MARKERS = (
    "spatial/scalefactors_json.json",
    "spatial/tissue_positions.csv",
    "spatial/tissue_positions_list.csv",
    "spatial/tissue_positions.parquet",
    "spatial/tissue_hires_image.png",
    "filtered_feature_bc_matrix.h5",
    "filtered_feature_bc_matrix",
    "raw_feature_bc_matrix.h5",
    "binned_outputs",
)


def _markers(folder: Path, names: Iterable[str]) -> list[str]:
    return [n for n in names if (folder / n).exists()]


def folder_modality(path) -> tuple[str | None, list[str]]:
    """``("xenium" | "visium" | None, evidence)``: which 10x output a folder (or its ``outs/``) looks like.

    ``None`` when it holds markers of neither or of both.
    """
    path = Path(path)
    found = {"xenium": [], "visium": []}
    for folder in (path, path / "outs"):
        if not folder.is_dir():
            continue
        prefix = "" if folder == path else "outs/"
        found["xenium"] += [prefix + m for m in _markers(folder, _XENIUM_MARKERS)]
        found["visium"] += [prefix + m for m in _markers(folder, _VISIUM_MARKERS)]
        found["visium"] += [prefix + p.name for p in folder.glob("*_filtered_feature_bc_matrix.h5")]
    kinds = [k for k, v in found.items() if v]
    if len(kinds) != 1:
        return None, []
    return kinds[0], found[kinds[0]]


_LABEL = {"xenium": "Xenium", "visium": "Visium (Space Ranger)"}
_FLAG = {"xenium": "--xenium", "visium": "--visium"}


def check_folder_modality(path, expected: str) -> None:
    """Raise when ``path`` is clearly the other modality's output folder (e.g. a Visium ``outs/`` as Xenium)."""
    kind, evidence = folder_modality(path)
    if kind is None or kind == expected:
        return
    fail(
        f"this is a {_LABEL[kind]} output folder (it holds {', '.join(evidence[:4])}), not a {_LABEL[expected]} one.",
        file=path,
        fix=f"pass it as {_FLAG[kind]}; were --xenium and --visium swapped?",
        code="swapped_modalities",
    )


def check_pair_modalities(xenium_path, visium_path) -> None:
    """Raise when the Xenium and Visium folders were given the wrong way round (or one of them is wrong)."""
    kx, ex = folder_modality(xenium_path)
    kv, ev = folder_modality(visium_path)
    if kx == "visium" and kv == "xenium":
        fail(
            f"the two folders are swapped: --xenium {xenium_path} is a Visium folder ({', '.join(ex[:3])}) and "
            f"--visium {visium_path} is a Xenium folder ({', '.join(ev[:3])}).",
            fix=f"run with --xenium {visium_path} --visium {xenium_path} (read_pair(xenium_path, visium_path)).",
            code="swapped_modalities",
        )
    check_folder_modality(xenium_path, "xenium")
    check_folder_modality(visium_path, "visium")


# ----------------------------------------------------------------------------------------------------------------
# Visium geometry: spot grid, scale factors, image sizes
# ----------------------------------------------------------------------------------------------------------------
def check_spot_grid(positions, file, *, spot_diameter_fullres: float | None = None, scalefactors_file=None) -> dict:
    """Check the pixel columns of a tissue-positions table against its array grid.

    The array grid is physical: on the Visium hex grid a step of ``array_col`` is 50 µm along the slide's x
    axis and a step of ``array_row`` 86.6 µm along y (Visium HD: square bins, the same step both ways). An
    affine fit from ``(array_col, array_row)`` to ``(pxl_col_in_fullres, pxl_row_in_fullres)`` must
    therefore be a near-exact lattice map with the right step ratio and, unless the image is rotated, the
    columns along x.

    Raises (as suspects)
    --------------------
    * pixel positions that do not follow the grid (shuffled rows, a column replaced);
    * ``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` swapped (array columns run along the pixel rows with a
      mirrored handedness: a transposed table);
    * ``array_row`` / ``array_col`` swapped (step ratio inverted);
    * ``spot_diameter_fullres`` far from the grid's own pixel size.

    Returns
    -------
    ``{'hex', 'col_step_px', 'row_step_px', 'um_per_px_grid', 'rms_residual_px'}`` (empty if the grid is too
    small to tell).
    """
    ac = np.asarray(positions["array_col"], float)
    ar = np.asarray(positions["array_row"], float)
    px = np.asarray(positions["pxl_col_in_fullres"], float)
    py = np.asarray(positions["pxl_row_in_fullres"], float)
    ok = np.isfinite(px) & np.isfinite(py)
    ac, ar, px, py = ac[ok], ar[ok], px[ok], py[ok]
    if len(np.unique(ac)) < 2 or len(np.unique(ar)) < 2 or len(ac) < 4:
        return {}
    design = np.column_stack([ac, ar, np.ones_like(ac)])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([px, py]), rcond=None)
    col_v, row_v = coef[0], coef[1]  # pixel step per array column / row, (x, y)
    resid = np.column_stack([px, py]) - design @ coef
    rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))
    lc, lr = float(np.linalg.norm(col_v)), float(np.linalg.norm(row_v))
    hexgrid = bool(np.all((ac + ar) % 2 == 0))
    info = {"hex": hexgrid, "col_step_px": lc, "row_step_px": lr, "rms_residual_px": rms}
    findings = []
    if min(lc, lr) <= 0 or rms > 0.25 * min(lc, lr):
        findings.append(
            Finding(
                "spot_grid",
                _fmt(
                    file,
                    f"the pixel positions do not follow the array grid (rms deviation {rms:.3g} px from the best "
                    f"lattice fit, for steps of {lc:.3g} / {lr:.3g} px per array column / row).",
                ),
                "restore the file from the Space Ranger output: rows or columns of it were changed.",
                str(file),
            )
        )
        report_suspects(findings)
        return info
    expected_ratio = np.sqrt(3.0) if hexgrid else 1.0
    ratio = lr / lc
    if hexgrid and abs(np.log(ratio / expected_ratio)) > np.log(1.3) and abs(np.log(ratio * expected_ratio)) < 0.2:
        findings.append(
            Finding(
                "swapped_array_columns",
                _fmt(
                    file,
                    f"'array_row' and 'array_col' look swapped: one array row is {lr:.3g} px and one array column "
                    f"{lc:.3g} px, but on the Visium hex grid a row step (86.6 µm) is sqrt(3) times a column step "
                    "(50 µm).",
                ),
                "swap the 'array_row' and 'array_col' columns back (Space Ranger order: barcode, in_tissue, "
                "array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres).",
                str(file),
            )
        )
    det = float(col_v[0] * row_v[1] - col_v[1] * row_v[0])
    if abs(col_v[1]) > abs(col_v[0]) and det < 0:
        findings.append(
            Finding(
                "swapped_pixel_columns",
                _fmt(
                    file,
                    "'pxl_row_in_fullres' and 'pxl_col_in_fullres' look swapped: the array columns (x on the "
                    f"slide) run along the pixel rows (y), {abs(col_v[1]):.3g} px per column in y vs "
                    f"{abs(col_v[0]):.3g} px in x, with a mirrored handedness (a transposed table, not a rotated "
                    "image).",
                ),
                "swap the two pixel columns back: pxl_row_in_fullres is the image row (y), pxl_col_in_fullres "
                "the image column (x).",
                str(file),
            )
        )
    step_um = (VISIUM_SPOT_PITCH_UM / 2) if hexgrid else None
    if step_um is not None:
        um_per_px_grid = float(np.sqrt(step_um * VISIUM_SPOT_PITCH_UM * np.sqrt(3) / 2 / (lc * lr)))
        info["um_per_px_grid"] = um_per_px_grid
        if spot_diameter_fullres:
            um_sf = VISIUM_SPOT_DIAMETER_UM / float(spot_diameter_fullres)
            # Space Ranger's spot_diameter_fullres is not exactly 55 µm of pixels (it spans ~65 µm in
            # real runs); only a gross mismatch is flagged
            if not 1 / SCALE_TOLERANCE <= um_sf / um_per_px_grid <= SCALE_TOLERANCE * 1.1:
                implied = VISIUM_SPOT_DIAMETER_UM / um_per_px_grid
                findings.append(
                    Finding(
                        "spot_diameter",
                        _fmt(
                            scalefactors_file or file,
                            f"spot_diameter_fullres = {spot_diameter_fullres:.4g} px implies {um_sf:.3g} µm per "
                            f"full-resolution pixel, but the spot grid of {Path(str(file)).name} (100 µm "
                            f"centre to centre) implies {um_per_px_grid:.3g} µm per pixel.",
                        ),
                        f"restore scalefactors_json.json from the Space Ranger output (a 55 µm spot spans about "
                        f"{implied:.4g} px on this grid).",
                        str(scalefactors_file or file),
                    )
                )
    report_suspects(findings)
    return info


def check_visium_images(xy, images: Sequence[tuple], *, radius_px: float = 0.0, scalefactors_file=None) -> dict:
    """Check image sizes against their scale factors and the spot extent.

    Every image must show all spots (Space Ranger images cover the whole capture area), and two images of
    the same slide at different scale factors must cover the spots' extent in the same proportion. A hires
    image resized after Space Ranger, scale factors swapped between hires and lowres, or a placeholder image
    fail this.

    Parameters
    ----------
    xy
        ``(N, 2)`` spot centres ``(x, y)`` in full-resolution pixels (all spots of the positions file).
    images
        ``(file, (height, width), scalef, scalef_key)`` per image (``scalef`` maps full-res to image px;
        ``scalef_key`` the scale-factor name, or ``None`` for the full-resolution image).
    radius_px
        Spot radius (full-res px), tolerance at the image border.
    scalefactors_file
        ``scalefactors_json.json``, named in messages.

    Returns
    -------
    ``{file name: coverage}``: fraction of each image's width/height spanned by the spots.
    """
    xy = np.asarray(xy, float)
    xy = xy[np.isfinite(xy).all(axis=1)]
    for file, (h, w), _, _ in images:
        if min(h, w) < MIN_IMAGE_PX:
            fail(
                f"the image is only {w} x {h} px: too small to be a tissue image (truncated, or a placeholder).",
                file=file,
                fix="restore the image from the Space Ranger output (spatial/ folder).",
                code="image_size",
            )
    if len(xy) < 2:
        return {}
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    extent = np.maximum(hi - lo, 1e-9)
    cover = {}
    for file, (h, w), s, _ in images:
        cover[Path(str(file)).name] = (extent * s / np.array([w, h], float)).tolist()
    findings: list[Finding] = []
    sf_name = Path(str(scalefactors_file)).name if scalefactors_file else "scalefactors_json.json"
    scaled = [im for im in images if im[3] in _STANDARD_LONG_SIDE]  # hires and lowres: the same image downscaled
    if len(scaled) >= 2:
        findings += _compare_images(xy, radius_px, scaled[:2], cover, scalefactors_file, sf_name)
    if not findings:
        for file, (h, w), s, key in images:
            if _outside(xy, radius_px, s, w, h):
                reach = hi * s
                f = Finding(
                    "image_scale",
                    _fmt(
                        file,
                        f"the spots reach ({reach[0]:.0f}, {reach[1]:.0f}) px in this {w} x {h} px image"
                        + (f" at {key} = {s:.4g}" if key else "")
                        + ": it is smaller than the scale factor implies, or the spots belong to another image.",
                    ),
                    f"restore the image from the Space Ranger output, or correct {key} in {sf_name}."
                    if key
                    else "pass the full-resolution image Space Ranger was run with (fullres_image=...), or none.",
                    str(file),
                )
                if key not in _STANDARD_LONG_SIDE:  # full-resolution / CytAssist image: not registered onto
                    soft_warning(f)
                else:
                    findings.append(f)
        for file, (h, w), s, key in scaled:
            c = max(cover[Path(str(file)).name])
            if c < LOW_COVERAGE and not findings:
                soft_warning(
                    Finding(
                        "image_scale",
                        _fmt(
                            file,
                            f"the spots span only {100 * c:.0f}% of this {w} x {h} px image at {key} = {s:.4g} "
                            "(Space Ranger images show the whole capture area): the scale factor may be too small.",
                        ),
                        f"check {key} in {sf_name} against the Space Ranger output.",
                        str(file),
                    )
                )
    report_suspects(findings)
    return cover


#: long side (px) of the images Space Ranger writes
_STANDARD_LONG_SIDE = {"tissue_hires_scalef": (2000,), "tissue_lowres_scalef": (600,)}


def _compare_images(xy, radius_px, scaled, cover, scalefactors_file, sf_name) -> list[Finding]:
    """Two images of one slide must cover the spots in the same proportion; say which one (or the factors) is off."""
    (f1, (h1, w1), s1, k1), (f2, (h2, w2), s2, k2) = scaled
    n1, n2 = Path(str(f1)).name, Path(str(f2)).name
    c1, c2 = np.asarray(cover[n1]), np.asarray(cover[n2])
    r = np.log(c1 / c2)  # per axis (x, y); > 0: image 1 looks smaller than its factor implies
    q = float(np.exp(np.mean(r)))
    if np.abs(r).max() <= np.log(1.1):
        return []
    spans = (
        f"the spots span {100 * c1[0]:.0f}% x {100 * c1[1]:.0f}% (width x height) of {n1} ({w1} x {h1} px) but "
        f"{100 * c2[0]:.0f}% x {100 * c2[1]:.0f}% of {n2} ({w2} x {h2} px)"
    )
    if abs(r[0] - r[1]) > np.log(1.1):  # the two images do not even have the same shape
        odd = f1 if (w1 / h1 > 1) != (w2 / h2 > 1) and abs(np.log(w1 / h1)) < abs(np.log(w2 / h2)) else None
        return [
            Finding(
                "image_shape",
                _fmt(
                    odd or Path(str(f1)).parent,
                    f"{n1} and {n2} have different aspect ratios ({w1 / h1:.3g} vs {w2 / h2:.3g}): {spans}. One was "
                    "rotated, transposed or cropped after Space Ranger.",
                ),
                "restore the images from the Space Ranger output (spatial/ folder).",
                str(odd or Path(str(f1)).parent),
            )
        ]
    swapped_ok = abs(np.log(q * (s2 / s1) ** 2)) < np.log(1.1) and not (
        _outside(xy, radius_px, s2, w1, h1) or _outside(xy, radius_px, s1, w2, h2)
    )
    if swapped_ok:
        return [
            Finding(
                "swapped_scalefactors",
                _fmt(
                    scalefactors_file,
                    f"{k1} ({s1:.4g}) and {k2} ({s2:.4g}) look swapped: {spans}; swapped, both agree.",
                ),
                f"swap the values of {k1} and {k2} in {sf_name}.",
                str(scalefactors_file),
            )
        ]
    out1, out2 = _outside(xy, radius_px, s1, w1, h1), _outside(xy, radius_px, s2, w2, h2)
    std1 = max(w1, h1) in _STANDARD_LONG_SIDE.get(k1, ())
    std2 = max(w2, h2) in _STANDARD_LONG_SIDE.get(k2, ())
    if out1 != out2 or std1 != std2:
        one = out1 if out1 != out2 else std2
        f, k, s, factor = (f1, k1, s1, q) if one else (f2, k2, s2, 1 / q)
        name = Path(str(f)).name
        size = "smaller" if factor > 1 else "larger"
        return [
            Finding(
                "image_scale",
                _fmt(
                    f,
                    f"the image does not match {k} in {sf_name}: {spans}; {name} looks "
                    f"{max(factor, 1 / factor):.2g}x {size} than its scale factor implies (resized after Space "
                    "Ranger?).",
                ),
                f"restore {name} from the Space Ranger output, or set {k} to {s / factor:.6g} in {sf_name}.",
                str(f),
            )
        ]
    return [
        Finding(
            "image_scale",
            _fmt(
                scalefactors_file,
                f"{n1} and {n2} disagree with {k1} / {k2}: {spans}. One image was resized after Space Ranger: "
                f"{n1} looks {q:.2g}x {'smaller' if q > 1 else 'larger'} than {k1} implies, or {n2} "
                f"{q:.2g}x {'larger' if q > 1 else 'smaller'} than {k2} implies.",
            ),
            f"restore both images from the Space Ranger output (or correct {k1} / {k2} in {sf_name}).",
            str(scalefactors_file),
        )
    ]


def _outside(xy: np.ndarray, radius_px: float, s: float, w: int, h: int) -> bool:
    tol = radius_px * s + 0.02 * max(w, h) + 2
    u = xy * s
    return bool(u[:, 0].min() < -tol or u[:, 1].min() < -tol or u[:, 0].max() > w + tol or u[:, 1].max() > h + tol)


def _image_hw(image) -> tuple[int, int]:
    """``(height, width)`` of an image array, DataArray or multiscale DataTree (its finest scale)."""
    if not hasattr(image, "shape"):
        image = next(iter(image["scale0"].ds.data_vars.values()))
    return int(image.shape[-2]), int(image.shape[-1])


def check_visium_geometry(positions, positions_file, scalefactors: dict, scalefactors_file, images: dict) -> dict:
    """All Visium geometry checks of one ``outs/`` folder: :func:`check_spot_grid`, :func:`check_visium_images`.

    ``images`` maps each image file to ``(image, scalef_key)``: the image as read (an array / DataArray of
    shape ``(..., height, width)``, or a multiscale DataTree) and its scale-factor name (``None`` for the
    full-resolution image). Returns the two results merged.
    """
    grid = check_spot_grid(
        positions,
        positions_file,
        spot_diameter_fullres=scalefactors.get("spot_diameter_fullres"),
        scalefactors_file=scalefactors_file,
    )
    xy = np.column_stack(
        [np.asarray(positions["pxl_col_in_fullres"], float), np.asarray(positions["pxl_row_in_fullres"], float)]
    )
    listed = [
        (f, _image_hw(image), 1.0 if key is None else float(scalefactors[key]), key)
        for f, (image, key) in images.items()
    ]
    cover = check_visium_images(
        xy,
        listed,
        radius_px=float(scalefactors.get("spot_diameter_fullres", 0.0)) / 2,
        scalefactors_file=scalefactors_file,
    )
    return {**grid, "image_coverage": cover}


# ----------------------------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LandmarkCheck:
    """What :func:`check_landmarks` measured (target distances in µm)."""

    n: int
    inliers: np.ndarray
    loo_um: np.ndarray
    outliers: list[str]
    outlier_index: list[int]
    reflection: bool
    scale_ratio: float | None
    findings: list[Finding] = field(default_factory=list)


def _landmark_label(names, i: int, file) -> str:
    name = names[i] if names is not None and i < len(names) else str(i)
    csv = file is not None and Path(str(file)).suffix.lower() == ".csv"
    line = f", line {i + 2} of {Path(str(file)).name}" if csv else ""
    return f"{name!r}{line}"


def check_landmarks_on_image(dst, extent: dict, *, file=None, names=None, margin: float = 0.05) -> None:
    """Target landmarks (Visium full-resolution px) must lie on the image they were placed on.

    ``extent``: the registration image's ``{"x": (min, max), "y": (min, max)}`` in full-resolution px
    (:func:`spatialdata.get_extent`). Landmarks more than ``margin`` of its size outside are a suspect input: e.g. a
    column offset, coordinates of another image, or a file for another section. Before, such a run did the whole
    alignment and then failed with "the modalities share no tissue".
    """
    d = np.asarray(dst, float).reshape(-1, 2)
    (x0, x1), (y0, y1) = extent["x"], extent["y"]
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    off = (d[:, 0] < x0 - mx) | (d[:, 0] > x1 + mx) | (d[:, 1] < y0 - my) | (d[:, 1] > y1 + my)
    if not off.any():
        return
    where = file if file is not None else "landmarks"
    shown = ", ".join(
        f"{_landmark_label(names, int(i), file)} at ({d[i, 0]:.6g}, {d[i, 1]:.6g})" for i in np.flatnonzero(off)[:3]
    )
    report_suspects(
        [
            Finding(
                "landmarks_off_image",
                _fmt(
                    where,
                    f"{int(off.sum())} of {len(d)} target landmarks lie outside the Visium image, which spans x "
                    f"{x0:.6g}-{x1:.6g} and y {y0:.6g}-{y1:.6g} full-resolution px: {shown}.",
                ),
                "target landmarks are positions on the H&E in full-resolution pixels (hires-image pixels need "
                "--landmark-units hires); correct the file (a shifted column, another image's or section's "
                "coordinates?).",
                None if file is None else str(file),
            )
        ]
    )


#: landmarks whose robust fit leaves a median residual above this fraction of their spread (and above
#: LANDMARK_OUTLIER_FLOOR_UM) are pairs out of order (check_landmarks)
MISMATCH_SPREAD_FRACTION = 0.15


def _check_repeated_landmarks(s: np.ndarray, d: np.ndarray, names, file, um_per_px: float | None) -> None:
    """Fail on a landmark pair given twice (both ends within 1 µm).

    A pasted row doubles that landmark's weight in the fit, and the held-out error of one copy is measured with the
    other still in the fit.
    """
    from scipy.spatial.distance import pdist, squareform

    if len(s) < 2:
        return
    upp = float(um_per_px) if um_per_px else 1.0
    near = (squareform(pdist(s)) < 1.0) & (squareform(pdist(d)) * upp < 1.0)
    rows, cols = np.nonzero(np.triu(near, 1))
    if len(rows):
        pairs = "; ".join(
            f"{_landmark_label(names, int(a), file)} and {_landmark_label(names, int(b), file)}"
            for a, b in zip(rows, cols, strict=True)
        )
        fail(
            f"the same landmark pair is given more than once ({pairs}): it would count twice in the fit and in "
            "the held-out error.",
            file=file,
            fix="delete the repeated row(s).",
            code="repeated_landmarks",
        )


def _held_out_leverage(s: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """``sqrt(1 + h_i)`` per landmark: its held-out error in units of the landmarks' own placement error.

    ``h_i`` is landmark ``i``'s leverage in the affine fit of the other inliers
    (:func:`~spatialdata_align.registration.landmark_extrapolation` squared): the held-out error of a correct click
    has the standard deviation ``sigma * sqrt(1 + h_i)``, about ``sigma`` inside a well-spread set and growing with
    the distance outside it. Over the 78 landmark sets of 4-10 correct landmarks in the validation corpus (8-15 µm
    clicks, 80-160 µm warps) the held-out errors alone named a landmark as a typo in 5 sets (e.g. 404 and 659 µm for
    landmarks outside the other three's triangle), these normalised ones in none; a click moved by 250 / 800 µm
    was named in 31 / 86 of 234 trials (27 / 84 before).
    """
    from .registration._quality import landmark_extrapolation

    lev = np.ones(len(s))
    for i in range(len(s)):
        others = inliers.copy()
        others[i] = False
        if others.sum() >= 2:
            h = float(landmark_extrapolation(s, s[i : i + 1], use=others)[0])
            lev[i] = np.sqrt(1.0 + h * h) if np.isfinite(h) else 1.0
    return lev


def check_landmarks(
    src,
    dst,
    *,
    file=None,
    names: Sequence[str] | None = None,
    um_per_px: float | None = None,
    flip: bool = False,
    scalefactors: dict | None = None,
    landmark_units: str = "fullres",
) -> LandmarkCheck:
    """Check matched landmarks (source µm, target full-resolution px) before fitting.

    * fewer than three pairs, or (nearly) collinear ones: an error that says what to do instead;
    * a landmark far from where the others place it (robust fit + leave-one-out residual): named, with
      its line in ``file``;
    * a reflection in the fit (e.g. target landmarks saved as (y, x), napari's row/column order) unless
      ``flip``;
    * a fitted scale far from the one the Visium scale factors imply (e.g. hires-image pixels given as
      full-resolution ones).

    Parameters
    ----------
    src, dst
        ``(N, 2)`` landmarks: Xenium µm and Visium full-resolution pixels.
    file
        The landmark file, named in messages (lines counted for a CSV with a header).
    names
        Landmark names.
    um_per_px
        µm per full-resolution pixel of the Visium image (from ``spot_diameter_fullres``).
    flip
        Accept a mirrored fit (a section mounted upside down).
    scalefactors
        Visium scale factors, for hints (hires / lowres units).
    landmark_units
        Units the target landmarks were declared in (``"fullres"`` or ``"hires"``), for hints.

    Returns
    -------
    :class:`LandmarkCheck`. Suspects are raised (or recorded under :func:`relaxed`).
    """
    from .registration import fit_affine
    from .registration._landmarks import AFFINE_SHAPE_PRIOR
    from .registration._quality import fit_matrix, landmark_loo, robust_landmark_fit
    from .registration._utils import apply_affine

    s = np.asarray(src, float).reshape(-1, 2)
    d = np.asarray(dst, float).reshape(-1, 2)
    n = len(s)
    where = file if file is not None else "landmarks"
    alt = "--auto-init (no landmarks; Python: auto_init=True, or sdata.align.affine(kind='similarity'))"
    if n < 3:
        fail(
            f"{n} landmark pair(s): an affine needs at least 3 pairs that span an area.",
            file=where,
            fix=f"add landmarks (3 or more, spread over the tissue), or use {alt}.",
            code="too_few_landmarks",
        )
    _check_repeated_landmarks(s, d, names, where, um_per_px)
    for side, pts in (("source (Xenium)", s), ("target (Visium)", d)):
        c = pts - pts.mean(axis=0)
        sv = np.linalg.svd(c, compute_uv=False)
        if sv[-1] <= sv[0] * 1e-3:
            fail(
                f"the {side} landmarks lie on a line (or coincide): an affine cannot be fitted from them "
                f"(singular values {sv[0]:.3g}, {sv[-1]:.3g}).",
                file=where,
                fix=f"add a landmark off that line (three or more spread over the tissue), or use {alt}.",
                code="collinear_landmarks",
            )
    upp = float(um_per_px) if um_per_px else 1.0
    unit = "µm" if um_per_px else "px"
    findings: list[Finding] = []
    robust = robust_landmark_fit(s, d, min_tol=LANDMARK_OUTLIER_FLOOR_UM / upp)
    loo = landmark_loo(s, d, use=robust.inliers) * upp
    outliers: list[str] = []
    outlier_index: list[int] = []
    inl = robust.inliers
    if n >= 4:
        # held-out errors at the leverage of a typical landmark of the set: a landmark outside the others' spread is
        # placed by their fit's extrapolation, so its held-out error is larger for a correct click too
        lev = _held_out_leverage(s, inl)
        z = loo * (np.median(lev[inl]) if inl.any() else 1.0) / lev
        ref = np.nanmedian(z[inl]) if inl.sum() >= 3 else np.nan
        limit = max(LANDMARK_OUTLIER_FACTOR * (ref if np.isfinite(ref) else 0.0), LANDMARK_OUTLIER_FLOOR_UM)
        for i in np.flatnonzero(np.isfinite(z) & (z > limit)):
            expected = apply_affine(robust.matrix, s[i : i + 1])[0]
            label = _landmark_label(names, int(i), file)
            outliers.append(label)
            outlier_index.append(int(i))
            findings.append(
                Finding(
                    "landmark_outlier",
                    _fmt(
                        where,
                        f"landmark {label} is {loo[i]:.4g} {unit} from where the other landmarks place it (they agree "
                        f"to {ref:.3g} {unit}, median): its target ({d[i, 0]:.6g}, {d[i, 1]:.6g}) px should be near "
                        f"({expected[0]:.6g}, {expected[1]:.6g}) px; a typo or a mismatched pair.",
                    ),
                    "correct that row (or delete it) and run again.",
                    None if file is None else str(file),
                )
            )
    elif n == 3:
        spread = float(np.sqrt(np.sum(np.var(d, axis=0)))) * upp
        worst = float(fit_affine(s, d, kind="similarity").residuals.max()) * upp
        if worst > max(LANDMARK_OUTLIER_FLOOR_UM, 0.1 * spread):
            findings.append(
                Finding(
                    "landmark_outlier",
                    _fmt(
                        where,
                        f"the 3 landmarks disagree: no rotation + scale maps them onto each other within "
                        f"{worst:.4g} {unit}; with 3 pairs the wrong one cannot be identified.",
                    ),
                    "check each pair, or add landmarks so that a wrong one stands out.",
                    None if file is None else str(file),
                )
            )
    lin = robust.matrix[:2, :2]
    det = float(np.linalg.det(lin))
    reflection = det < 0
    mismatched = False
    if n >= 4:
        # pairs out of order (rows shifted, a sorted column): no affine fits most of them, so no single landmark is
        # "the typo" and a mirror is no explanation; the robust fit's median residual over every landmark was at most
        # 48 µm (0.05 of the landmarks' spread) on 90 correct corpus sets and above the limit on 86 of 90 shuffled
        # ones (the other 4: sets of 4, which a fit through 3 matches exactly). With one click moved by 800 µm it
        # fires on 24 of the 90 sets (robust fits of 4-5 landmarks are similarities), none of them sets whose typo
        # was named before (44 named either way; 13 -> 8 sets pass the check)
        res = np.linalg.norm(apply_affine(robust.matrix, s) - d, axis=1) * upp
        spread = float(np.sqrt(np.sum(np.var(d, axis=0)))) * upp
        limit = max(LANDMARK_OUTLIER_FLOOR_UM, MISMATCH_SPREAD_FRACTION * spread)
        if float(np.median(res)) > limit:
            mismatched = True
            findings = [f for f in findings if f.code != "landmark_outlier"]
            outliers, outlier_index = [], []
            findings.append(
                Finding(
                    "landmarks_mismatched",
                    _fmt(
                        where,
                        f"the {n} landmark pairs disagree: the best robust fit leaves half of them more than "
                        f"{float(np.median(res)):.4g} {unit} off (the landmarks spread over {spread:.4g} {unit}), so "
                        "no single landmark stands out as the typo: the source and target rows do not belong "
                        "together, or several are wrong.",
                    ),
                    "check that each row pairs the same structure on both sections (rows shifted by one, a column "
                    "sorted on its own, a file for another section?).",
                    None if file is None else str(file),
                )
            )
    if reflection and not flip and not mismatched:
        yx_fix = "swap target_x and target_y (and the source columns if those were saved that way too)"
        findings.append(
            Finding(
                "reflection",
                _fmt(
                    where,
                    "the landmark fit is mirrored (it contains a reflection): the target landmarks may be in "
                    "(y, x) / (row, column) order, as napari saves them, or the section is mounted upside down.",
                ),
                f"if the coordinates are (y, x), {yx_fix}; if the section really is mirrored, pass --allow-flip "
                "(Python: flip=True).",
                None if file is None else str(file),
            )
        )
    ratio = None
    if um_per_px:
        # the scale of the fit the run will use: the affine with its shape prior, on the inliers (the robust fit's
        # affine is plain least squares, whose scale a few µm of click error decide when the landmarks lie near a
        # line; the prior keeps the affine near the best rotation + scale there)
        det = float(np.linalg.det(fit_matrix(s[inl], d[inl], shape_prior=AFFINE_SHAPE_PRIOR)[:2, :2]))
        ratio = float(np.sqrt(abs(det)) * um_per_px)  # fitted px per µm over expected px per µm
        if not 1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE:
            msg = (
                f"the landmark fit maps 1 µm to {np.sqrt(abs(det)):.4g} full-resolution px, but the Visium "
                f"scale factors imply {1 / um_per_px:.4g} px per µm ({ratio:.3g}x)."
            )
            hint = _scale_hint(ratio, {"um_per_px": um_per_px, **(scalefactors or {})}, landmark_units)
            sv = np.linalg.svd(s - s.mean(axis=0), compute_uv=False)
            sim = float(np.sqrt(abs(np.linalg.det(fit_affine(s, d, kind="similarity").matrix[:2, :2]))) * um_per_px)
            if sv[-1] < ELONGATED_LANDMARKS * sv[0] and 1 / SCALE_TOLERANCE <= sim <= SCALE_TOLERANCE:
                # the units are right (a rotation + scale of the same landmarks has the expected scale): the
                # landmarks lie close to a line, so their click errors decide the affine across it
                msg += (
                    f" The landmarks lie close to a line (their spread across it is {100 * sv[-1] / sv[0]:.2g}% of "
                    f"the spread along it), so small click errors decide the affine across that line; a rotation "
                    f"+ scale fitted to the same landmarks has the expected scale ({sim:.3g}x)."
                )
                hint = (
                    "add a landmark well away from that line (landmarks spread over the tissue), or fit a "
                    "similarity (Python: sdata.align.affine(..., kind='similarity'))."
                )
            findings.append(Finding("landmark_scale", _fmt(where, msg), hint, None if file is None else str(file)))
    report_suspects(findings)
    return LandmarkCheck(
        n=n,
        inliers=robust.inliers,
        loo_um=loo,
        outliers=outliers,
        outlier_index=outlier_index,
        reflection=bool(reflection),
        scale_ratio=ratio,
        findings=findings,
    )


def reflection(what: str, *, refuse: bool) -> None:
    """A mirrored affine from the accessor: refused (``flip=False``) or accepted with a warning (``flip=None``)."""
    msg = (
        f"the affine fitted from {what} is mirrored (it contains a reflection): landmarks saved as (y, x) / "
        "(row, column), as napari saves them, or a section mounted upside down."
    )
    fix = "swap the x and y of the landmarks if they are (y, x); pass flip=True if the section really is mirrored."
    if refuse:
        raise PlausibilityError(f"{msg} Fix: {fix}", code="reflection")
    warnings.warn(f"{msg} Fix: {fix}", PlausibilityWarning, stacklevel=3)


def _close(a: float, b: float, tol: float = 0.15) -> bool:
    return a > 0 and b > 0 and abs(np.log(a / b)) < np.log(1 + tol)


def _scale_hint(ratio: float, sf: dict, units: str) -> str:
    hires, lowres, upp = sf.get("tissue_hires_scalef"), sf.get("tissue_lowres_scalef"), sf.get("um_per_px")
    if upp and _close(ratio, upp**2, 0.1):
        return (
            "source and target look exchanged (Visium pixels given as source_x/source_y, Xenium µm as "
            "target_x/target_y); swap the two column pairs."
        )
    if upp and _close(ratio, upp, 0.1):
        return "the target landmarks look like µm, not full-resolution pixels; divide them by the µm per pixel."
    for factor, unit in ((1e-3, "nm"), (1e3, "mm")):
        if _close(ratio, factor, 0.2):
            return f"the source landmarks look like {unit}, not µm (a factor of {1 / factor:g})."
    if units == "fullres" and hires and _close(ratio, hires):
        return (
            "the target landmarks look like hires-image pixels; pass --landmark-units hires (landmark_units='hires')."
        )
    if units == "hires" and hires and _close(ratio, 1 / hires):
        return (
            "the target landmarks look like full-resolution pixels, not hires ones; drop --landmark-units hires "
            "(landmark_units='fullres')."
        )
    if lowres and _close(ratio, lowres if units == "fullres" else lowres / hires):
        return (
            f"the target landmarks look like lowres-image pixels; divide them by tissue_lowres_scalef ({lowres:.4g})."
        )
    if _close(ratio, _XENIUM_PX_UM):
        return (
            "the source landmarks look like Xenium morphology-image pixels; multiply them by the pixel size "
            f"({_XENIUM_PX_UM} µm)."
        )
    if _close(ratio, 1 / _XENIUM_PX_UM):
        return (
            f"the source landmarks look like µm multiplied by {_XENIUM_PX_UM} (morphology pixels are µm divided by "
            "the pixel size); give them in µm."
        )
    return (
        "give source_x/source_y in Xenium µm and target_x/target_y in Visium full-resolution pixels (or hires "
        "pixels with --landmark-units hires); if they are, spot_diameter_fullres in scalefactors_json.json is wrong."
    )


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------
def _resolve(p) -> Path:
    return Path(p).expanduser().resolve()


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> bool:
    try:
        probe = tempfile.mkdtemp(prefix=".sda-write-probe-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _is_zarr_store(p: Path) -> bool:
    return p.is_dir() and ((p / "zarr.json").exists() or (p / ".zgroup").exists())


def _is_report(p: Path) -> bool:
    return p.is_dir() and (not any(p.iterdir()) or (p / "summary.json").exists() or (p / "index.html").exists())


def check_device(device) -> str:
    """Check a torch device for the LDDMM before any work; return it as a string.

    Raises :class:`ValueError` naming the device when torch cannot parse it, when it is not a CPU, CUDA or MPS
    device, or when this PyTorch build cannot use it (e.g. ``cuda`` with a CPU-only build or no visible GPU), so
    the command line stops with an input error instead of a traceback after reading both folders.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"device {device!r} is not a torch device (use 'cpu' or 'cuda', e.g. 'cuda:0'): {err}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU (a CPU-only build, or no GPU "
                "visible to this process); use 'cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available in this PyTorch ({torch.__version__}).")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: LDDMM runs on 'cpu', 'cuda' or 'mps' devices only.")
    return str(dev)


def check_outputs(out=None, report=None, inputs: Iterable = ()) -> dict[str, Path]:
    """Check output locations before any work: writable, not inside (or around) an input, of the right kind.

    Parameters
    ----------
    out
        The SpatialData zarr store to write (new, or an earlier zarr store that will be replaced).
    report
        The report folder (new, empty, or an earlier report that will be replaced).
    inputs
        Input paths (folders and files) that must stay untouched.

    Returns
    -------
    ``{"out": path, "report": path}`` resolved (only those given).

    Raises
    ------
    PlausibilityError
        An output inside an input folder or containing one, the two outputs nested, an existing path that is
        not a zarr store / report folder (never replaced), or a location that cannot be written.
    """
    targets = {k: _resolve(v) for k, v in (("out", out), ("report", report)) if v is not None}
    ins = [_resolve(i) for i in inputs if i is not None]
    flag = {"out": "--out", "report": "--report"}
    for k, p in targets.items():
        for i in ins:
            if p == i or i in p.parents:
                fail(
                    f"{flag[k]} {p} is inside the input {i}: outputs are never written into the inputs.",
                    fix=f"choose a {flag[k]} path outside the input folders.",
                    code="output_location",
                )
            if p in i.parents:
                fail(
                    f"{flag[k]} {p} contains the input {i}: writing it would replace the input.",
                    fix=f"choose a {flag[k]} path that does not hold the inputs.",
                    code="output_location",
                )
    if len(targets) == 2:
        a, b = targets["out"], targets["report"]
        if a == b or a in b.parents or b in a.parents:
            fail(
                f"--out {a} and --report {b} overlap.",
                fix="give two separate paths.",
                code="output_location",
            )
    for k, p in targets.items():
        if p.exists():
            if k == "out" and not _is_zarr_store(p):
                raise FileExistsError(f"{p} exists and is not a zarr store; choose another path (--out) or remove it.")
            if k == "report":
                if not p.is_dir():
                    fail(
                        f"--report {p} is an existing file; the report is a folder.",
                        fix="give a new folder path for --report.",
                        code="output_location",
                    )
                if not _is_report(p):
                    fail(
                        f"--report {p} exists and is not an earlier spatialdata-align report (no summary.json); "
                        "it is never replaced.",
                        fix="give a new or empty folder for --report.",
                        code="output_location",
                    )
            if not _writable(p) or not os.access(p.parent, os.W_OK):
                fail(
                    f"{flag[k]} {p} exists and cannot be replaced (no write permission).",
                    fix=f"choose a writable location for {flag[k]}.",
                    code="output_location",
                )
        anc = _existing_ancestor(p.parent)
        if not anc.is_dir() or not _writable(anc):
            fail(
                f"{flag[k]} {p} cannot be written: {anc} is not a writable folder.",
                fix=f"choose a writable location for {flag[k]}.",
                code="output_location",
            )
    return targets


class StagedOutputs:
    """Outputs written to temporary paths and moved into place only when everything succeeded.

    ``path(name)`` is where to write output ``name``; :meth:`commit` moves every staged output to its final
    path (replacing an earlier one); :meth:`discard` (also on leaving a ``with`` block without commit)
    removes whatever was staged, so a failure leaves no partial output.
    """

    def __init__(self, targets: dict[str, Path | None]):
        self._final = {k: _resolve(v) for k, v in targets.items() if v is not None}
        self._tmp: dict[str, Path] = {}

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def path(self, name: str) -> Path:
        """Staging path of output ``name`` (created lazily, next to the final path)."""
        if name not in self._tmp:
            final = self._final[name]
            anc = _existing_ancestor(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.sda-tmp-", dir=anc))
            self._tmp[name] = tmp
        return self._tmp[name] / self._final[name].name

    def final(self, name: str) -> Path:
        """Final path of output ``name``."""
        return self._final[name]

    def commit(self) -> dict[str, Path]:
        """Move every staged output into place; returns the final paths."""
        done = {}
        for name, tmp in list(self._tmp.items()):
            final, staged = self._final[name], tmp / self._final[name].name
            if not staged.exists():
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            old = None
            if final.exists():
                old = tmp / ".previous"
                os.replace(final, old)
            try:
                os.replace(staged, final)
            except OSError:
                if old is not None:
                    os.replace(old, final)
                raise
            done[name] = final
        self.discard()
        return done

    def discard(self) -> None:
        """Remove the staging folders (and anything left in them)."""
        for tmp in self._tmp.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._tmp.clear()
