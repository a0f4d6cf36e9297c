"""How a registration lives inside a SpatialData object.

Layout (everything round-trips through ``sdata.write`` / ``spatialdata.read_zarr``):

* ``sdata.attrs["spatialdata_align"]`` (JSON): per key in ``"transforms"`` the metadata (kind, source and
  target coordinate systems and elements, the ``(3, 3)`` affine, fit parameters, energy trace, contrast,
  provenance) and ``"ngff"``, the transformation as an OME-NGFF 0.6 object (:mod:`spatialdata_align.ngff`):
  an ``affine``, or for a non-linear map a ``bijection`` of two sequences (displacements + affine).
  Also ``"landmarks"`` (which Points elements hold which landmark set) and ``"default"`` (latest key).
* the table ``spatialdata_align_transforms`` (:data:`TABLE`): an AnnData with no rows that annotates no
  element; its ``uns["spatialdata_align"][key]`` holds the two displacement field arrays (``forward``,
  ``inverse``: ``(2, ny, nx)`` float64, vector axis ``(dy, dx)``, exactly what the ``displacements`` of
  ``"ngff"`` point at), the match-weight image of an LDDMM fit, a random ``id`` and a JSON copy of the key's
  metadata.

Why this layout: spatialdata operations treat ``attrs`` and tables very differently from elements.
Queries and filters pass ``attrs`` on and crop or drop elements by coordinate system; a field stored as
an element of a queried coordinate system gets cropped, one stored in no queried system gets dropped
while ``attrs`` still lists it. A table annotating nothing is never cropped: an operation keeps it whole
(``write``/``read``, ``concatenate`` (renamed like the elements), ``deepcopy``, ``sda.tl.subset_shared``,
``subset``/``filter_by_coordinate_system`` with ``filter_tables=False``) or drops it whole. The metadata
names the table and the ``id`` of the arrays it expects, so:

* a transform whose arrays are gone (or replaced) is no longer listed, with a warning saying why
  (:func:`resolve`);
* a table whose metadata is gone (``spatialdata.concatenate`` drops ``attrs``) brings its transforms back
  from its JSON copy, renamed the way ``concatenate`` renamed the elements (``key-<suffix>``, coordinate
  systems and elements with the same suffix when they were renamed).

Nothing here modifies an object in place: every write builds a new ``attrs`` dict, a new table and new
(shallow) copies of the elements whose transformations change (copy-on-write), so a derived object never
changes the object it came from.

The affine part is also registered natively on every element of the source coordinate system
(``Sequence([<element -> source cs>, Affine])`` into the target coordinate system), so spatialdata
queries, ``spatialdata.transform`` and spatialdata-plot see the affine-aligned data with no code of ours.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import uuid
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import TableModel
from spatialdata.transformations import Affine, Scale, Sequence, Translation, get_transformation

from . import ngff
from ._constants import ATTRS_KEY
from ._elements import apply_affine, element_kind, image_levels, to_cs_matrix, with_transformations
from .registration import DisplacementField, Registration

#: the table carrying the field arrays of every stored transform
TABLE = "spatialdata_align_transforms"
#: uns key of the carrier table (and of the records in it)
UNS_KEY = ATTRS_KEY
_MARK = "spatialdata_align.transforms/1"


class TransformDroppedWarning(UserWarning):
    """A stored transform is no longer usable (an operation dropped or replaced its field arrays)."""


class StaleAlignedCopyWarning(UserWarning):
    """A transform was refitted under a key whose aligned copies (``sdata.align.apply``) were made before the refit."""


def package_version() -> str:
    try:
        return version("spatialdata-align")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# ------------------------------------------------------------------------------------------ attrs (COW)
def root(sdata: SpatialData) -> dict[str, Any]:
    """A *copy* of the package's metadata in ``sdata.attrs`` (never the shared dict itself)."""
    node = copy.deepcopy(sdata.attrs.get(ATTRS_KEY) or {})
    node.setdefault("transforms", {})
    node.setdefault("landmarks", {})
    return node


def write_root(sdata: SpatialData, node: dict[str, Any]) -> None:
    """Replace the package's metadata: a new ``attrs`` dict, so objects sharing the old one are untouched."""
    sdata.attrs = {**sdata.attrs, ATTRS_KEY: copy.deepcopy(node)}


def set_landmark_set(sdata: SpatialData, key: str, info: dict[str, Any]) -> None:
    node = root(sdata)
    node["landmarks"][key] = dict(info)
    write_root(sdata, node)


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


# ---------------------------------------------------------------------------------------- the carrier
def _records(table: ad.AnnData) -> dict[str, Any] | None:
    node = table.uns.get(UNS_KEY)
    if not isinstance(node, dict) or node.get("format") != _MARK:
        return None
    recs = node.get("records")
    return recs if isinstance(recs, dict) else {}


def _carrier(records: dict[str, Any]) -> ad.AnnData:
    """A new carrier table (no rows, annotates nothing) holding ``records``."""
    obs = pd.DataFrame(
        {"region": pd.Categorical([], categories=[]), "instance_id": np.zeros(0, dtype=np.int64)},
        index=pd.Index([], dtype=str),
    )
    table = ad.AnnData(obs=obs, uns={UNS_KEY: {"format": _MARK, "records": dict(records)}})
    return TableModel.parse(table, region=[], region_key="region", instance_key="instance_id")


def _field_path(table: str, key: str, direction: str) -> str:
    return f"tables/{table}/uns/{UNS_KEY}/records/{key}/{direction}"


def _element_path(sdata: SpatialData, name: str | None) -> str | None:
    if not name or name not in sdata:
        return None
    folder = {"image": "images", "labels": "labels", "points": "points", "shapes": "shapes", "table": "tables"}
    return f"{folder[element_kind(sdata, name)]}/{name}"


def ngff_of(sdata: SpatialData, entry: dict[str, Any], key: str, table: str | None) -> dict[str, Any]:
    """The OME-NGFF transformation object of ``entry`` with the field paths of this store."""
    fields = entry.get("fields")
    return ngff.transformation(
        entry["affine"],
        source_cs=entry["source_cs"],
        target_cs=entry["target_cs"],
        forward_path=_field_path(table, key, "forward") if fields else None,
        inverse_path=_field_path(table, key, "inverse") if fields else None,
        name=key,
        source_path=_element_path(sdata, entry.get("source_element")),
        target_path=_element_path(sdata, entry.get("target_element")),
    )


@dataclass
class Resolved:
    """A usable stored transform: its metadata and, for non-linear ones, its carrier record."""

    key: str
    entry: dict[str, Any]
    table: str | None
    record: dict[str, Any] | None
    recovered: bool = False


def _check_record(entry: dict[str, Any], rec: Any) -> str | None:
    """Why ``rec`` does not hold ``entry``'s fields (``None`` when it does)."""
    fields = entry["fields"]
    if not isinstance(rec, dict):
        return "its field arrays are missing"
    if str(rec.get("id")) != fields["id"]:
        return "its field arrays were replaced by others"
    for d in ("forward", "inverse"):
        arr = rec.get(d)
        if arr is None or tuple(np.shape(arr)) != tuple(fields[d]["shape"]):
            return f"its {d} field array is missing or has the wrong shape"
    return None


def _hidden_message(key: str, table: str, why: str) -> str:
    return (
        f"stored transform {key!r} is not available in this SpatialData: {why} (table {table!r}). An operation "
        "dropped them: subset/filter_by_coordinate_system/bounding_box_query/polygon_query drop tables that "
        "annotate no element unless called with filter_tables=False / filter_table=False (or, for subset, with "
        f"{table!r} among the names). The transform is left out of sdata.align; use the object it came from, "
        "or sdata.align.import_ngff(...) of an exported copy."
    )


def _rename(name: str | None, suffix: str, present) -> str | None:
    if name is None or not suffix:
        return name
    return f"{name}{suffix}" if f"{name}{suffix}" in present else name


def resolve(sdata: SpatialData, *, warn: bool = True) -> dict[str, Resolved]:
    """Every usable stored transform, by key (see the module docstring for the rules)."""
    node = sdata.attrs.get(ATTRS_KEY) or {}
    out: dict[str, Resolved] = {}
    used: set[str] = set()
    for key, entry in (node.get("transforms") or {}).items():
        fields = entry.get("fields")
        if not fields:
            out[key] = Resolved(key, copy.deepcopy(entry), entry.get("table"), None)
            used.add(str(entry.get("id")))
            continue
        tname = fields["table"]
        table = sdata.tables.get(tname) if tname in sdata.tables else None
        recs = _records(table) if table is not None else None
        why = "its field arrays were dropped" if recs is None else _check_record(entry, recs.get(key))
        if why is not None:
            if warn:
                warnings.warn(_hidden_message(key, tname, why), TransformDroppedWarning, stacklevel=3)
            continue
        out[key] = Resolved(key, copy.deepcopy(entry), tname, recs[key])
        used.add(fields["id"])
    # tables whose metadata is gone (spatialdata.concatenate drops attrs): recover their transforms
    present = {name for _, name, _ in sdata.gen_elements()}
    systems = set(sdata.coordinate_systems)
    for tname, table in sdata.tables.items():
        if not tname.startswith(TABLE):
            continue
        recs = _records(table)
        if not recs:
            continue
        suffix = tname[len(TABLE) :]
        for key, rec in recs.items():
            if str(rec.get("id")) in used:
                continue
            entry = json.loads(rec["entry"])
            fields = entry.get("fields")
            if fields and _check_record(entry, rec) is not None:
                continue
            new_key = f"{key}{suffix}"
            if new_key in out:
                if warn:
                    warnings.warn(
                        f"table {tname!r} holds transform {key!r}, but {new_key!r} is already stored; it is left out.",
                        TransformDroppedWarning,
                        stacklevel=3,
                    )
                continue
            for k in ("source_cs", "target_cs"):
                entry[k] = _rename(entry[k], suffix, systems)
            for k in ("source_element", "target_element"):
                entry[k] = _rename(entry.get(k), suffix, present)
            entry["native_elements"] = [_rename(n, suffix, present) for n in entry.get("native_elements", [])]
            entry["applied"] = {
                _rename(a, suffix, present): _rename(b, suffix, present) for a, b in entry.get("applied", {}).items()
            }
            if fields:
                fields["table"] = tname
            entry["ngff"] = ngff_of(sdata, entry, key, tname if fields else None)
            entry["table"] = tname
            out[new_key] = Resolved(key, entry, tname, rec if fields else None, recovered=True)
    return out


def stored_keys(sdata: SpatialData) -> list[str]:
    return list(resolve(sdata))


def default_key(sdata: SpatialData) -> str | None:
    """The most recently stored usable key (``None`` when none is, or when it is not known: :func:`no_default`)."""
    return _default(sdata)[0]


def no_default(sdata: SpatialData) -> str | None:
    """Why ``sdata`` has no default transform (``None`` when it has one)."""
    return _default(sdata)[1]


def _default(sdata: SpatialData) -> tuple[str | None, str | None]:
    usable = resolve(sdata, warn=False)
    default = (sdata.attrs.get(ATTRS_KEY) or {}).get("default")
    if default in usable:
        return default, None
    if not usable:
        return None, "no transform is stored yet: fit one with sdata.align.affine(...) or sdata.align.lddmm(...)."
    keys = sorted(usable)
    if default is not None:  # never fall back silently on an older (e.g. affine-only) transform
        return None, (
            f"the default transform {default!r} (the most recently fitted) is not available in this SpatialData: "
            "an operation dropped its field arrays (see the TransformDroppedWarning). Pass key= to use another "
            f"one ({keys}), or call the operation with filter_tables=False / filter_table=False."
        )
    tables = {r.table for r in usable.values() if r.recovered}
    if len(tables) > 1:  # spatialdata.concatenate dropped attrs: several objects' transforms, none the default
        return None, (
            f"this SpatialData holds the transforms of several objects (tables {sorted(tables)}, e.g. after "
            f"spatialdata.concatenate) and none is the default: pass key= (one of {keys})."
        )
    # attrs lost (a SpatialData rebuilt from its elements): the most recently fitted, by its creation time. The
    # records' order in the table is not that: recording an aligned copy rewrites (and moves) a record
    order = {k: i for i, k in enumerate(usable)}
    return max(usable, key=lambda k: (str(usable[k].entry.get("created") or ""), order[k])), None


def _get(sdata: SpatialData, key: str) -> Resolved:
    usable = resolve(sdata)
    if key not in usable:
        raise KeyError(
            f"no stored transform {key!r}; stored transforms: {sorted(usable) or 'none'}. Fit one with "
            "sdata.align.affine(...) or sdata.align.lddmm(...)."
        )
    return usable[key]


def get_entry(sdata: SpatialData, key: str) -> dict[str, Any]:
    """The metadata of stored transform ``key`` (a copy)."""
    return _get(sdata, key).entry


# ------------------------------------------------------------------------------------------ writing
def _section_extent(sdata: SpatialData, cs: str, skip: set[str]) -> tuple[float, float, float, float] | None:
    """Bounding box ``(xmin, xmax, ymin, ymax)`` of the images, labels and shapes of ``cs``.

    Points are left out (reading every transcript only to bound them would cost a pass over the data; they
    lie among the cells, and a field keeps its edge values beyond its grid).
    """
    boxes = []
    for kind, name, el in sdata.gen_spatial_elements():
        if name in skip or kind == "points" or cs not in get_transformation(el, get_all=True):
            continue
        if kind == "shapes" and len(el) == 0:
            continue
        boxes.append(_box_in_cs(kind, el, cs))
    if not boxes:
        return None
    b = np.asarray(boxes, dtype=np.float64)
    return float(b[:, 0].min()), float(b[:, 1].max()), float(b[:, 2].min()), float(b[:, 3].max())


def _box_in_cs(kind: str, el, cs: str) -> tuple[float, float, float, float]:
    """The extent ``(xmin, xmax, ymin, ymax)`` in ``cs`` of the image, labels or shapes element ``el``.

    Circles with their radii (a circle maps to an ellipse: exact, where :func:`spatialdata.get_extent` approximates
    it under a skew), polygons by their vertices, images by their pixel edges; from vectorised coordinates, a few
    ms on the demo where ``get_extent`` took 0.7-1.5 s per fit (centroids of 20k circles through geopandas; the
    image), measured in one session.
    """
    import shapely

    m = to_cs_matrix(el, cs)  # (every spatialdata transformation is an affine)
    half = np.zeros(2)
    if kind == "shapes" and "radius" in el.columns:  # circles: a circle of radius r spans r * |row i of m| along i
        xy = shapely.get_coordinates(el.geometry.to_numpy())
        r = el["radius"].to_numpy(dtype=np.float64)
        half = r[:, None] * np.linalg.norm(m[:2, :2], axis=1)[None, :]
    elif kind == "shapes":  # polygons: their vertices
        xy = shapely.get_coordinates(el.geometry.to_numpy())
    else:  # images and labels: pixel (i, j) covers [j, j + 1) x [i, i + 1)
        arr = image_levels(el)[0]
        w, h = float(arr.sizes["x"]), float(arr.sizes["y"])
        xy = np.array([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h]])
    mapped = apply_affine(m, xy)
    lo, hi = (mapped - half).min(axis=0), (mapped + half).max(axis=0)
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _union(*extents):
    ext = [e for e in extents if e is not None]
    if not ext:
        return None
    a = np.asarray(ext, dtype=np.float64)
    return float(a[:, 0].min()), float(a[:, 1].max()), float(a[:, 2].min()), float(a[:, 3].max())


def own_elements(sdata: SpatialData) -> set[str]:
    """Elements this package keeps for itself (landmark Points) and its carrier tables."""
    node = sdata.attrs.get(ATTRS_KEY) or {}
    out = {t for t in sdata.tables if t.startswith(TABLE) and _records(sdata.tables[t]) is not None}
    for e in (node.get("landmarks") or {}).values():
        for k in ("source_element", "target_element"):
            if e.get(k):
                out.add(e[k])
    return out


def sampled(
    sdata: SpatialData, reg: Registration, source_cs: str, target_cs: str, spacing: float | None = None
) -> Registration:
    """``reg`` in its stored form: displacement fields on grids covering both sections of ``sdata``."""
    if reg.is_affine or reg.is_sampled:  # the stored form is canonical: never resampled
        return reg
    skip = own_elements(sdata)
    src = _union(reg.source_extent, _section_extent(sdata, source_cs, skip))
    tgt = _union(reg.target_extent, _section_extent(sdata, target_cs, skip))
    return reg.to_displacement(spacing=spacing, source_extent=src, target_extent=tgt)


def _replace(sdata: SpatialData, name: str, element) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already exists.*")
        sdata[name] = element


def register_native_affine(
    sdata: SpatialData, matrix: np.ndarray, source_cs: str, target_cs: str, previously: set[str]
) -> list[str]:
    """Map every element of ``source_cs`` into ``target_cs`` through a native ``Affine`` (copy-on-write).

    Elements that already belong to ``target_cs`` natively (not through an earlier call of ours, listed in
    ``previously``) are left alone. Each updated element is replaced by a shallow copy carrying the new
    transformation. Returns the names of the elements updated.
    """
    own = own_elements(sdata)
    aff = Affine(np.asarray(matrix, dtype=np.float64), input_axes=("x", "y"), output_axes=("x", "y"))
    updated = []
    for _, name, el in list(sdata.gen_spatial_elements()):
        if name in own:
            continue
        transforms = get_transformation(el, get_all=True)
        if source_cs not in transforms:
            continue
        if target_cs in transforms and name not in previously:
            continue
        new = dict(transforms)
        new[target_cs] = Sequence([transforms[source_cs], aff])
        _replace(sdata, name, with_transformations(el, new))
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
    spacing: float | None = None,
) -> tuple[dict[str, Any], Registration]:
    """Write ``reg`` into ``sdata`` under ``key`` (replacing an earlier entry of that key).

    A velocity-based registration is stored in sampled form (:func:`sampled`). Returns the entry and the
    registration as stored (what :func:`load_registration` rebuilds).
    """
    if not key or "/" in key:
        raise ValueError(f"a transform key is a non-empty string without '/', got {key!r}.")
    previously: set[str] = set()
    node = root(sdata)
    for e in node["transforms"].values():
        if e.get("target_cs") == target_cs:
            previously.update(e.get("native_elements", []))
    stale: dict[str, str] = {}
    if key in node["transforms"]:  # aligned copies made with the transform this one replaces (element -> copy)
        stale = {e: c for e, c in node["transforms"][key].get("applied", {}).items() if c in sdata}
    if key in resolve(sdata, warn=False) or key in node["transforms"]:
        remove_registration(sdata, key, missing_ok=True)
    stored = sampled(sdata, reg, source_cs, target_cs, spacing)
    d = stored.to_dict()
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
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds"),  # orders fits made in one second
        "applied": {},
        "native_elements": [],
        "fields": None,
    }
    if extra:
        entry.update(extra)
    record: dict[str, Any] = {"id": uuid.uuid4().hex}
    entry["id"] = record["id"]
    entry["table"] = TABLE
    if stored.is_sampled:
        fields: dict[str, Any] = {"table": TABLE, "id": record["id"], "spacing": float(stored.forward_field.dx)}
        for direction, f in (("forward", stored.forward_field), ("inverse", stored.inverse_field)):
            arr = ngff.field_array(f)
            record[direction] = arr
            fields[direction] = {
                "shape": list(arr.shape),
                "axes": ["c", "y", "x"],
                "scale": [1.0, f.dy, f.dx],
                "translation": [0.0, f.y0, f.x0],
                "input_cs": source_cs if direction == "forward" else ngff.deformed_cs(source_cs),
            }
        entry["fields"] = fields
    if stored.match_weight is not None:
        mw = stored.match_weight
        record["match_weight"] = np.asarray(mw.values, dtype=np.float64)
        record["match_weight_x"] = np.asarray(mw.coords["x"].values, dtype=np.float64)
        record["match_weight_y"] = np.asarray(mw.coords["y"].values, dtype=np.float64)
    if native:
        entry["native_elements"] = register_native_affine(sdata, stored.affine, source_cs, target_cs, previously)
    entry["ngff"] = ngff_of(sdata, entry, key, TABLE)
    record["entry"] = json.dumps(entry)
    sync_global(sdata)
    # copy-on-write: a new carrier table and a new attrs dict
    old = sdata.tables.get(TABLE) if TABLE in sdata.tables else None
    records = dict(_records(old) or {}) if old is not None else {}
    records[key] = record
    sdata.tables[TABLE] = _carrier(records)
    node = root(sdata)
    node["transforms"][key] = entry
    node["default"] = key
    write_root(sdata, node)
    if stale:
        copies = ", ".join(repr(c) for c in stale.values())
        # the spatial elements: applying one also copies the tables annotating it
        spatial = [e for e in stale if e in sdata and e not in sdata.tables]
        again = "; ".join(f"sdata.align.apply({e!r}, key={key!r})" for e in spatial)
        warnings.warn(
            f"{copies} {'was' if len(stale) == 1 else 'were'} made with the transform {key!r} that this fit replaces "
            f"and still {'holds' if len(stale) == 1 else 'hold'} the previous alignment (the sda.tl functions read "
            f"the aligned copies); update with {again or 'sdata.align.apply(...)'}.",
            StaleAlignedCopyWarning,
            stacklevel=3,
        )
    return copy.deepcopy(entry), load_registration(sdata, key)


def record_applied(sdata: SpatialData, key: str, pairs: dict[str, str]) -> None:
    """Note in ``key``'s metadata which aligned copies were made from it (copy-on-write)."""
    node = root(sdata)
    if key in node["transforms"]:
        node["transforms"][key].setdefault("applied", {}).update(pairs)
        write_root(sdata, node)


def load_registration(sdata: SpatialData, key: str) -> Registration:
    """Rebuild the registration stored under ``key`` (its sampled form: what every reader computes)."""
    r = _get(sdata, key)
    entry, rec = r.entry, r.record
    fwd = inv = None
    if entry.get("fields"):
        f = entry["fields"]
        fwd = ngff.field_from_array(rec["forward"], f["forward"]["scale"], f["forward"]["translation"])
        inv = ngff.field_from_array(rec["inverse"], f["inverse"]["scale"], f["inverse"]["translation"])
    match_weight = None
    if rec is not None and rec.get("match_weight") is not None:
        match_weight = {
            "values": np.asarray(rec["match_weight"], dtype=np.float64),
            "x": np.asarray(rec["match_weight_x"], dtype=np.float64),
            "y": np.asarray(rec["match_weight_y"], dtype=np.float64),
        }
    d = {
        "affine": np.asarray(entry["affine"]),
        "energy": {k: np.asarray(v) for k, v in entry.get("energy", {}).items()},
        "params": entry.get("params", {}),
        "source_units": entry.get("source_units", "um"),
        "target_units": entry.get("target_units", "px"),
        "source_extent": entry.get("source_extent"),
        "target_extent": entry.get("target_extent"),
        "contrast": {k: np.asarray(v) for k, v in entry.get("contrast", {}).items()},
        "match_weight": match_weight,
        "forward_field": None if fwd is None else fwd.to_dict(),
        "inverse_field": None if inv is None else inv.to_dict(),
    }
    return Registration.from_dict(d)


def remove_registration(sdata: SpatialData, key: str, *, missing_ok: bool = False) -> None:
    """Delete a stored transform: its metadata, its field arrays and the native affines it registered.

    Copy-on-write: elements losing their native affine are replaced by shallow copies.
    """
    usable = resolve(sdata, warn=False)
    node = root(sdata)
    if key not in usable and key not in node["transforms"]:
        if missing_ok:
            return
        raise KeyError(f"no stored transform {key!r}; stored transforms: {sorted(usable) or 'none'}.")
    entry = usable[key].entry if key in usable else node["transforms"][key]
    for name in entry.get("native_elements", []):
        if name in sdata:
            transforms = get_transformation(sdata[name], get_all=True)
            if entry["target_cs"] in transforms and len(transforms) > 1:
                new = {cs: t for cs, t in transforms.items() if cs != entry["target_cs"]}
                _replace(sdata, name, with_transformations(sdata[name], new))
    r = usable.get(key)
    tname = r.table if r is not None else entry.get("table", TABLE)
    orig_key = r.key if r is not None else key
    if tname and tname in sdata.tables:
        records = dict(_records(sdata.tables[tname]) or {})
        if orig_key in records:
            del records[orig_key]
            if records:
                sdata.tables[tname] = _carrier(records)
            else:
                del sdata.tables[tname]
    node["transforms"].pop(key, None)
    if node.get("default") == key:
        node["default"] = next(reversed(node["transforms"]), None) if node["transforms"] else None
    write_root(sdata, node)
    if entry.get("target_cs") == node.get("global"):  # the affine's "global" copies go with it
        for name in entry.get("native_elements", []):
            if name in sdata:
                t = get_transformation(sdata[name], get_all=True)
                if "global" in t and node["global"] not in t and len(t) > 1:
                    _replace(
                        sdata, name, with_transformations(sdata[name], {c: v for c, v in t.items() if c != "global"})
                    )


def _same(a, b) -> bool:
    xy = ("x", "y")
    return np.allclose(a.to_affine_matrix(xy, xy), b.to_affine_matrix(xy, xy), atol=0, rtol=0)


def set_global(sdata: SpatialData, cs: str | None) -> list[str]:
    """Expose coordinate system ``cs`` also as ``"global"`` on every element mapped to it (copy-on-write).

    ``None`` withdraws it (the ``"global"`` transformations that mirror the exposed system are removed).
    Returns the names of the elements changed. Kept in step by later writes of ``sdata.align``.
    """
    node = root(sdata)
    old = node.get("global")
    changed = []
    for _, name, el in list(sdata.gen_spatial_elements()):
        t = get_transformation(el, get_all=True)
        new = dict(t)
        if cs is not None and cs in t:
            if "global" in t and _same(t["global"], t[cs]):
                continue
            new["global"] = t[cs]
        elif cs is None and old is not None and "global" in t and old in t and _same(t["global"], t[old]):
            if len(t) == 1:
                continue
            del new["global"]
        else:
            continue
        _replace(sdata, name, with_transformations(el, new))
        changed.append(name)
    node["global"] = cs
    write_root(sdata, node)
    return changed


def sync_global(sdata: SpatialData) -> None:
    """Re-apply :func:`set_global` after a write (no-op when no system is exposed as ``"global"``)."""
    cs = (sdata.attrs.get(ATTRS_KEY) or {}).get("global")
    if cs is not None:
        set_global(sdata, cs)


def transforms_table(sdata: SpatialData) -> pd.DataFrame:
    rows = []
    for key, r in resolve(sdata).items():
        e = r.entry
        fields = e.get("fields") or {}
        rows.append(
            {
                "key": key,
                "kind": e["kind"],
                "source_cs": e["source_cs"],
                "target_cs": e["target_cs"],
                "source_element": e.get("source_element"),
                "target_element": e.get("target_element"),
                "iterations": len(next(iter(e.get("energy", {}).values()), [])),
                "field_spacing": fields.get("spacing"),
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
        "field_spacing",
        "applied",
        "created",
    ]
    return pd.DataFrame(rows, columns=cols).set_index("key")


def fields_of(sdata: SpatialData, key: str) -> dict[str, DisplacementField]:
    """The two displacement fields of a non-linear stored transform."""
    reg = load_registration(sdata, key)
    if not reg.is_sampled:
        raise ValueError(f"transform {key!r} is an affine; it has no displacement fields.")
    return {"forward": reg.forward_field, "inverse": reg.inverse_field}
