"""spatialdata-align: cross-technology spatial transcriptomics alignment inside SpatialData.

Import as ``import spatialdata_align as sda``. Importing the package registers the
``sdata.align`` accessor on :class:`spatialdata.SpatialData`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spatialdata-align")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from . import datasets, io, registration  # noqa: E402

__all__ = ["__version__", "datasets", "io", "registration"]
