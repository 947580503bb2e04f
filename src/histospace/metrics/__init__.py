"""Metrics used by the tools and benchmarks: per-gene Pearson correlation and errors, ARI and NMI on labelled spots."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._metrics import ari, mae_per_gene, mse_per_gene, nmi, pearson_per_gene

__all__ = ["ari", "mae_per_gene", "mse_per_gene", "nmi", "pearson_per_gene"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ari": "._metrics",
        "mae_per_gene": "._metrics",
        "mse_per_gene": "._metrics",
        "nmi": "._metrics",
        "pearson_per_gene": "._metrics",
    },
)
