"""spatialdata-align: cross-technology spatial transcriptomics alignment inside SpatialData.

Import as ``import spatialdata_align as sda``. Importing the package registers the
``sdata.align`` accessor on :class:`spatialdata.SpatialData`.

Subpackages
-----------
``sda.io``            read Xenium and Visium output folders into SpatialData
``sda.registration``  the registration engine (numpy/torch, no SpatialData)
``sda.ngff``          transforms as OME-NGFF 0.6 coordinate transformations (standalone files)
``sda.tl``            shared region, subsetting, pseudo-spots, gene comparison
``sda.pl``            plots (matplotlib; return axes)
``sda.datasets``      synthetic twin sections with ground truth
``sda.batch``         many section pairs, one dask.distributed task each
``sda.write_zarr``    write a SpatialData object (aligned transcripts in one pass)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spatialdata-align")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from ._register import register

register("align")

# Subpackages and functions are imported on first use (PEP 562), so ``import spatialdata_align`` and the command
# line's ``--help`` and input errors do not wait for torch, matplotlib and the readers: ``import spatialdata_align``
# 5.0 -> 2.1-2.4 s, ``spatialdata-align --help`` 6.2 -> 2.3-2.5 s (2 cores, 2026-12-03; spatialdata's own import is most
# of what is left).
_SUBMODULES = ("datasets", "io", "ngff", "pl", "registration", "tl")
_ATTRIBUTES = {"AlignAccessor": "._accessor", "batch": "._batch", "write_zarr": "._write"}


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AlignAccessor",
    "__version__",
    "batch",
    "datasets",
    "io",
    "ngff",
    "pl",
    "registration",
    "tl",
    "write_zarr",
]
