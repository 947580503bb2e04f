"""Method-specific plots: domains over the H&E image, training history, predicted vs observed expression."""

from ._domains import domains
from ._history import training_history
from ._mclstexp import gene_correlation, predicted_vs_observed, top_genes

__all__ = ["domains", "gene_correlation", "predicted_vs_observed", "top_genes", "training_history"]
