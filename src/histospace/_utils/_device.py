from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the torch device to use; `None` picks CUDA when present, never MPS on its own."""
    import torch
    from scanpy import logging as logg

    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            msg = f"device={device!r} is not a valid torch device; pass 'cpu', 'cuda' or 'cuda:0'."
            raise ValueError(msg) from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            msg = "device='cuda' was requested but CUDA is not available; pass device='cpu'."
            raise ValueError(msg)
        if dev.type == "mps" and not torch.backends.mps.is_available():
            msg = "device='mps' was requested but MPS is not available; pass device='cpu'."
            raise ValueError(msg)
    logg.debug(f"using device {dev}")
    return dev


@contextmanager
def keep_torch_threads():
    """Restore torch's CPU thread count after code that may reset OpenMP's (scanpy's numba-parallel functions).

    numba's OpenMP threading layer sets the process's OpenMP thread count to its own (all cores) when it first runs,
    and torch's intra-op pool follows it: a user's `torch.set_num_threads(1)` would silently become 2 after
    `sc.pp.highly_variable_genes`. Only restores when torch is already imported; imports nothing.
    """
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)
