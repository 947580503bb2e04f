"""Training on several processes with torch.distributed: DistributedDataParallel, under torchrun or spawned here.

`devices=N > 1` in a model's `train` runs its training loop in `N` processes. Inside a process group (torchrun, or
the user's `torch.distributed.init_process_group`) the running processes are the `N` ranks; otherwise histospace
starts them with `torch.multiprocessing.spawn` (gloo on the CPU, NCCL on CUDA), each process gets a pickled copy of
the model (torch tensors through shared memory), and rank 0 hands the trained state back to the parent through a
temporary file. Every rank draws the same batch order from the same seed and takes its share of the batches
(`DistributedSampler`'s rule: padded to a multiple of `N` by repeating the first ones); DDP averages the gradients,
so the ranks keep identical weights. Same seed and same `N` give the same model.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from histospace._utils import check_number

if TYPE_CHECKING:
    from collections.abc import Sequence

    from histospace.models._base import BaseModelClass

#: offset between the per-rank seeds of augmentation and sampling noise (the batch order uses the seed itself)
RANK_SEED_STRIDE = 7919


@dataclass(frozen=True)
class Group:
    """The place of this process in the training group."""

    rank: int
    world_size: int
    backend: str
    #: the group was initialised by histospace (from torchrun's environment) and is destroyed after training
    owned: bool = False


def check_devices(devices: int) -> int:
    """`devices` as a positive int, with an error that names the argument."""
    return int(check_number(devices, "devices", integer=True, low=1))


def launched() -> bool:
    """Whether this process is a rank of a process group (initialised, or torchrun's environment is set)."""
    if dist.is_available() and dist.is_initialized():
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def threads_per_process(devices: int) -> int:
    """``max(1, cores // devices)``: the cores this process may use, shared among the ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // devices)


def join(devices: int, device: torch.device) -> tuple[Group, torch.device]:
    """Join the running process group (initialising it from torchrun's `env://` when needed); return its device.

    On CUDA each rank takes the GPU of its `LOCAL_RANK`.
    """
    if not dist.is_available():
        msg = "devices > 1 needs torch.distributed, which this torch build lacks; pass devices=1."
        raise RuntimeError(msg)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), init_method="env://")
        owned = True
    world = dist.get_world_size()
    if world != devices:
        msg = (
            f"devices={devices}, but this process group has {world} processes (torchrun --nproc-per-node); pass "
            f"devices={world}."
        )
        raise ValueError(msg)
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return Group(rank, world, str(dist.get_backend()), owned), device


def leave(group: Group | None) -> None:
    """Destroy the process group when histospace initialised it."""
    if group is not None and group.owned and dist.is_initialized():
        dist.destroy_process_group()


class _Loss(torch.nn.Module):
    """`module.<method>` as a forward, so that DDP sees the call (DDP prepares its gradient sync in `forward`)."""

    def __init__(self, module: torch.nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


def wrap(module: torch.nn.Module, method: str, device: torch.device) -> torch.nn.Module:
    """`module.<method>` under DistributedDataParallel (buffers such as attention caches are not re-broadcast)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # parameters and buffers are synced once at init; buffers (attention caches) not before every forward
    no_resync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.14
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        _Loss(module, method), device_ids=[device.index] if device.type == "cuda" else None, **no_resync
    )


def shard(batches: Sequence[Any], group: Group) -> list[Any]:
    """The batches of this rank in an epoch: every `world_size`-th from `rank`, padded so that all ranks step alike."""
    batches = list(batches)
    if not batches:
        return []
    n = -(-len(batches) // group.world_size) * group.world_size
    padded = batches + [batches[i % len(batches)] for i in range(n - len(batches))]
    return padded[group.rank :: group.world_size]


def all_finite(value: float) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(model: BaseModelClass, devices: int, device: torch.device, train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Train `model` in `devices` spawned processes; return rank 0's trained state (see `_trained_state`)."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < devices:
        msg = f"devices={devices} but {torch.cuda.device_count()} CUDA device(s) are visible; pass devices<=that."
        raise ValueError(msg)
    backend = backend_for(device)
    init = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="histospace-ddp-") as tmp:
        out = Path(tmp) / "rank0.pt"
        args = (devices, init, backend, device.type, model, train_kwargs, str(out), threads_per_process(devices))
        mp.spawn(_worker, args=args, nprocs=devices, join=True)
        return torch.load(out, map_location="cpu", weights_only=False)  # written by rank 0 just now


def _worker(
    rank: int,
    world: int,
    init: str,
    backend: str,
    device_type: str,
    model: BaseModelClass,
    train_kwargs: dict[str, Any],
    out: str,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    # the inputs stay in the shared memory torch pickled them into (read only); the weights become this rank's own,
    # or every rank's optimiser would step the same shared parameters
    for t in (*model.module.parameters(), *model.module.buffers()):
        t.data = t.data.clone()
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {**train_kwargs, "device": device, "devices": world}
        kwargs["progress_bar"] = bool(kwargs.get("progress_bar", True)) and rank == 0
        model.train(**kwargs)
        if rank == 0:
            state = model._trained_state()
            state["train_params"] = {**state["train_params"], "threads_per_process": threads, "spawned": True}
            torch.save(state, out)
    finally:
        dist.destroy_process_group()
