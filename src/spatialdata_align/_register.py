"""The ``sdata.align`` accessor's registration, kept light.

Importing the package registers the accessor without importing the engine (torch), the readers or the plots;
:class:`~spatialdata_align.AlignAccessor` is imported on first use.
"""

from __future__ import annotations

import warnings

from spatialdata import SpatialData


class _AccessorDescriptor:
    """Descriptor: ``sdata.align`` returns a (cheap, stateless) accessor bound to that object."""

    def __init__(self, name: str, accessor: type | None = None):
        self._name = name
        self._accessor = accessor

    def _cls(self) -> type:
        if self._accessor is None:
            from ._accessor import AlignAccessor

            self._accessor = AlignAccessor
        return self._accessor

    def __get__(self, obj, cls):
        if obj is None:
            return self._cls()
        return self._cls()(obj)


def register(name: str = "align") -> None:
    """Register :class:`~spatialdata_align.AlignAccessor` as ``SpatialData.<name>`` (idempotent)."""
    if isinstance(SpatialData.__dict__.get(name), _AccessorDescriptor):
        return
    if getattr(SpatialData, name, None) is not None:
        warnings.warn(f"SpatialData.{name} already exists; spatialdata_align overrides it.", stacklevel=2)
    setattr(SpatialData, name, _AccessorDescriptor(name))
