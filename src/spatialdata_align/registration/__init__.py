"""The registration engine: pure numpy/torch, no SpatialData.

Points are ``(N, 2)`` arrays of ``(x, y)`` in physical units; images are ``(c, y, x)``
:class:`xarray.DataArray` objects (or arrays) with pixel-centre coordinates in physical units.

* :func:`rasterize` – points (cells, transcripts) → density image on a physical grid.
* :func:`fit_affine` – affine / similarity / rigid transform from matched landmarks.
* :func:`auto_init` – affine initialisation without landmarks (rotation/reflection/scale search).
* :func:`lddmm` – affine + diffeomorphic registration with mixture matching.
* :func:`celltype_channels`, :func:`expression_features` – source channels beyond the density.
* :func:`stain_densities` – an RGB H&E as haematoxylin and eosin optical densities (the default target channels).
* :class:`Registration` – the result: applies the transform to points and images, both ways.
* :class:`DisplacementField` – a displacement field on a regular grid (the stored, OME-NGFF form of a map).
"""

from ._displacement import DisplacementField
from ._features import celltype_channels, expression_features, stain_densities
from ._init import InitResult, auto_init
from ._landmarks import AffineFit, decompose_affine, fit_affine
from ._lddmm import RegistrationDivergedWarning, lddmm
from ._rasterize import rasterize
from ._result import Registration
from ._utils import Image

__all__ = [
    "AffineFit",
    "DisplacementField",
    "Image",
    "InitResult",
    "Registration",
    "RegistrationDivergedWarning",
    "auto_init",
    "celltype_channels",
    "decompose_affine",
    "expression_features",
    "fit_affine",
    "lddmm",
    "rasterize",
    "stain_densities",
]
