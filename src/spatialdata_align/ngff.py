"""Registrations as OME-NGFF 0.6 coordinate transformations (``displacements``, ``sequence``, ``bijection``).

A sampled :class:`~spatialdata_align.registration.Registration` (:meth:`~.Registration.to_displacement`)
is written as one ``bijection`` from the source to the target coordinate system::

    bijection(input=<source>, output=<target>)
      forward: sequence[ displacements(<source> -> <source>_deformed),  affine(<source>_deformed -> <target>) ]
      inverse: sequence[ affine^-1(<target> -> <source>_deformed),   displacements(<source>_deformed -> <source>) ]

so ``forward(x) = A (x + d_fwd(x))`` and ``inverse(y) = x' + d_inv(x')`` with ``x' = A^-1 y``. An
affine-only registration is a single ``affine``. Axes are ordered ``(y, x)`` as OME-NGFF orders spatial
axes (the package's public API stays ``(x, y)``): affine matrices are ``2 x 3`` in that order and the
vector axis of a field holds ``(dy, dx)``.

Two places hold this metadata:

* :func:`write_transform` / :func:`read_transform`: a standalone OME-Zarr 0.6 container (``scene``
  metadata at its root, each field a multiscale group under ``coordinateTransformations/``), for other
  tools and for other SpatialData objects of the same sections (``sdata.align.export_ngff`` /
  ``import_ngff``).
* Inside a SpatialData object (``sdata.attrs["spatialdata_align"]``, see
  :mod:`spatialdata_align._store`) the same JSON names the field arrays where spatialdata writes them.

The version written is :data:`NGFF_VERSION`, the newest version whose JSON schemas were in reach when this
was written (``ome/ngff-spec`` at commit 277f209, tagged ``0.6rc0``; the released 0.6 changes no field
used here). ``tests/data/ngff/`` vendors those schemas and the tests validate everything written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .registration import DisplacementField, Registration

#: ``ome.version`` written in standalone containers
NGFF_VERSION = "0.6rc0"
#: zarr group (relative to a container's root) holding the field multiscales, as OME-NGFF suggests
FIELDS_GROUP = "coordinateTransformations"
#: OME-NGFF units of this package's unit names (units without an UDUNITS-2 name are left out)
UNITS = {"um": "micrometer", "µm": "micrometer", "micrometer": "micrometer", "mm": "millimeter", "nm": "nanometer"}

_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------- JSON pieces
def affine_yx(matrix) -> list[list[float]]:
    """A ``(3, 3)`` ``(x, y)`` homogeneous affine as OME-NGFF's ``2 x 3`` ``(y, x)`` matrix."""
    m = _SWAP @ np.asarray(matrix, dtype=np.float64) @ _SWAP
    return m[:2].tolist()


def affine_from_yx(rows) -> np.ndarray:
    """Inverse of :func:`affine_yx`: the ``(3, 3)`` ``(x, y)`` homogeneous matrix."""
    m = np.vstack([np.asarray(rows, dtype=np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    return _SWAP @ m @ _SWAP


def deformed_cs(source_cs: str) -> str:
    """Name of the intermediate coordinate system (the source after the non-linear part, before the affine)."""
    return f"{source_cs}_deformed"


def _io(name: str, path: str | None) -> dict[str, str]:
    return {"name": name} if path is None else {"name": name, "path": path}


def transformation(
    affine,
    *,
    source_cs: str,
    target_cs: str,
    forward_path: str | None = None,
    inverse_path: str | None = None,
    name: str | None = None,
    source_path: str | None = None,
    target_path: str | None = None,
) -> dict[str, Any]:
    """The OME-NGFF transformation object of a registration.

    Parameters
    ----------
    affine
        ``(3, 3)`` ``(x, y)`` homogeneous affine, source units -> target units.
    source_cs, target_cs
        Names of the input and output coordinate systems.
    forward_path, inverse_path
        Locations of the two displacement fields (both or neither); without them the result is a plain
        ``affine``.
    name
        Optional ``name`` of the transformation.
    source_path, target_path
        Optional ``path`` of the zarr groups defining the two coordinate systems.
    """
    a = np.asarray(affine, dtype=np.float64)
    io = {"input": _io(source_cs, source_path), "output": _io(target_cs, target_path)}
    head = {"name": name} if name else {}
    if forward_path is None and inverse_path is None:
        return {**head, "type": "affine", "affine": affine_yx(a), **io}
    if forward_path is None or inverse_path is None:
        raise ValueError("give both displacement field paths (forward and inverse) or neither.")
    return {
        **head,
        "type": "bijection",
        "forward": {
            "type": "sequence",
            "transformations": [
                {"type": "displacements", "path": forward_path, "interpolation": "linear"},
                {"type": "affine", "affine": affine_yx(a)},
            ],
            "input": {"name": source_cs},
            "output": {"name": target_cs},
        },
        "inverse": {
            "type": "sequence",
            "transformations": [
                {"type": "affine", "affine": affine_yx(np.linalg.inv(a))},
                {"type": "displacements", "path": inverse_path, "interpolation": "linear"},
            ],
            "input": {"name": target_cs},
            "output": {"name": source_cs},
        },
        **io,
    }


def coordinate_system(name: str, units: str | None, *, vector: str | None = None) -> dict[str, Any]:
    """An OME-NGFF coordinate system with ``(y, x)`` space axes (and a leading vector axis ``c``)."""
    unit = UNITS.get(units or "")
    axes = []
    if vector is not None:
        axes.append({"name": "c", "type": vector, "discrete": True})
    for ax in ("y", "x"):
        a = {"name": ax, "type": "space"}
        if unit:
            a["unit"] = unit
        axes.append(a)
    return {"name": name, "axes": axes}


def field_array(field: DisplacementField) -> np.ndarray:
    """A field's values in OME-NGFF layout: ``(2, ny, nx)`` with the vector axis ordered ``(dy, dx)``."""
    return np.ascontiguousarray(field.values[::-1])


def field_from_array(array, scale, translation) -> DisplacementField:
    """Inverse of :func:`field_array` given the ``(c, y, x)`` ``scale`` and ``translation`` of its grid."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] != 2:
        raise ValueError(f"a 2D displacement field array is (2, ny, nx), got shape {a.shape}.")
    return DisplacementField(a[::-1], x0=translation[2], y0=translation[1], dx=scale[2], dy=scale[1])


def field_multiscales(field: DisplacementField, cs_name: str, units: str | None) -> dict[str, Any]:
    """``ome`` attributes of a field's multiscale group (one level, ``s0``)."""
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "coordinateSystems": [coordinate_system(cs_name, units, vector="displacement")],
                "datasets": [
                    {
                        "path": "s0",
                        "coordinateTransformations": [
                            {
                                "type": "sequence",
                                "transformations": [
                                    {"type": "scale", "scale": [1.0, field.dy, field.dx]},
                                    {"type": "translation", "translation": [0.0, field.y0, field.x0]},
                                ],
                                "input": {"path": "s0"},
                                "output": {"name": cs_name},
                            }
                        ],
                    }
                ],
            }
        ],
    }


# ------------------------------------------------------------------------------------ standalone files
def write_transform(
    reg: Registration,
    path,
    *,
    source_cs: str,
    target_cs: str,
    name: str = "transform",
    overwrite: bool = False,
    attributes: dict[str, Any] | None = None,
) -> Path:
    """Write a registration as a standalone OME-Zarr 0.6 container.

    Layout::

        <path>/zarr.json                       ome.scene: coordinate systems + the transformation
        <path>/coordinateTransformations/<name>/forward/s0   (2, ny, nx) float64, vector axis (dy, dx)
        <path>/coordinateTransformations/<name>/inverse/s0

    Parameters
    ----------
    reg
        The registration; a velocity-based one is sampled first (:meth:`~.Registration.to_displacement`).
    path
        The container to create (a directory).
    source_cs, target_cs
        Coordinate system names (e.g. ``"xenium"``, ``"visium"``).
    name
        Name of the transformation (and of its field group).
    overwrite
        Replace an existing container at ``path`` (only a zarr store is ever replaced).
    attributes
        Extra JSON metadata stored under ``spatialdata_align`` in the root attributes (provenance).

    Returns
    -------
    The container path.
    """
    import shutil

    import zarr

    path = Path(path)
    if "/" in name or not name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}.")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        if not (path / "zarr.json").exists():
            raise FileExistsError(f"{path} exists and is not a zarr store; it is never replaced.")
        shutil.rmtree(path)
    if not reg.is_affine and not reg.is_sampled:
        reg = reg.to_displacement()
    root = zarr.open_group(path, mode="w", zarr_format=3)
    systems = [
        coordinate_system(source_cs, reg.source_units),
        coordinate_system(target_cs, reg.target_units),
    ]
    fpath = ipath = None
    if reg.is_sampled:
        mid = deformed_cs(source_cs)
        systems.append(coordinate_system(mid, reg.source_units))
        fpath, ipath = f"{FIELDS_GROUP}/{name}/forward", f"{FIELDS_GROUP}/{name}/inverse"
        for p, field, cs in ((fpath, reg.forward_field, source_cs), (ipath, reg.inverse_field, mid)):
            g = root.require_group(p)
            arr = field_array(field)
            g.create_array("s0", shape=arr.shape, dtype=arr.dtype, chunks=arr.shape)[...] = arr
            g.attrs["ome"] = field_multiscales(field, cs, reg.source_units)
    t = transformation(
        reg.affine, source_cs=source_cs, target_cs=target_cs, forward_path=fpath, inverse_path=ipath, name=name
    )
    attrs = {
        "ome": {"version": NGFF_VERSION, "scene": {"coordinateSystems": systems, "coordinateTransformations": [t]}}
    }
    extra = {"source_units": reg.source_units, "target_units": reg.target_units}
    for k in ("source_extent", "target_extent"):
        if getattr(reg, k) is not None:
            extra[k] = [float(v) for v in getattr(reg, k)]
    extra.update(attributes or {})
    attrs["spatialdata_align"] = json.loads(json.dumps(extra, default=_json_default))
    root.attrs.update(attrs)
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _units_of(cs: dict) -> str:
    for ax in cs.get("axes", []):
        if ax.get("type") == "space":
            unit = ax.get("unit")
            return {"micrometer": "um", "millimeter": "mm", "nanometer": "nm"}.get(unit, unit or "px")
    return "px"


def read_transform(path, name: str | None = None) -> tuple[Registration, dict[str, Any]]:
    """Read a transformation written by :func:`write_transform` (or any OME-Zarr 0.6 container of that form).

    Parameters
    ----------
    path
        The container.
    name
        Which transformation of the scene to read (default: the only one).

    Returns
    -------
    ``(registration, info)``: the sampled :class:`~spatialdata_align.registration.Registration` and a
    dict with ``name``, ``source_cs``, ``target_cs`` and the root's ``spatialdata_align`` attributes.
    """
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path} is not a zarr v3 store (no zarr.json).")
    root = zarr.open_group(path, mode="r")
    ome = root.attrs.get("ome") or {}
    scene = ome.get("scene") or {}
    ts = scene.get("coordinateTransformations") or []
    if not ts:
        raise ValueError(f"{path}: no ome.scene.coordinateTransformations in its root attributes.")
    if name is None:
        if len(ts) != 1:
            raise ValueError(f"{path} holds {len(ts)} transformations {[t.get('name') for t in ts]}; pass name=.")
        t = ts[0]
    else:
        match = [t for t in ts if t.get("name") == name]
        if not match:
            raise KeyError(f"{path}: no transformation named {name!r}; it holds {[t.get('name') for t in ts]}.")
        t = match[0]
    systems = {cs["name"]: cs for cs in scene.get("coordinateSystems", [])}
    src, tgt = t["input"]["name"], t["output"]["name"]
    extra = dict(root.attrs.get("spatialdata_align") or {})
    kw = {
        "source_units": extra.get("source_units", _units_of(systems.get(src, {}))),
        "target_units": extra.get("target_units", _units_of(systems.get(tgt, {}))),
        "source_extent": extra.get("source_extent"),
        "target_extent": extra.get("target_extent"),
    }
    if t["type"] == "affine":
        reg = Registration.from_affine(affine_from_yx(t["affine"]), **kw)
    elif t["type"] == "bijection":
        fwd, inv = t["forward"]["transformations"], t["inverse"]["transformations"]
        if [s["type"] for s in fwd] != ["displacements", "affine"] or [s["type"] for s in inv] != [
            "affine",
            "displacements",
        ]:
            raise ValueError(
                f"{path}: unsupported bijection layout (forward {[s['type'] for s in fwd]}, inverse "
                f"{[s['type'] for s in inv]}); expected displacements+affine / affine+displacements."
            )
        for s in (fwd[0], inv[1]):
            if s.get("interpolation", "linear") != "linear":
                raise ValueError(f"{path}: only linear interpolation of displacement fields is supported.")
        A = affine_from_yx(fwd[1]["affine"])
        reg = Registration(
            affine=A,
            forward_field=_read_field(root, fwd[0]["path"]),
            inverse_field=_read_field(root, inv[1]["path"]),
            **kw,
        )
        if not np.allclose(affine_from_yx(inv[0]["affine"]) @ A, np.eye(3), atol=1e-9):
            raise ValueError(f"{path}: the inverse's affine is not the inverse of the forward affine.")
    else:
        raise ValueError(f"{path}: unsupported transformation type {t['type']!r} (affine or bijection expected).")
    return reg, {"name": t.get("name"), "source_cs": src, "target_cs": tgt, "attributes": extra}


def _read_field(root, path: str) -> DisplacementField:
    g = root[path]
    ms = g.attrs["ome"]["multiscales"][0]
    axes = ms["coordinateSystems"][0]["axes"]
    if [a.get("type") for a in axes] != ["displacement", "space", "space"]:
        raise ValueError(f"field {path}: axes must be (displacement, y, x), got {[a.get('name') for a in axes]}.")
    ds = ms["datasets"][0]
    scale, translation = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    for t in ds["coordinateTransformations"]:
        for s in t.get("transformations", [t]):
            if s["type"] == "scale":
                scale = s["scale"]
            elif s["type"] == "translation":
                translation = s["translation"]
    return field_from_array(g[ds["path"]][...], scale, translation)
