"""Helpers shared by the plotting functions."""

from __future__ import annotations

from matplotlib import pyplot as plt


def finish(obj, show: bool | None):
    """Show the figure (`None`: as `scanpy.settings.autoshow`) and return `None`, or return `obj`."""
    if show is None:
        import scanpy as sc

        show = sc.settings.autoshow
    if not show:
        return obj
    plt.show()
    return None
