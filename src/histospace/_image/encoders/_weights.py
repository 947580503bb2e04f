"""Weights of the pathology models: files, key layouts, architecture checks and the HuggingFace hub.

Weight files are read as flat state_dicts, their key layouts (transformers DINOv2, original DINOv2) converted to timm's,
and checked against an entry's architecture (naming the registry entry they fit instead); `weights='hub'` goes
through timm's `hf-hub:` loader or `huggingface_hub`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from scanpy import logging as logg
from torch import nn

from histospace._image.encoders._registry import (
    PATHOLOGY_ENCODERS,
    PathologyModel,
    _import_timm,
    _layer_classes,
    create_vit,
)
from histospace._image.encoders._torchvision import mismatch_text, state_dict_mismatch, state_dict_shapes

#: weight files looked for, in this order, in a folder (a HuggingFace snapshot or a download folder)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "checkpoint.pth")
#: wrappers around a state_dict in training checkpoints, in order of preference (DINOv2 keeps 'teacher' and 'student')
_WRAPPERS = ("state_dict", "model_state_dict", "model", "teacher", "module")
#: key prefixes removed when every key carries them (DataParallel, DINOv2 'backbone.', HF task models 'dinov2.')
_PREFIXES = ("module.", "backbone.", "dinov2.", "model.", "trunk.", "encoder.")
#: keys of heads that feature extraction does not use (DINO/iBOT projection heads, a classifier)
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")


def _find_weight_file(folder: Path) -> Path:
    for fname in _WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    if len(found) == 1:
        return found[0]
    msg = (
        f"No weights file in folder {str(folder)!r} (looked for {list(_WEIGHT_FILES)}"
        + (f"; several candidates: {[p.name for p in found]}" if found else "")
        + "). Pass the path of the file itself."
    )
    raise FileNotFoundError(msg)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (or the one weights file of a folder) as a flat state_dict of float32 tensors.

    `.safetensors` files are read with safetensors, anything else with `torch.load(weights_only=True)` (memory-mapped
    when the file allows it). Wrappers (`'state_dict'`, `'model'`, `'teacher'`, ...) and prefixes shared by all keys
    (`'module.'`, `'backbone.'`, `'dinov2.'`, ...) are removed, as are training heads (`dino_head.*`, `ibot_head.*`,
    `head.*`). Half-precision tensors are cast to float32. Raises `FileNotFoundError` or `ValueError`.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = _find_weight_file(p)
    if not p.is_file():
        msg = (
            f"Weights file {str(p)!r} not found. Download the model's weights file (e.g. `pytorch_model.bin` or "
            "`model.safetensors` from its HuggingFace page) and pass its path, `weights='hub'` to download it on a "
            "connected machine, or `weights=None` for random initialisation."
        )
        raise FileNotFoundError(msg)
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors comes with timm
            msg = "Reading `.safetensors` files needs safetensors: `pip install safetensors`."
            raise ImportError(msg) from e
        try:
            sd = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            msg = f"Could not read {str(p)!r} as a safetensors file ({type(e).__name__}: {e})."
            raise ValueError(msg) from e
    else:
        try:
            try:
                sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or pickled-module files
            msg = (
                f"Could not read weights file {str(p)!r} as a torch state_dict ({type(e).__name__}: {e}). The file "
                "may be corrupt or a pickled module; save `model.state_dict()` with `torch.save` and pass that file."
            )
            raise ValueError(msg) from e
    for _ in range(3):  # nested wrappers, e.g. {'model': {'state_dict': ...}}
        if isinstance(sd, Mapping) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping) or not sd:
        msg = f"Weights file {str(p)!r} does not hold a state_dict (a dict of tensors); got {type(sd).__name__}."
        raise ValueError(msg)
    sd = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        msg = f"Weights file {str(p)!r} holds no tensors."
        raise ValueError(msg)
    for _ in range(3):
        for prefix in _PREFIXES:
            inside = [k for k in sd if k.startswith(prefix)]
            outside = [k for k in sd if not k.startswith(prefix)]
            if inside and all(k.startswith(_HEAD_PREFIXES) for k in outside):
                sd = {k[len(prefix) :]: sd[k] for k in inside}
                break
        else:
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in sd.items()}


def convert_hf_dinov2(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert transformers `Dinov2Model` keys (Phikon-v2's `model.safetensors`) to timm's ViT layout.

    The inverse of transformers' `convert_dinov2_to_hf.py`: query/key/value are concatenated into `qkv`,
    `layer_scale{1,2}.lambda1` -> `ls{1,2}.gamma`, SwiGLU `weights_in/out` -> `mlp.fc1/fc2`, `layernorm` -> `norm`;
    `mask_token` (training only) is dropped. Register tokens (`Dinov2WithRegisters`) become `reg_token` with the class
    token's position folded in, as timm does for DINOv2 registers.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "embeddings.register_tokens": "register_tokens",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer_re = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
    layer_map = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "attention.output.dense.weight": "attn.proj.weight",
        "attention.output.dense.bias": "attn.proj.bias",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
        "mlp.weights_in.weight": "mlp.fc1.weight",
        "mlp.weights_in.bias": "mlp.fc1.bias",
        "mlp.weights_out.weight": "mlp.fc2.weight",
        "mlp.weights_out.bias": "mlp.fc2.bias",
    }
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            continue
        if k in simple:
            out[simple[k]] = v
            continue
        m = layer_re.fullmatch(k)
        if m is None:
            out[k] = v  # unknown key: kept, so the architecture check names it
            continue
        i, rest = m.group(1), m.group(2)
        qm = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if qm is not None:
            qkv.setdefault(f"blocks.{i}.attn.qkv.{qm.group(2)}", {})[qm.group(1)] = v
        elif rest in layer_map:
            out[f"blocks.{i}.{layer_map[rest]}"] = v
        else:
            out[f"blocks.{i}.{rest}"] = v
    for k, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            msg = f"The transformers checkpoint lacks {sorted({'query', 'key', 'value'} - set(parts))} for {k!r}."
            raise ValueError(msg)
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if "register_tokens" in out:
        out = convert_dinov2(out)
    return out


def convert_dinov2(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert the original DINOv2 layout (`mask_token`, `register_tokens`, SwiGLU `w12`/`w3`) to timm's.

    As timm's own DINOv2 conversion: registers become `reg_token`, the class token absorbs its position embedding
    and the position table keeps only the patch positions (timm's `no_embed_class` layout for register models).
    """
    out = dict(sd)
    out.pop("mask_token", None)
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.pop("pos_embed")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for k in list(out):
        m = re.fullmatch(r"(blocks\.\d+\.mlp\.)(w12|w3)\.(weight|bias)", k)
        if m is not None:
            out[f"{m.group(1)}{'fc1' if m.group(2) == 'w12' else 'fc2'}.{m.group(3)}"] = out.pop(k)
    return out


def to_timm_layout(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Detect a checkpoint's key layout and convert it to timm's: `(state_dict, layout)`.

    `layout` is `'hf-dinov2'` (transformers), `'dinov2'` (the original DINOv2 repository) or `'timm'`.
    """
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return convert_hf_dinov2(sd), "hf-dinov2"
    if "mask_token" in sd or "register_tokens" in sd or any(re.search(r"\.mlp\.w12\.", k) for k in sd):
        return convert_dinov2(sd), "dinov2"
    return dict(sd), "timm"


def _describe(shapes: Mapping[str, tuple]) -> str:
    """One line on the ViT a state_dict (key -> shape) holds."""
    pe = shapes.get("patch_embed.proj.weight")
    if pe is None or len(pe) != 4:
        return f"not a ViT checkpoint (no `patch_embed.proj.weight`; first keys {sorted(shapes)[:4]})"
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    reg = shapes.get("reg_token", (1, 0))[1]
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    fc2 = shapes.get("blocks.0.mlp.fc2.weight")
    mlp = "?"
    if fc1 is not None and fc2 is not None:
        mlp = f"SwiGLU {fc2[1]}" if fc2[1] * 2 == fc1[0] else f"MLP {fc1[0]}"
    return f"ViT embed {pe[0]}, depth {len(blocks)}, patch {pe[-1]}, {reg} register tokens, {mlp}"


_SHAPES: dict[str, dict[str, tuple]] = {}


def architecture_shapes(entry: PathologyModel) -> dict[str, tuple]:
    """Key -> shape of an entry's state_dict (from a meta-device build, cached per entry)."""
    key = repr(entry)
    if key not in _SHAPES:
        _SHAPES[key] = state_dict_shapes(create_vit(entry, meta=True).state_dict())
    return _SHAPES[key]


def _which_entries(theirs: Mapping[str, tuple], skip: str) -> list[str]:
    """Names of the registry entries whose architecture holds exactly these keys and shapes.

    Several can match: UNI and Phikon-v2 are both ViT-L/16 with LayerScale.
    """
    names = []
    for name, entry in PATHOLOGY_ENCODERS.items():
        if name == skip:
            continue
        try:
            own = architecture_shapes(entry)
        except Exception:  # noqa: BLE001 - a registry entry that cannot be built is simply no match
            continue
        if not any(state_dict_mismatch(own, theirs)):
            names.append(name)
    return names


def _resample_pos_embed(sd: dict, model: nn.Module, source: str) -> None:
    """Interpolate a position table trained at another grid (e.g. DINOv2 at 518 px) to the model's grid."""
    v = sd.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if v is None or own is None or v.ndim != 3 or v.shape == own.shape or v.shape[-1] != own.shape[-1]:
        return
    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    n_old = v.shape[1] - n_prefix
    side = int(round(n_old**0.5))
    if side * side != n_old:
        return
    from timm.layers import resample_abs_pos_embed

    sd["pos_embed"] = resample_abs_pos_embed(
        v, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=n_prefix
    )
    logg.info(
        f"    {source}: position embeddings resampled from a {side}x{side} to a {tuple(model.patch_embed.grid_size)} grid"
    )


def load_into_vit(entry: PathologyModel, sd: Mapping[str, torch.Tensor], *, source: str) -> nn.Module:
    """Build `entry`'s ViT on the meta device and load `sd` (any layout) into it; `ValueError` when it does not fit.

    The message lists the missing, unexpected and reshaped keys, describes the ViT the file holds and names the
    registry encoder it belongs to when one matches exactly.
    """
    sd, layout = to_timm_layout(sd)
    vit = create_vit(entry, meta=True)
    _resample_pos_embed(sd, vit, source)
    own, theirs = state_dict_shapes(vit.state_dict()), state_dict_shapes(sd)
    problem = mismatch_text(own, theirs)
    if problem:
        others = _which_entries(theirs, skip=entry.name)
        hint = (
            f" It fits the architecture of {', '.join(repr(n) for n in others)}: pass `encoder={others[0]!r}`"
            + (" (or the one it was trained as)." if len(others) > 1 else ".")
            if others
            else f" Pass the {entry.title} weights ({entry.url}) or the matching `encoder=`."
        )
        msg = (
            f"Weights {source!r} ({layout} layout) do not fit the encoder {entry.name!r} "
            f"({_describe(own)}): {problem}. The file holds a {_describe(theirs)}.{hint}"
        )
        raise ValueError(msg)
    vit.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - timm ViTs hold no non-persistent buffers today
        msg = f"Internal error: {left[:3]} were not loaded from {source!r}."
        raise RuntimeError(msg)
    return vit


def _hub_id(entry: PathologyModel, weights: str) -> str | None:
    """The HuggingFace repository named by `weights` (`'hub'`, `'hf-hub:org/name'`, `'org/name'`), else `None`."""
    w = weights.strip()
    if w.lower() == "hub":
        return entry.hub_id
    for prefix in ("hf-hub:", "hf_hub:"):
        if w.lower().startswith(prefix):
            return w[len(prefix) :]
    if w.lower() == entry.hub_id.lower() and not Path(w).expanduser().exists():
        return entry.hub_id
    return None


def _hub_error(entry: PathologyModel, hub_id: str, e: Exception) -> RuntimeError:
    gate = (
        f" The repository is gated: request access on https://huggingface.co/{hub_id} and log in "
        "(`hf auth login` or the HF_TOKEN environment variable)."
        if entry.gated
        else ""
    )
    msg = (
        f"Could not get the {entry.title} weights from the HuggingFace hub ({hub_id!r}; {type(e).__name__}: {e}).{gate}"
        f" Offline, download `{entry.weight_files[0]}` on a connected machine and pass `weights=<path>`."
    )
    return RuntimeError(msg)


def _from_hub(entry: PathologyModel, hub_id: str) -> nn.Module:
    """Weights from the hub: timm's `hf-hub:` loader (timm repositories) or `huggingface_hub` + conversion."""
    timm = _import_timm()
    if entry.hub_kwargs is None:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(hub_id, entry.weight_files[0])
        except Exception as e:  # network, auth and cache errors come in many types
            raise _hub_error(entry, hub_id, e) from e
        return load_into_vit(entry, read_checkpoint(path), source=f"hf-hub:{hub_id}")
    kwargs = {**_layer_classes(entry.hub_kwargs), "num_classes": 0, "dynamic_img_size": True}
    own = architecture_shapes(entry)
    try:
        vit = timm.create_model(f"hf-hub:{hub_id}", pretrained=True, **kwargs)
    except Exception as e:  # network, auth, cache and config errors come in many types
        if isinstance(e, RuntimeError) and "loading state_dict" in str(e):  # downloaded, but another architecture
            first = str(e).strip().splitlines()[1:2] or [str(e)]
            msg = (
                f"The weights of the hub model {hub_id!r} do not fit the {entry.title} architecture "
                f"({_describe(own)}; built with the model card's arguments): {first[0].strip()} Pass the `encoder=` "
                "the repository belongs to."
            )
            raise ValueError(msg) from e
        raise _hub_error(entry, hub_id, e) from e
    theirs = state_dict_shapes(vit.state_dict())
    if any(state_dict_mismatch(own, theirs)):
        msg = (
            f"The hub model {hub_id!r} is a {_describe(theirs)}; it does not fit the {entry.title} architecture "
            f"({_describe(own)}). Pass the `encoder=` the repository belongs to."
        )
        raise ValueError(msg)
    return vit
