"""Method-specific plots: domains over the H&E image, training history, predicted vs observed expression."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._domains import domains
    from ._history import training_history
    from ._mclstexp import gene_correlation, predicted_vs_observed, top_genes
    from ._predictability import gene_predictability

__all__ = [
    "domains",
    "gene_correlation",
    "gene_predictability",
    "predicted_vs_observed",
    "top_genes",
    "training_history",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "domains": "._domains",
        "gene_correlation": "._mclstexp",
        "gene_predictability": "._predictability",
        "predicted_vs_observed": "._mclstexp",
        "top_genes": "._mclstexp",
        "training_history": "._history",
    },
)
