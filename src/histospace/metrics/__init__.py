"""Metrics used by the tools and benchmarks: per-gene Pearson correlation and errors, ARI and NMI on labelled spots."""

from ._metrics import ari, mae_per_gene, mse_per_gene, nmi, pearson_per_gene

__all__ = ["ari", "mae_per_gene", "mse_per_gene", "nmi", "pearson_per_gene"]
