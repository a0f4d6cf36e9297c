"""Read 10x Xenium and Visium output folders into SpatialData with stable element names.

Public functions
----------------
:func:`read_xenium`, :func:`read_visium`, :func:`read_pair`, :func:`visium_scalefactors` and
:func:`registration_target` (the best Visium image present: hires, lowres, full resolution, CytAssist);
:func:`read_feature_matrix` (``.h5`` or Matrix Market folder, through :func:`scanpy.read_10x_h5` /
:func:`scanpy.read_10x_mtx`) is exposed for convenience. Landmark and affine files: :func:`read_landmarks` (our
CSV, STalign ``.npy`` dicts, Xenium Explorer keypoints), :func:`read_explorer_keypoints` /
:func:`write_explorer_keypoints` and :func:`read_explorer_alignment` / :func:`write_explorer_alignment` (Xenium
Explorer's keypoints and image-alignment matrix CSVs).

Names (from :mod:`spatialdata_align._constants`)
-----------------------------------------------
Xenium, coordinate system ``xenium`` (µm): ``xenium_cells``, ``xenium_table``, ``xenium_transcripts``,
``xenium_morphology_focus`` / ``xenium_morphology_mip``, ``xenium_cell_boundaries``,
``xenium_nucleus_boundaries``. Visium, coordinate system ``visium`` (full-resolution pixels): ``visium_spots``,
``visium_table``, ``visium_hires_image``, ``visium_lowres_image``, ``visium_fullres_image``,
``visium_cytassist_image`` (whichever exist).

Delegation to spatialdata-io
----------------------------
* Xenium, full Xenium Onboard Analysis folder: delegated to :func:`spatialdata_io.xenium` (labels, polygons,
  multiscale morphology, aligned images; transcripts are read here, with a unique index), then renamed, moved from
  its pixel system ``global`` to ``xenium`` (µm) and its table rebuilt by the same code as the other layouts.
  ``spatialdata_io.xenium`` cannot read a download without ``cells.zarr.zip`` (it opens ``experiment.xenium`` and
  ``cells.zarr.zip`` unconditionally and reads only ``cells.parquet`` / ``cell_feature_matrix.h5``), so the other
  layouts (and any full folder it fails on) have their own path here; the tests check that both give the same
  cells, counts and transcripts.
* Visium: **not** delegated. :func:`spatialdata_io.visium` (0.7.1) needs a ``dataset_id``, names elements
  ``<id>_...``, does not find the ``filtered_feature_bc_matrix/`` folder by itself (it then fails opening a
  non-existent ``.h5``), reads neither ``tissue_positions.parquet`` nor the CytAssist image, asserts on malformed
  position files and, without ``scalefactors_json.json``, fails with an ``UnboundLocalError``; wrapping it would
  need as much code as reading the four small files directly, with worse errors. :func:`read_visium` reads them
  itself (the counts with scanpy); the tests check that counts, gene order, spot positions and radii, hires/lowres
  pixels and their transformations equal those of ``spatialdata_io.visium`` on the same folder.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from spatialdata import SpatialData

from .._checks import check_pair_modalities
from .._landmark_files import (
    read_explorer_alignment,
    read_explorer_keypoints,
    read_landmarks,
    write_explorer_alignment,
    write_explorer_keypoints,
    write_landmarks_csv,
)
from ._matrix import read_feature_matrix
from ._visium import read_positions, read_scalefactors, read_visium, registration_target, visium_scalefactors
from ._visium_hd import is_visium_hd, read_visium_hd
from ._xenium import XENIUM_PIXEL_SIZE, read_xenium

__all__ = [
    "XENIUM_PIXEL_SIZE",
    "is_visium_hd",
    "read_explorer_alignment",
    "read_explorer_keypoints",
    "read_feature_matrix",
    "read_landmarks",
    "read_pair",
    "read_positions",
    "read_scalefactors",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "registration_target",
    "visium_scalefactors",
    "write_explorer_alignment",
    "write_explorer_keypoints",
    "write_landmarks_csv",
]


def read_pair(
    xenium_path: str | Path,
    visium_path: str | Path,
    *,
    xenium_kwargs: dict[str, Any] | None = None,
    visium_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> SpatialData:
    """Read a Xenium folder and a Visium ``outs/`` folder into one SpatialData object.

    Parameters
    ----------
    xenium_path
        Xenium output folder (full or minimal layout), see :func:`read_xenium`.
    visium_path
        Space Ranger ``outs/`` folder, see :func:`read_visium`; a Visium HD folder (one holding
        ``binned_outputs/square_<size>um/``) is detected and read with :func:`read_visium_hd` (default bins 8 and
        16 µm).
    xenium_kwargs, visium_kwargs
        Keyword arguments for :func:`read_xenium` / :func:`read_visium` (or :func:`read_visium_hd`).
    **kwargs
        Further keyword arguments, each routed to whichever reader accepts it (e.g. ``transcripts=False`` goes to
        :func:`read_xenium`, ``fullres_image=None`` to :func:`read_visium`); one that neither accepts raises
        :class:`TypeError`.

    Returns
    -------
    SpatialData holding every element of both readers: coordinate systems ``xenium`` (µm) and ``visium``
    (full-resolution pixels), not yet related to each other.

    Raises
    ------
    FileNotFoundError, ValueError
        As raised by the two readers.
    TypeError
        A keyword argument neither reader accepts.
    """
    check_pair_modalities(xenium_path, visium_path)
    xkw, vkw = dict(xenium_kwargs or {}), dict(visium_kwargs or {})
    hd = is_visium_hd(visium_path)
    xparams = set(inspect.signature(read_xenium).parameters) - {"path"}
    vparams = set(inspect.signature(read_visium_hd if hd else read_visium).parameters) - {"path"}
    for key, value in kwargs.items():
        if key in xparams:
            xkw.setdefault(key, value)
        if key in vparams:
            vkw.setdefault(key, value)
        if key not in xparams and key not in vparams:
            raise TypeError(
                f"read_pair got an unexpected keyword argument {key!r}; read_xenium accepts {sorted(xparams)}, "
                f"read_visium accepts {sorted(vparams)}."
            )
    xen = read_xenium(xenium_path, **xkw)
    vis = read_visium_hd(visium_path, **vkw) if hd else read_visium(visium_path, **vkw)
    out = SpatialData(
        images={**xen.images, **vis.images},
        labels={**xen.labels, **vis.labels},
        points={**xen.points, **vis.points},
        shapes={**xen.shapes, **vis.shapes},
        tables={**xen.tables, **vis.tables},
    )
    out.attrs.update({**xen.attrs, **vis.attrs})
    return out
