"""`keep_torch_threads`: scanpy calls must not change the user's torch thread count."""

from __future__ import annotations

import torch

from histospace._utils._device import keep_torch_threads


def test_keep_torch_threads_restores_a_reset():
    before = torch.get_num_threads()
    try:
        with keep_torch_threads():
            torch.set_num_threads(before + 1)  # what numba's OpenMP layer does to the process
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_stereomm_preprocessing_keeps_torch_threads(adata_graph):
    import histospace as hs

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hs.models.StereoMM(adata_graph, hidden=[8], n_latent=4)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_keep_freed_memory_applies_once_and_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = (
        "from histospace._utils._device import keep_freed_memory as k; import sys; "
        "print(k(), k(), sys.platform.startswith('linux'))"
    )
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if on[2] == "True":  # glibc's mallopt on Linux: applied, and a second call is a no-op that says so
        assert on[:2] == ["True", "True"]
    env = {**os.environ, "HISTOSPACE_MALLOC_TUNING": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert off.split()[:2] == ["False", "False"]
