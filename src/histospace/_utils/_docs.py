"""Parameter text shared by several public functions.

Use :func:`doc_params` as a decorator; the docstring refers to the shared text as `{adata}`, `{copy}` and so on.
"""

from __future__ import annotations

from collections.abc import Callable
from textwrap import dedent, indent
from typing import TypeVar

F = TypeVar("F", bound=Callable)

COMMON_PARAMS = {
    "adata": (
        "Annotated data matrix, or a :class:`spatialdata.SpatialData` whose table `table_key` is used and written to "
        "(results go into the table exactly as into an AnnData)."
    ),
    "copy": (
        "Return a copy instead of writing to `adata` (for a SpatialData, a new SpatialData holding a copy of the table; "
        "the other elements are shared, not copied)."
    ),
    "table_key": "With a SpatialData: the table to use and write to; `None` takes the only table.",
    "device": ("Torch device, e.g. `'cpu'` or `'cuda'`. `None` picks CUDA when it is available and the CPU otherwise."),
    "devices": (
        "Train in this many processes with torch.distributed DDP (gloo on the CPU, NCCL on CUDA with one GPU per "
        "process): the ranks of a `torchrun` job, or processes spawned here. The mini-batches of an epoch are shared "
        "among them and the gradients averaged; the same seed and `devices` give the same model. 1 (default): one "
        "process, no torch.distributed. See `docs/scaling_training.md`."
    ),
    "random_state": (
        "Seed for `random`, `numpy` and `torch` (and every data loader). The same seed, device and package versions "
        "give identical results on the CPU; GPU kernels may differ slightly. `None` leaves the generators unseeded."
    ),
    "progress_bar": "Show one progress bar (tqdm).",
    "layer": "Layer of `adata` holding the counts; `None` uses `adata.X`.",
    "library_id": (
        "Key of `adata.uns['spatial']` to use. `None` takes the only library (or the one named by `library_key`)."
    ),
    "spatial_key": "Key in `adata.obsm` with the spot centres in full-resolution image pixels.",
}


def _fmt(text: str, n: int) -> str:
    return indent(dedent(text), " " * n).lstrip()


def doc_params(**extra: str) -> Callable[[F], F]:
    """Fill `{name}` placeholders in a docstring with the shared parameter text (indented as the placeholder)."""

    def decorator(obj: F) -> F:
        if obj.__doc__:
            params = {**COMMON_PARAMS, **extra}
            lines = []
            for line in obj.__doc__.splitlines():
                stripped = line.strip()
                if stripped.startswith("{") and stripped.endswith("}") and stripped[1:-1] in params:
                    n = len(line) - len(line.lstrip())
                    lines.append(" " * n + _fmt(params[stripped[1:-1]], n))
                else:
                    lines.append(line)
            obj.__doc__ = "\n".join(lines)
        return obj

    return decorator
