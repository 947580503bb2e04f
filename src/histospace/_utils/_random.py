from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_everything(random_state: int | None) -> None:
    """Seed `random`, `numpy` and `torch` (CUDA too). `None` leaves the generators unseeded."""
    import torch

    if random_state is None:
        return
    random.seed(random_state)
    np.random.seed(random_state)
    torch.manual_seed(random_state)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(random_state)


def make_generator(random_state: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a `torch.Generator`, seeded when `random_state` is not `None` (for DataLoaders and samplers)."""
    import torch

    g = torch.Generator(device=device)
    if random_state is None:
        g.seed()
    else:
        g.manual_seed(int(random_state))
    return g
