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

from . import datasets, io, ngff, pl, registration, tl
from ._accessor import AlignAccessor, register
from ._batch import batch
from ._write import write_zarr

register("align")

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
