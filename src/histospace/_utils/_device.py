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


#: glibc's malloc settings for CNN inference on the CPU (see `keep_freed_memory`)
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 1 << 30, (1 << 31) - 1
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse large freed blocks instead of returning them to the system (Linux, once a process).

    A CNN on the CPU allocates and frees activations of tens to hundreds of MB per layer. glibc serves such blocks
    with `mmap` and gives them back at once, so every layer touches fresh zeroed pages: on the 8-view image features
    of the mclSTExp recipe half of the run was page faults in the kernel (her2st C2, 96 spots, 2 threads: 37.8 s, of
    which 36 s system time and 13.8 M page faults; 15.7 s and 0.8 M with this setting, the same features bit for
    bit). Blocks below 1 GiB then come from the heap, and up to 2 GiB of freed heap is kept for reuse: the process's
    memory stays near its peak instead of falling back after each batch. Returns whether the setting was applied
    (`False` on other C libraries, or when `HISTOSPACE_MALLOC_TUNING=0`).
    """
    global _malloc_tuned
    import os

    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("HISTOSPACE_MALLOC_TUNING", "1") == "0":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _malloc_tuned = bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, _TRIM_THRESHOLD)
    )
    return _malloc_tuned


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
