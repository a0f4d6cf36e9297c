"""Reading matched landmark pairs from files (CSV, or STalign-style ``.npy`` dicts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CSV_COLUMNS = ("source_x", "source_y", "target_x", "target_y")


def read_landmarks(path, target_path=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read landmark pairs.

    Parameters
    ----------
    path
        A CSV file with columns ``source_x, source_y, target_x, target_y`` (optional ``name``),
        one row per pair; or, with ``target_path``, a ``.npy`` file holding a dict of named source
        points (``{name: [[x, y], ...]}``, the STalign format).
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
                f"{path}: an STalign-style .npy landmark dict holds one side only; pass the target .npy too."
            )
        return _read_csv(path)
    return _read_npy_pair(path, Path(target_path))


def _read_csv(path: Path):
    try:
        df = pd.read_csv(path)
    except Exception as err:  # pandas raises many types for malformed files
        raise ValueError(f"{path}: cannot be read as CSV ({err}).") from err
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: landmark CSV lacks columns {missing}; expected {list(CSV_COLUMNS)} (got {list(df.columns)})."
        )
    if len(df) == 0:
        raise ValueError(f"{path}: no landmark rows.")
    vals = df[list(CSV_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(vals).all(axis=1)
    if bad.any():
        rows = (np.flatnonzero(bad) + 2).tolist()[:5]  # +2: header line and 1-based
        raise ValueError(f"{path}: non-numeric or missing coordinates on line(s) {rows}.")
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
