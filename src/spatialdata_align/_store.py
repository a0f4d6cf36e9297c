"""How a :class:`~spatialdata_align.registration.Registration` lives inside a SpatialData object.

Layout (everything round-trips through ``sdata.write`` / ``spatialdata.read_zarr``):

* ``sdata.attrs["spatialdata_align"]["transforms"][key]``: JSON metadata — kind (``"affine"`` or
  ``"lddmm"``), source/target coordinate systems and elements, the ``(3, 3)`` affine, velocity grid
  node coordinates, parameters, energy trace, contrast model, package version, creation time.
* ``<key>_velocity``: the velocity field as an image element with channels
  ``v{t}x, v{t}y`` (``t = 0..nt-1``) on its grid, mapped to the *source* coordinate system (units:
  source units per unit time). It is exact: the transform is rebuilt from it bit for bit.
* ``<key>_match_weight``: the per-pixel posterior of the matched class on the target grid, mapped to
  the *target* coordinate system.
* ``sdata.attrs["spatialdata_align"]["landmarks"][key]``: which Points elements hold matched
  landmark pairs.

The affine part is also registered natively on every element of the source coordinate system
(``Sequence([<element -> source cs>, Affine])`` into the target coordinate system), so spatialdata
queries, ``spatialdata.transform`` and spatialdata-plot see the affine-aligned data with no code of
ours.
"""

from __future__ import annotations

import datetime as _dt
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Affine, Scale, Sequence, Translation, get_transformation, set_transformation

from ._constants import ATTRS_KEY
from .registration import Registration

VELOCITY_SUFFIX = "_velocity"
MATCH_WEIGHT_SUFFIX = "_match_weight"


def package_version() -> str:
    try:
        return version("spatialdata-align")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def root(sdata: SpatialData, create: bool = False) -> dict[str, Any]:
    """The package's metadata dict in ``sdata.attrs`` (created on demand)."""
    attrs = sdata.attrs
    if ATTRS_KEY not in attrs:
        if not create:
            return {"transforms": {}, "landmarks": {}}
        attrs[ATTRS_KEY] = {}
    node = attrs[ATTRS_KEY]
    node.setdefault("transforms", {})
    node.setdefault("landmarks", {})
    return node


def grid_transformation(x: np.ndarray, y: np.ndarray) -> Sequence:
    """Scale + translation placing pixel centres (intrinsic ``j + 0.5``) at ``x[j]``, ``y[i]``."""
    dx = float(x[1] - x[0]) if len(x) > 1 else 1.0
    dy = float(y[1] - y[0]) if len(y) > 1 else 1.0
    return Sequence(
        [
            Scale([dx, dy], axes=("x", "y")),
            Translation([float(x[0]) - dx / 2, float(y[0]) - dy / 2], axes=("x", "y")),
        ]
    )


def _floats(a) -> list:
    return np.asarray(a, dtype=np.float64).tolist()


def stored_keys(sdata: SpatialData) -> list[str]:
    return list(root(sdata)["transforms"].keys())


def get_entry(sdata: SpatialData, key: str) -> dict[str, Any]:
    transforms = root(sdata)["transforms"]
    if key not in transforms:
        known = sorted(transforms) or "none"
        raise KeyError(
            f"no stored transform {key!r}; stored transforms: {known}. Fit one with "
            "sdata.align.affine(...) or sdata.align.lddmm(...)."
        )
    return transforms[key]


def _own_elements(sdata: SpatialData) -> set[str]:
    out = set()
    for entry in root(sdata)["transforms"].values():
        for k in ("velocity_element", "match_weight_element"):
            if entry.get(k):
                out.add(entry[k])
    return out


def register_native_affine(
    sdata: SpatialData, matrix: np.ndarray, source_cs: str, target_cs: str, key: str
) -> list[str]:
    """Map every element of ``source_cs`` into ``target_cs`` through a native ``Affine``.

    Elements that already belong to ``target_cs`` natively (not through an earlier call of ours)
    are left alone. Returns the names of the elements updated.
    """
    own = _own_elements(sdata)
    previously = set()
    for entry in root(sdata)["transforms"].values():
        if entry.get("target_cs") == target_cs:
            previously.update(entry.get("native_elements", []))
    aff = Affine(np.asarray(matrix, dtype=np.float64), input_axes=("x", "y"), output_axes=("x", "y"))
    updated = []
    for _, name, el in sdata.gen_spatial_elements():
        if name in own:
            continue
        transforms = get_transformation(el, get_all=True)
        if source_cs not in transforms:
            continue
        if target_cs in transforms and name not in previously:
            continue
        set_transformation(el, Sequence([transforms[source_cs], aff]), to_coordinate_system=target_cs)
        updated.append(name)
    return updated


def store_registration(
    sdata: SpatialData,
    reg: Registration,
    *,
    key: str,
    kind: str,
    source_cs: str,
    target_cs: str,
    source_element: str | None,
    target_element: str | None,
    extra: dict[str, Any] | None = None,
    native: bool = True,
) -> dict[str, Any]:
    """Write ``reg`` into ``sdata`` under ``key`` (overwriting an earlier entry of that key)."""
    if key in root(sdata)["transforms"]:
        remove_registration(sdata, key)
    d = reg.to_dict()
    entry: dict[str, Any] = {
        "kind": kind,
        "source_cs": source_cs,
        "target_cs": target_cs,
        "source_element": source_element,
        "target_element": target_element,
        "affine": _floats(d["affine"]),
        "source_units": d["source_units"],
        "target_units": d["target_units"],
        "source_extent": d["source_extent"],
        "target_extent": d["target_extent"],
        "params": d["params"],
        "energy": {k: np.asarray(v).tolist() for k, v in d["energy"].items()},
        "contrast": {k: _floats(v) for k, v in d["contrast"].items()},
        "package_version": package_version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "velocity_element": None,
        "match_weight_element": None,
        "applied": {},
    }
    if reg.velocity_values is not None and reg.has_velocity:
        v = reg.velocity_values
        nt = v.shape[0]
        name = f"{key}{VELOCITY_SUFFIX}"
        channels = [f"v{t}{ax}" for t in range(nt) for ax in "xy"]
        sdata.images[name] = Image2DModel.parse(
            v.reshape(nt * 2, *v.shape[2:]),
            dims=("c", "y", "x"),
            c_coords=channels,
            transformations={source_cs: grid_transformation(reg.xv, reg.yv)},
        )
        entry.update(velocity_element=name, nt=int(nt), xv=_floats(reg.xv), yv=_floats(reg.yv))
    if reg.match_weight is not None:
        name = f"{key}{MATCH_WEIGHT_SUFFIX}"
        mw = reg.match_weight
        x, y = mw.coords["x"].values, mw.coords["y"].values
        sdata.images[name] = Image2DModel.parse(
            mw.values[None],
            dims=("c", "y", "x"),
            c_coords=["match_weight"],
            transformations={target_cs: grid_transformation(x, y)},
        )
        entry.update(match_weight_element=name, mw_x=_floats(x), mw_y=_floats(y))
    if extra:
        entry.update(extra)
    node = root(sdata, create=True)
    node["transforms"][key] = entry
    if native:
        entry["native_elements"] = register_native_affine(sdata, reg.affine, source_cs, target_cs, key)
    node["default"] = key
    return entry


def load_registration(sdata: SpatialData, key: str) -> Registration:
    """Rebuild the :class:`Registration` stored under ``key`` (bit-identical to the one stored)."""
    entry = get_entry(sdata, key)
    vel = None
    if entry.get("velocity_element"):
        name = entry["velocity_element"]
        if name not in sdata:
            raise KeyError(f"transform {key!r} needs its velocity element {name!r}, which is missing.")
        arr = np.asarray(sdata[name].values, dtype=np.float64)
        nt = int(entry["nt"])
        vel = arr.reshape(nt, 2, *arr.shape[1:])
    match_weight = None
    if entry.get("match_weight_element") and entry["match_weight_element"] in sdata:
        arr = np.asarray(sdata[entry["match_weight_element"]].values, dtype=np.float64)[0]
        match_weight = {"values": arr, "x": np.asarray(entry["mw_x"]), "y": np.asarray(entry["mw_y"])}
    energy = {k: np.asarray(v) for k, v in entry.get("energy", {}).items()}
    d = {
        "affine": np.asarray(entry["affine"]),
        "velocity": vel,
        "xv": None if vel is None else np.asarray(entry["xv"]),
        "yv": None if vel is None else np.asarray(entry["yv"]),
        "energy": energy,
        "params": entry.get("params", {}),
        "source_units": entry.get("source_units", "um"),
        "target_units": entry.get("target_units", "px"),
        "source_extent": entry.get("source_extent"),
        "target_extent": entry.get("target_extent"),
        "contrast": {k: np.asarray(v) for k, v in entry.get("contrast", {}).items()},
        "match_weight": match_weight,
    }
    return Registration.from_dict(d)


def remove_registration(sdata: SpatialData, key: str) -> None:
    """Delete a stored transform, its field elements and the native affines it registered."""
    entry = get_entry(sdata, key)
    for k in ("velocity_element", "match_weight_element"):
        name = entry.get(k)
        if name and name in sdata:
            del sdata[name]
    for name in entry.get("native_elements", []):
        if name in sdata:
            el = sdata[name]
            transforms = get_transformation(el, get_all=True)
            if entry["target_cs"] in transforms and len(transforms) > 1:
                from spatialdata.transformations import remove_transformation

                remove_transformation(el, entry["target_cs"])
    node = root(sdata, create=True)
    del node["transforms"][key]
    if node.get("default") == key:
        node["default"] = next(reversed(node["transforms"]), None) if node["transforms"] else None


def transforms_table(sdata: SpatialData) -> pd.DataFrame:
    rows = []
    for key, e in root(sdata)["transforms"].items():
        rows.append(
            {
                "key": key,
                "kind": e["kind"],
                "source_cs": e["source_cs"],
                "target_cs": e["target_cs"],
                "source_element": e.get("source_element"),
                "target_element": e.get("target_element"),
                "iterations": len(next(iter(e.get("energy", {}).values()), [])),
                "velocity_element": e.get("velocity_element"),
                "applied": ", ".join(e.get("applied", {}).values()),
                "created": e.get("created"),
            }
        )
    cols = [
        "key",
        "kind",
        "source_cs",
        "target_cs",
        "source_element",
        "target_element",
        "iterations",
        "velocity_element",
        "applied",
        "created",
    ]
    return pd.DataFrame(rows, columns=cols).set_index("key")
