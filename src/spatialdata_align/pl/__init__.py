"""Plots (matplotlib): each returns its axes and takes ``save=`` (a file path); none calls ``plt.show()``.

``overlay``             aligned cells and spots over the H&E (full-resolution px)
``landmarks``           landmark pairs, source (µm) next to target (px), with fit residuals
``energy``              LDDMM energy trace
``gene``                one gene, Xenium cells and Visium spots side by side on the aligned frame
``compare``             pseudo-spot vs spot scatter of one gene
``bins_gene``           one gene at Visium HD bin level: binned Xenium cells next to the HD bins
``total_counts``        total counts per cell / per spot
``annotate_landmarks``  click landmark pairs on an interactive figure (Jupyter: ``%matplotlib widget``)
``render``              spatialdata-plot rendering of aligned shapes over an image, with the method that works
``render_method``       which spatialdata-plot ``render_shapes`` method works for an element (0.4.0 datashader bug)
"""

from ._annotate import LandmarkAnnotator, annotate_landmarks
from ._bins import bins_gene
from ._plots import compare, energy, gene, landmarks, overlay, total_counts
from ._sdplot import render, render_method

__all__ = [
    "LandmarkAnnotator",
    "annotate_landmarks",
    "bins_gene",
    "compare",
    "energy",
    "gene",
    "landmarks",
    "overlay",
    "render",
    "render_method",
    "total_counts",
]
