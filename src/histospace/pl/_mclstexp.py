"""Placeholder: replaced by its implementation."""


def predicted_vs_observed(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("predicted_vs_observed is not implemented yet")


def gene_correlation(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("gene_correlation is not implemented yet")


def top_genes(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("top_genes is not implemented yet")

