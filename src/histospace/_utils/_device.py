from __future__ import annotations

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
