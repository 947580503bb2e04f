"""The base of the model classes: device, seeding, the training loop, history, save/load and repr in one place.

It follows scvi-tools' `BaseModelClass` in spirit: the user-facing class keeps the data it was given and its init
parameters, owns a torch module (:attr:`module`) that computes its own loss, and saves to a folder that `load` reads
back through the constructor. A subclass implements only what differs: building the module, making the batches of one
epoch, one optimisation step, and the arrays it stores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scanpy import logging as logg

from histospace._utils import make_generator, resolve_device, seed_everything, version_string
from histospace._utils._progress import progress
from histospace.models import _ddp as ddp

#: files of a saved model folder
PARAMS_FILE = "params.json"
MODEL_FILE = "model.pt"


def _jsonable(value: Any, name: str) -> Any:
    """`value` as JSON (tuples -> lists, paths -> str, numpy scalars -> Python); a torch module -> its class name."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, os.PathLike):
        return str(Path(value).expanduser().resolve())
    if isinstance(value, list | tuple):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, name) for k, v in value.items()}
    if isinstance(value, torch.nn.Module):
        return {"module": type(value).__name__}
    msg = f"init parameter `{name}` of type {type(value).__name__} cannot be saved; pass a str, number or list."
    raise TypeError(msg)


def adam(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has it for the device (CPU since torch 2.4, CUDA), else the plain one.

    The plain (per-tensor) Adam makes about ten passes over every parameter per step; the fused kernel one (same
    update rule, equal up to float rounding). With the 6.4 M parameters of mclSTExp on a 785-gene panel the plain
    optimiser was 30-40 % of a training step on 2 CPU threads.
    """
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class BaseModelClass:
    """Base of :class:`~histospace.models.StereoMM` and :class:`~histospace.models.MclSTExp`.

    Attributes
    ----------
    module
        The torch module (it computes its own loss).
    history
        Per-epoch training curves (`'loss'` and model-specific terms), one float per epoch.
    is_trained
        Whether :meth:`train` has run (or a trained model was loaded).
    train_params
        The resolved training parameters of the last :meth:`train`.
    init_params_
        The init parameters as given (JSON-serialisable); :meth:`load` passes them to the constructor again.
    device
        The device of :attr:`module`.
    """

    #: the `.npz` file of arrays in a saved folder
    _arrays_file: ClassVar[str] = "arrays.npz"

    def __init__(self, init_params: Mapping[str, Any]):
        self.init_params_: dict[str, Any] = {k: _jsonable(v, k) for k, v in init_params.items()}
        self.module: torch.nn.Module
        self.history: dict[str, list[float]] = {}
        self.is_trained = False
        self.train_params: dict[str, Any] = {}
        self.device = torch.device("cpu")

    # ---- state ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _init_params_of(local_vars: Mapping[str, Any]) -> dict[str, Any]:
        """The public init parameters from the constructor's `locals()` (not `self`, the data or private ones)."""
        return {k: v for k, v in local_vars.items() if k not in ("self", "adata", "__class__") and k[0] != "_"}

    @property
    def n_parameters(self) -> int:
        """Number of parameters of :attr:`module`."""
        return sum(p.numel() for p in self.module.parameters())

    def _check_trained(self) -> None:
        if not self.is_trained:
            name = type(self).__name__
            msg = f"The {name} model is not trained; call `model.train()` first (or load a trained model)."
            raise RuntimeError(msg)

    def to_device(self, device: str | torch.device | None = None):
        """Move :attr:`module` to `device` (`None`: CUDA when available, else the CPU) and return the model."""
        self.device = resolve_device(device)
        self.module.to(self.device)
        return self

    def _repr_fields(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        fields = [*self._repr_fields(), f"parameters={self.n_parameters}", f"trained={self.is_trained}"]
        return f"{type(self).__name__}({', '.join(fields)})"

    # ---- training ------------------------------------------------------------------------------------------------
    def _batches(self, generator: torch.Generator) -> Iterable[Any]:
        """The batches of one epoch, in order (drawn from `generator`)."""
        raise NotImplementedError

    def _step(self, batch: Any) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
        """One batch: `(loss, weight of the batch in the epoch mean, other terms to record)`."""
        raise NotImplementedError

    def _fit(
        self,
        *,
        max_epochs: int,
        lr: float,
        weight_decay: float,
        clip_norm: float | None,
        random_state: int | None,
        progress_bar: bool,
    ) -> dict[str, list[float]]:
        """Run Adam for `max_epochs` over :meth:`_batches`; return the weighted mean of each term per epoch.

        Stops with `FloatingPointError` when the loss is NaN or infinite (a learning rate too high, or bad inputs).
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = adam(params, lr=lr, weight_decay=weight_decay)
        self._generator = make_generator(random_state)
        group = self._group
        order = self._generator  # one generator for the batch order and the steps' draws (one process)
        self._loss_fn = getattr(self.module, self._loss_method)
        if group is not None:  # same batch order on every rank; own draws (augmentation, sampling noise) per rank
            order = make_generator(random_state)
            rank_seed = None if random_state is None else random_state + ddp.RANK_SEED_STRIDE * (group.rank + 1)
            self._generator = make_generator(rank_seed)
            if rank_seed is not None:
                torch.manual_seed(rank_seed)
            self._loss_fn = ddp.wrap(self.module, self._loss_method, self.device)
        history: dict[str, list[float]] = {}
        self.module.train()
        quiet = not progress_bar or (group is not None and group.rank != 0)  # one bar per training, rank 0's
        bar = progress(range(max_epochs), desc=type(self).__name__, disable=quiet)
        try:
            for epoch in bar:
                sums: dict[str, float] = {}
                total = 0.0
                batches = self._batches(order) if group is None else ddp.shard(self._batches(order), group)
                for batch in batches:
                    loss, weight, terms = self._step(batch)
                    value = float(loss.detach())
                    if not (math.isfinite(value) if group is None else ddp.all_finite(value)):
                        msg = (
                            f"{type(self).__name__} loss became {value} at epoch {epoch}; training stopped. Try a "
                            f"lower learning rate (lr={lr:g} now, e.g. lr={lr / 10:g}) or check the inputs."
                        )
                        raise FloatingPointError(msg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, clip_norm)
                    opt.step()
                    for k, v in {"loss": value, **{k: float(t.detach()) for k, t in terms.items()}}.items():
                        sums[k] = sums.get(k, 0.0) + v * weight
                    total += weight
                if group is not None and sums:  # the epoch's mean over all ranks' batches
                    keys = sorted(sums)
                    reduced = ddp.sum_over_ranks([total, *(sums[k] for k in keys)])
                    total, sums = reduced[0], dict(zip(keys, reduced[1:], strict=True))
                for k, v in sums.items():
                    history.setdefault(k, []).append(v / max(total, 1e-12))
                if "loss" in history:
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
        finally:
            del self._generator, self._loss_fn
        return history

    # ---- several processes (DDP) ---------------------------------------------------------------------------------
    #: the module's method that computes the loss of a batch (called through DDP with `devices > 1`)
    _loss_method: ClassVar[str] = "forward"
    #: attributes set by `train` that rank 0 of spawned processes hands back to the parent (besides the weights)
    _trained_attrs: ClassVar[tuple[str, ...]] = ("history", "is_trained", "train_params")
    #: this process's place in a DDP group while `train(devices > 1)` runs; `None` otherwise
    _group: ddp.Group | None = None

    def _trained_state(self) -> dict[str, Any]:
        """What `train` produced: the module's weights and :attr:`_trained_attrs` (CPU tensors)."""
        return {
            "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            **{k: getattr(self, k) for k in self._trained_attrs},
        }

    def _set_trained_state(self, state: Mapping[str, Any], device: torch.device) -> None:
        """Take the state of :meth:`_trained_state` (from rank 0 of spawned processes) on `device`."""
        state = dict(state)
        self.module.load_state_dict(state.pop("module"))
        for k, v in state.items():
            setattr(self, k, v)
        self.device = device
        self.module.to(device)
        self.train_params["device"] = str(device)

    def _start_devices(
        self, devices: int, device: torch.device, train_kwargs: dict[str, Any]
    ) -> tuple[bool, torch.device]:
        """Prepare `train(devices=...)`: `(done, device)`.

        `devices=1`: nothing to do. Not in a process group: spawn `devices` processes that train, take rank 0's
        result (`done=True`). In a process group (torchrun): join it as this rank (`done=False`, :attr:`_group` set;
        :meth:`_stop_devices` leaves it).
        """
        self._group = None
        if devices == 1:
            return False, device
        if not ddp.launched():
            start = logg.info(f"training {type(self).__name__} in {devices} processes ({ddp.backend_for(device)})")
            self._set_trained_state(ddp.spawn(self, devices, device, train_kwargs), device)
            logg.info("    finished", time=start)
            return True, device
        group, device = ddp.join(devices, device)
        self._group = group
        return False, device

    def _stop_devices(self) -> None:
        """Leave the process group of :meth:`_start_devices` (:attr:`_group` stays for :meth:`_devices_params`)."""
        ddp.leave(self._group)

    def _devices_params(self, devices: int) -> dict[str, Any]:
        """`devices`, `backend` and threads per process, for :attr:`train_params`."""
        g = self._group
        return {
            "devices": int(devices),
            "backend": "none" if g is None else g.backend,
            "threads_per_process": int(torch.get_num_threads()),
        }

    @staticmethod
    def _seed(random_state: int | None) -> None:
        seed_everything(random_state)

    def _snapshot(self) -> dict:
        """A CPU copy of the module's state_dict: one member of a seed ensemble."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # ---- save and load -------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        """Arrays saved in :attr:`_arrays_file` (the fitted preprocessing, reference embeddings, ...)."""
        return {}

    def _meta(self) -> dict[str, Any]:
        """Extra JSON entries of `params.json`."""
        return {}

    def _save_extra(self, folder: Path) -> None:
        """Write files beyond the standard three (e.g. the members of an ensemble)."""

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save the model to a folder: `params.json`, `model.pt` and the arrays (`.npz`).

        `params.json` holds the init and training parameters, the history and the package version; `model.pt` the
        `state_dict` of :attr:`module` (read back with `torch.load(..., weights_only=True)`); the `.npz` the arrays
        the model needs besides its weights. The AnnData is never saved.
        """
        d = Path(dir_path)
        if d.exists() and not d.is_dir():
            msg = f"{d} exists and is not a folder; pass a folder path."
            raise FileExistsError(msg)
        if d.exists() and any(d.iterdir()) and not overwrite:
            msg = f"{d} exists and is not empty; pass `overwrite=True`."
            raise FileExistsError(msg)
        arrays = self._arrays()
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, d / MODEL_FILE)
        meta = {
            "class": type(self).__name__,
            "init": self.init_params_,
            "train": _jsonable(self.train_params, "train_params"),
            "history": {k: [float(x) for x in v] for k, v in self.history.items()},
            "is_trained": bool(self.is_trained),
            "version": version_string(),
            **self._meta(),
        }
        (d / PARAMS_FILE).write_text(json.dumps(meta, indent=1))
        np.savez(d / self._arrays_file, **arrays)
        self._save_extra(d)
        logg.info(f"saved {type(self).__name__} to {d}")

    @classmethod
    def _read_folder(cls, dir_path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
        """`(folder, params.json, arrays)` of a saved model, with errors that name the missing or damaged file."""
        d = Path(dir_path)
        for f in (PARAMS_FILE, MODEL_FILE, cls._arrays_file):
            if not (d / f).is_file():
                msg = f"{d / f} not found; `dir_path` must be a folder written by `{cls.__name__}.save`."
                raise FileNotFoundError(msg)
        try:
            meta = json.loads((d / PARAMS_FILE).read_text())
            if not isinstance(meta, dict) or "init" not in meta:
                raise ValueError("no 'init' entry")
        except (ValueError, UnicodeDecodeError) as e:
            raise _damaged(d, PARAMS_FILE, cls, e) from e
        if meta.get("class", cls.__name__) != cls.__name__:
            msg = f"{d} holds a {meta['class']} model, not a {cls.__name__}; load it with `hs.models.{meta['class']}`."
            raise ValueError(msg)
        try:
            with np.load(d / cls._arrays_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise _damaged(d, cls._arrays_file, cls, e) from e
        except Exception as e:  # zipfile.BadZipFile and friends
            raise _damaged(d, cls._arrays_file, cls, e) from e
        return d, meta, arrays

    @classmethod
    def _read_torch(cls, path: Path) -> Any:
        """`torch.load(path, weights_only=True)` on the CPU, naming the file when it is damaged."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise _damaged(path.parent, path.name, cls, e) from e

    def _restore(self, folder: Path, meta: Mapping[str, Any], device) -> None:
        """Load the weights, history and training parameters of a saved folder into this (new) model."""
        state = self._read_torch(folder / MODEL_FILE)
        try:
            self.module.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise _damaged(folder, MODEL_FILE, type(self), e) from e
        self.history = {k: [float(x) for x in v] for k, v in meta.get("history", {}).items()}
        self.train_params = dict(meta.get("train", {}))
        self.is_trained = bool(meta.get("is_trained", False))
        self.to_device(device)


def _damaged(folder: Path, name: str, cls: type, err: Exception) -> ValueError:
    msg = (
        f"`{name}` in {folder} is damaged or was not written by `{cls.__name__}.save` ({type(err).__name__}: {err}). "
        "Save the model again."
    )
    return ValueError(msg)


def iterate_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices `[lo, lo + size)` over `range(n)`."""
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))
