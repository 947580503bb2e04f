"""histospace: spatial transcriptomics with H&E histology for scanpy and squidpy."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, metrics, models, pl, pp, tl

try:
    __version__ = version("histospace")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["datasets", "io", "metrics", "models", "pl", "pp", "tl", "__version__"]
