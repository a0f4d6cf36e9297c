"""Landmark pairs and affines in files: our CSV, STalign-style ``.npy`` dicts, and Xenium Explorer's exports.

Xenium Explorer (image alignment) conventions, as :func:`spatialdata_io.xenium_aligned_image` reads them:

* keypoints CSV, header ``fixedX,fixedY,alignmentX,alignmentY``: one row per keypoint, ``fixed`` on the Xenium
  data (µm), ``alignment`` on the image being aligned (its pixels). Read as landmark pairs source = fixed (Xenium
  µm), target = alignment (image pixels; the Visium full-resolution image, or the hires PNG with
  ``--landmark-units hires``).
* image-alignment matrix CSV: three rows of three numbers, no header, the affine ``M`` taking image pixels
  ``(x, y, 1)`` to Xenium morphology pixels (``pixel_size`` µm each, 0.2125 µm by default). Our affines go the
  other way, Xenium µm to image pixels: ``A = inv(diag(pixel_size, pixel_size, 1) @ M)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CSV_COLUMNS = ("source_x", "source_y", "target_x", "target_y")
#: Xenium Explorer keypoints CSV header
EXPLORER_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
#: Xenium morphology pixel size (µm) assumed by the Explorer matrix when the experiment does not say otherwise
EXPLORER_PIXEL_SIZE = 0.2125


def read_landmarks(path, target_path=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read landmark pairs.

    Parameters
    ----------
    path
        A CSV file with columns ``source_x, source_y, target_x, target_y`` (optional ``name``),
        one row per pair; a Xenium Explorer keypoints CSV (``fixedX, fixedY, alignmentX,
        alignmentY``, see :func:`read_explorer_keypoints`); or, with ``target_path``, a ``.npy``
        file holding a dict of named source points (``{name: [[x, y], ...]}``, the STalign format).
    target_path
        The ``.npy`` dict of the target points; pairs are matched by name (and order within a
        name).

    Returns
    -------
    ``(source_xy, target_xy, names)``.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        Wrong columns, non-numeric or non-finite values, unmatched names or counts; the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    if target_path is None:
        if path.suffix.lower() == ".npy":
            raise ValueError(
                f"{path}: an STalign-style .npy landmark dict holds one side only; pass the target .npy too "
                "(--landmarks-target; Python: landmarks_target=...)."
            )
        return _read_csv(path)
    if path.suffix.lower() != ".npy":
        raise ValueError(
            f"{path}: a second landmark file (--landmarks-target) goes with an STalign-style .npy dict of source "
            "points only; a CSV holds both sides (source_x, source_y, target_x, target_y): give it alone."
        )
    return _read_npy_pair(path, Path(target_path))


def _read_csv(path: Path):
    try:
        df = pd.read_csv(path)  # pandas' default parser, as users read the file (the fit is sensitive to 1 ulp)
    except Exception as err:  # pandas raises many types for malformed files
        raise ValueError(f"{path}: cannot be read as CSV ({err}).") from err
    if all(c in df.columns for c in EXPLORER_COLUMNS):
        return read_explorer_keypoints(path)
    # headers as people type them ("Source_X", "source_x " after a comma and a space): matched like batch manifests
    canon = {c: str(c).strip().lower() for c in df.columns}
    if len(set(canon.values())) == len(canon) and all(c in canon.values() for c in CSV_COLUMNS):
        df = df.rename(columns=canon)
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: landmark CSV lacks columns {missing}; expected {list(CSV_COLUMNS)} or Xenium Explorer's "
            f"{list(EXPLORER_COLUMNS)} (got {list(df.columns)})."
        )
    if len(df) == 0:
        raise ValueError(f"{path}: no landmark rows.")
    vals = _numeric(df, CSV_COLUMNS, path)
    names = df["name"].astype(str).tolist() if "name" in df.columns else [str(i) for i in range(len(df))]
    return vals[:, :2], vals[:, 2:], names


def _load_npy_dict(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=True)
        d = obj.item() if obj.dtype == object and obj.shape == () else None
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as a .npy landmark dict ({err}).") from err
    if not isinstance(d, dict) or not d:
        raise ValueError(f"{path}: expected a non-empty dict of named points {{name: [[x, y], ...]}}.")
    out = {}
    for k, v in d.items():
        arr = np.asarray(v, dtype=float).reshape(-1, 2) if np.size(v) % 2 == 0 else None
        if arr is None or not np.isfinite(arr).all():
            raise ValueError(f"{path}: landmark {k!r} is not a finite list of (x, y) points.")
        out[str(k)] = arr
    return out


def _read_npy_pair(src_path: Path, dst_path: Path):
    src, dst = _load_npy_dict(src_path), _load_npy_dict(dst_path)
    if set(src) != set(dst):
        raise ValueError(
            f"landmark names differ: only in {src_path.name}: {sorted(set(src) - set(dst))}, "
            f"only in {dst_path.name}: {sorted(set(dst) - set(src))}."
        )
    s_list, d_list, names = [], [], []
    for k in sorted(src):
        if len(src[k]) != len(dst[k]):
            raise ValueError(f"landmark {k!r}: {len(src[k])} source vs {len(dst[k])} target points.")
        s_list.append(src[k])
        d_list.append(dst[k])
        names += [k if len(src[k]) == 1 else f"{k}_{i}" for i in range(len(src[k]))]
    return np.concatenate(s_list), np.concatenate(d_list), names


def write_landmarks_csv(path, source_xy, target_xy, names=None) -> Path:
    """Write landmark pairs in the CSV format :func:`read_landmarks` reads."""
    s = np.asarray(source_xy, float)
    t = np.asarray(target_xy, float)
    df = pd.DataFrame({"source_x": s[:, 0], "source_y": s[:, 1], "target_x": t[:, 0], "target_y": t[:, 1]})
    if names is not None:
        df.insert(0, "name", list(names))
    path = Path(path)
    df.to_csv(path, index=False)
    return path


def _numeric(df: pd.DataFrame, cols, path: Path) -> np.ndarray:
    vals = df[list(cols)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(vals).all(axis=1)
    if bad.any():
        rows = (np.flatnonzero(bad) + 2).tolist()[:5]  # +2: header line and 1-based
        raise ValueError(f"{path}: non-numeric or missing coordinates on line(s) {rows}.")
    return vals


def read_explorer_keypoints(
    path, *, fixed_units: str = "um", pixel_size: float = EXPLORER_PIXEL_SIZE
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a Xenium Explorer keypoints CSV (``fixedX, fixedY, alignmentX, alignmentY``) as landmark pairs.

    Parameters
    ----------
    path
        The CSV exported by Xenium Explorer's image alignment (or written by :func:`write_explorer_keypoints`).
    fixed_units
        Units of ``fixedX`` / ``fixedY``: ``"um"`` (Xenium µm, Explorer's export) or ``"px"`` (Xenium morphology
        pixels, converted with ``pixel_size``).
    pixel_size
        µm per Xenium morphology pixel, for ``fixed_units="px"``.

    Returns
    -------
    ``(source_xy, target_xy, names)``: Xenium µm, pixels of the aligned image, and ``"keypoint_<i>"`` names.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, missing columns or non-numeric values (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Xenium Explorer keypoints file not found: {path}")
    if fixed_units not in ("um", "px"):
        raise ValueError(f"fixed_units must be 'um' or 'px', got {fixed_units!r}.")
    try:
        df = pd.read_csv(path, float_precision="round_trip")
    except Exception as err:  # pandas raises many types for malformed files
        raise ValueError(f"{path}: cannot be read as CSV ({err}).") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in EXPLORER_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: Xenium Explorer keypoints CSV lacks {missing} (got {list(df.columns)}).")
    if len(df) == 0:
        raise ValueError(f"{path}: no keypoint rows.")
    vals = _numeric(df, EXPLORER_COLUMNS, path)
    src = vals[:, :2] * (pixel_size if fixed_units == "px" else 1.0)
    return src, vals[:, 2:], [f"keypoint_{i}" for i in range(len(df))]


def write_explorer_keypoints(path, source_xy, target_xy) -> Path:
    """Write landmark pairs (Xenium µm -> image pixels) as a Xenium Explorer keypoints CSV.

    Values are written with full precision (``repr``), so :func:`read_explorer_keypoints` gives them back exactly.
    """
    s, t = np.asarray(source_xy, float).reshape(-1, 2), np.asarray(target_xy, float).reshape(-1, 2)
    if len(s) != len(t):
        raise ValueError(f"{len(s)} source vs {len(t)} target points: keypoints must be pairs.")
    df = pd.DataFrame(np.column_stack([s, t]), columns=list(EXPLORER_COLUMNS))
    path = Path(path)
    df.to_csv(path, index=False, float_format="%.17g")
    return path


def read_explorer_alignment(path, *, pixel_size: float = EXPLORER_PIXEL_SIZE) -> np.ndarray:
    """Read a Xenium Explorer image-alignment matrix CSV as our affine: Xenium µm -> image pixels.

    The file holds the 3 x 3 matrix ``M`` (no header) taking image pixels to Xenium morphology pixels, as
    :func:`spatialdata_io.xenium_aligned_image` uses it; the result is ``inv(diag(pixel_size, pixel_size, 1) @ M)``,
    ready for ``sdata.align.lddmm(init=...)``.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, or not 3 x 3 finite numbers with last row ``0, 0, 1`` and an invertible matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Xenium Explorer alignment matrix not found: {path}")
    try:
        M = pd.read_csv(path, header=None, float_precision="round_trip").to_numpy(dtype=float)
    except Exception as err:  # pandas raises many types for malformed files
        raise ValueError(f"{path}: cannot be read as a 3 x 3 numeric CSV ({err}).") from err
    if M.shape != (3, 3) or not np.isfinite(M).all():
        raise ValueError(f"{path}: expected 3 rows of 3 numbers (Xenium Explorer's matrix), got shape {M.shape}.")
    if not np.allclose(M[2], [0, 0, 1], atol=1e-9):
        raise ValueError(f"{path}: the last row must be 0, 0, 1 (an affine), got {M[2].tolist()}.")
    if abs(np.linalg.det(M[:2, :2])) < 1e-12:
        raise ValueError(f"{path}: the matrix is singular.")
    return np.linalg.inv(np.diag([pixel_size, pixel_size, 1.0]) @ M)


def write_explorer_alignment(path, affine, *, pixel_size: float = EXPLORER_PIXEL_SIZE) -> Path:
    """Write our affine (Xenium µm -> image pixels) as a Xenium Explorer image-alignment matrix CSV.

    Xenium Explorer then places the image (e.g. the Visium full-resolution H&E) on the Xenium data; the file is
    ``inv(A)`` taken to Xenium morphology pixels of ``pixel_size`` µm, written with full precision.
    """
    A = np.asarray(affine, dtype=float)
    if A.shape != (3, 3):
        raise ValueError(f"affine must be 3 x 3, got shape {A.shape}.")
    M = np.diag([1.0 / pixel_size, 1.0 / pixel_size, 1.0]) @ np.linalg.inv(A)
    M[2] = [0.0, 0.0, 1.0]
    path = Path(path)
    pd.DataFrame(M).to_csv(path, header=False, index=False, float_format="%.17g")
    return path


def export_explorer(sdata, folder, *, key: str | None = None) -> dict[str, Path]:
    """Write the alignment of ``sdata`` in Xenium Explorer's formats, to load the Visium H&E in Xenium Explorer.

    ``xenium_explorer_alignment.csv``: the affine part of the stored transform ``key`` (default: the most recent)
    as Explorer's image-alignment matrix (Visium full-resolution pixels -> Xenium pixels of the dataset's pixel
    size); ``xenium_explorer_keypoints.csv``: the landmark pairs, if any were set.
    """
    from ._constants import UNS_XENIUM_KEY, XENIUM_TABLE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = sdata.tables.get(XENIUM_TABLE)
    pixel_size = EXPLORER_PIXEL_SIZE
    if table is not None:
        pixel_size = float(table.uns.get(UNS_XENIUM_KEY, {}).get("pixel_size", EXPLORER_PIXEL_SIZE))
    out = {"explorer_alignment": folder / "xenium_explorer_alignment.csv"}
    write_explorer_alignment(out["explorer_alignment"], sdata.align.get(key).affine, pixel_size=pixel_size)
    try:
        src, dst = sdata.align.landmarks()
    except (KeyError, ValueError):
        return out
    out["explorer_keypoints"] = write_explorer_keypoints(folder / "xenium_explorer_keypoints.csv", src, dst)
    return out
