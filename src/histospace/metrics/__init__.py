"""Metrics used by the tools and benchmarks: per-gene Pearson correlation, ARI and NMI on labelled spots."""

from ._metrics import ari, nmi, pearson_per_gene

__all__ = ["ari", "nmi", "pearson_per_gene"]
