"""Pathology foundation models (vision transformers built through timm) as image encoders.

:data:`PATHOLOGY_ENCODERS` maps a name (`'uni'`, `'uni2-h'`, `'h-optimus-0'`, `'h0-mini'`, `'virchow2'`,
`'phikon-v2'`, `'gigapath'`) to a :class:`PathologyModel`: the timm architecture and its arguments, the input size,
normalisation, the resolution it was trained at, its pooling, its widths, parameter count and licence, each with the
source it was taken from. :func:`build_pathology_encoder` builds one as a :class:`PathologyEncoder`, an
:class:`~histospace._nn._encoders.ImageEncoder` (`(B, 3, H, W)` floats in `[0, 1]` -> `(B, d)`, normalising itself)
that also gives the patch-token map (:meth:`PathologyEncoder.feature_map`). Weights come from a local file in the
formats the model cards publish (`pytorch_model.bin`, `model.safetensors`, HuggingFace-transformers DINOv2 layout for
Phikon-v2, the original DINOv2 layout), from the HuggingFace hub through timm's `hf-hub:` loader (`weights='hub'`), or
are random (`weights=None`, seeded, nothing downloaded).

Nothing heavy is imported at module level except torch (as in `_encoders`); timm, safetensors and huggingface_hub are
imported when a model is built.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from scanpy import logging as logg
from torch import nn

from histospace._nn._encoders import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder, _as_triplet

#: Bioptimus' H&E statistics (H-optimus-0 model card and `bioptimus/H-optimus-0` config.json `pretrained_cfg`)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pooling = Literal["cls", "cls+mean"]
_POOLINGS = ("cls", "cls+mean")
#: weight files looked for, in this order, in a folder (a HuggingFace snapshot or a download folder)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "checkpoint.pth")
#: wrappers around a state_dict in training checkpoints, in order of preference (DINOv2 keeps 'teacher' and 'student')
_WRAPPERS = ("state_dict", "model_state_dict", "model", "teacher", "module")
#: key prefixes removed when every key carries them (DataParallel, DINOv2 'backbone.', HF task models 'dinov2.')
_PREFIXES = ("module.", "backbone.", "dinov2.", "model.", "trunk.", "encoder.")
#: keys of heads that feature extraction does not use (DINO/iBOT projection heads, a classifier)
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")


def _swiglu():
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


def _silu():
    return nn.SiLU


@dataclass(frozen=True)
class PathologyModel:
    """One pathology foundation model: how to build it, feed it and pool it, and where it comes from.

    Attributes
    ----------
    name
        Registry key (`encoder=` name).
    title
        Name as published.
    arch
        timm architecture the model is built from (`timm.create_model(arch, **kwargs)`).
    kwargs
        timm arguments that make `arch` the published architecture. Values `'swiglu'` / `'silu'` stand for
        `timm.layers.SwiGLUPacked` / `torch.nn.SiLU` (resolved when built, so this module imports no timm).
    hub_id
        HuggingFace repository of the weights.
    hub_kwargs
        Arguments the model card passes to `timm.create_model('hf-hub:' + hub_id, pretrained=True, ...)`; `None` when
        the repository is not in timm's format (Phikon-v2, HuggingFace transformers): then `weights='hub'` downloads
        `weight_files[0]` with `huggingface_hub` and converts it.
    checkpoint
        Key layout of the published file: `'timm'` or `'hf-dinov2'` (transformers `Dinov2Model`).
    weight_files
        File names published in `hub_id`.
    mean, std
        Normalisation of RGB in `[0, 1]` the weights were trained with.
    input_size
        Side in pixels of the model input.
    mpp
        Micrometres per pixel of the slides the model was trained on (0.5 is 20x).
    tile_px
        Side, in pixels at `mpp`, of the tissue tile the reference pipeline feeds (resized to `input_size`):
        `tile_px * mpp` is the patch side in µm (:attr:`patch_size_um`).
    pooling
        `'cls'`: the class token after the final norm. `'cls+mean'`: the class token concatenated with the mean of
        the patch tokens (register tokens left out), as the model card recommends.
    embed_dim
        Token width.
    patch_size
        Side in pixels of a ViT patch (the stride of :meth:`PathologyEncoder.feature_map`).
    n_params
        Exact parameter count of the architecture (= the tensors of the published checkpoint), checked in the tests.
    n_params_published
        Parameter count as published, as written (`'1.1B'`, `'632M'`); see `sources`.
    license
        Licence of the weights.
    gated
        Whether the HuggingFace repository asks for an access request.
    commercial
        Whether the licence allows commercial use.
    sources
        Where each number comes from.
    """

    name: str
    title: str
    arch: str
    kwargs: Mapping = field(default_factory=dict)
    hub_id: str = ""
    hub_kwargs: Mapping | None = None
    checkpoint: Literal["timm", "hf-dinov2"] = "timm"
    weight_files: tuple[str, ...] = ("pytorch_model.bin",)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    mpp: float = 0.5
    tile_px: int = 224
    pooling: Pooling = "cls"
    embed_dim: int = 0
    patch_size: int = 16
    n_params: int = 0
    n_params_published: str = ""
    license: str = ""
    gated: bool = True
    commercial: bool = False
    sources: str = ""

    @property
    def out_dim(self) -> int:
        """Feature width `d` (`2 * embed_dim` for `'cls+mean'`)."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    @property
    def patch_size_um(self) -> float:
        """Side in µm of the tissue patch the model expects (`tile_px * mpp`): the default `patch_size_um`."""
        return float(self.tile_px * self.mpp)

    @property
    def published_params(self) -> tuple[float, float]:
        """`(count, half a unit of its last digit)` of :attr:`n_params_published` (`'1.1B'` -> `(1.1e9, 5e7)`)."""
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?([MB])", self.n_params_published)
        if m is None:
            msg = f"Unreadable published parameter count {self.n_params_published!r} of {self.name!r}."
            raise ValueError(msg)
        unit = 1e6 if m.group(3) == "M" else 1e9
        decimals = len(m.group(2) or "")
        value = float(f"{m.group(1)}.{m.group(2) or 0}") * unit
        return value, 0.5 * unit * 10.0**-decimals

    @property
    def url(self) -> str:
        """Model card."""
        return f"https://huggingface.co/{self.hub_id}"

    def timm_kwargs(self) -> dict:
        """`kwargs` with the layer names resolved to timm/torch classes, `num_classes=0` and `dynamic_img_size=True`.

        `dynamic_img_size` lets inputs of any size through (the position embeddings are interpolated); at
        `input_size` it changes nothing.
        """
        out = {"num_classes": 0, "dynamic_img_size": True}
        for k, v in self.kwargs.items():
            out[k] = {"swiglu": _swiglu, "silu": _silu}[v]() if v in ("swiglu", "silu") else v
        return out


_SWIGLU = {"mlp_layer": "swiglu", "act_layer": "silu"}

#: name -> :class:`PathologyModel`. Parameter counts: `n_params` is what the architecture below holds (the tests build
#: each on the meta device); `n_params_published` the figure published, which it matches to the published rounding
#: or within 1.5 % (the 307M quoted for ViT-L/16 models is the ViT paper's family figure, 1.2 % above the backbone).
PATHOLOGY_ENCODERS: dict[str, PathologyModel] = {
    m.name: m
    for m in (
        # UNI (Chen et al., Nat Med 2024): ViT-L/16, DINOv2. Architecture: timm args of mahmoodlab/UNI
        # uni/get_encoder/get_encoder.py and the HF card (`hf-hub:MahmoodLab/uni`, init_values=1e-5,
        # dynamic_img_size=True); ImageNet mean/std (card transform). 20x (0.5 µm/px) tiles of 256 px resized to 224:
        # TRIDENT (same lab) `--patch_encoder uni_v1 --patch_size 256 --mag 20`. Output: class token (card: (1, 1024)).
        # 307M is ViT-Large's size as published for the family (Dosovitskiy et al. 2021, Table 1; also quoted for
        # UNI); the checkpoint's own tensors sum to 303.35M (LazySlide's registry: '303.4M').
        PathologyModel(
            name="uni",
            title="UNI",
            arch="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
            hub_id="MahmoodLab/UNI",
            hub_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
            tile_px=256,
            embed_dim=1024,
            patch_size=16,
            n_params=303_350_784,
            n_params_published="307M",
            license="CC-BY-NC-ND-4.0 (non-commercial, academic research only; no redistribution)",
            sources="mahmoodlab/UNI README + get_encoder.py; HF card MahmoodLab/UNI; TRIDENT README (mag 20, 256 px)",
        ),
        # UNI2-h: ViT-H/14 with 8 register tokens and SwiGLU; timm args verbatim from the mahmoodlab/UNI README / HF
        # card (vit_giant_patch14_224 + embed 1536, depth 24, 24 heads, mlp_ratio 2.66667*2, SwiGLUPacked, SiLU,
        # reg_tokens 8, no_embed_class). ImageNet mean/std (card transform); 256 px at 20x (TRIDENT uni_v2). The card
        # gives no parameter count; 681.4M is LazySlide's registry figure (= the architecture's exact count).
        PathologyModel(
            name="uni2-h",
            title="UNI2-h",
            arch="vit_giant_patch14_224",
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                **_SWIGLU,
            },
            hub_id="MahmoodLab/UNI2-h",
            hub_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                **_SWIGLU,
            },
            tile_px=256,
            embed_dim=1536,
            patch_size=14,
            n_params=681_394_176,
            n_params_published="681.4M",
            license="CC-BY-NC-ND-4.0 (non-commercial, academic research only; no redistribution)",
            sources="mahmoodlab/UNI README (UNI2-h timm_kwargs); HF card MahmoodLab/UNI2-h; TRIDENT README; LazySlide",
        ),
        # H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers (DINOv2). HF config.json: architecture
        # vit_giant_patch14_reg4_dinov2, num_features 1536, global_pool token, input 224, mean/std below; card:
        # `hf-hub:bioptimus/H-optimus-0`, init_values=1e-5, "expects images of size 224x224 that were extracted at
        # 0.5 microns per pixel", "a 1.1B parameter vision transformer", licence Apache 2.0.
        PathologyModel(
            name="h-optimus-0",
            title="H-optimus-0",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs={"img_size": 224, "init_values": 1e-5},
            hub_id="bioptimus/H-optimus-0",
            hub_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            embed_dim=1536,
            patch_size=14,
            n_params=1_134_774_272,
            n_params_published="1.1B",
            license="Apache-2.0 (HF access form)",
            gated=True,
            commercial=True,
            sources="HF card + config.json bioptimus/H-optimus-0",
        ),
        # H0-mini (Filiot et al. 2025, arXiv 2501.16239): ViT-B/14 with 4 registers distilled from H-optimus-0. Card:
        # `hf-hub:bioptimus/H0-mini` with mlp_layer=SwiGLUPacked, act_layer=SiLU; output (1, 261, 768) = class +
        # 4 registers + 256 patch tokens at 224 px; features = cat(class token, mean of the patch tokens) (1, 1536);
        # H-optimus mean/std; 224 px at 20x (TRIDENT h0-mini). The hub config's mlp_ratio is not quoted in the
        # sources; SwiGLU hidden 2 x 2048 (mlp_ratio 2.66667*2, DINOv2's SwiGLU rule for width 768) is the one that
        # gives the published 85.7M (LazySlide registry; SwiGLUPacked at mlp_ratio 4 would give 71.6M).
        PathologyModel(
            name="h0-mini",
            title="H0-mini",
            arch="vit_base_patch14_reg4_dinov2",
            kwargs={"img_size": 224, "mlp_ratio": 2.66667 * 2, **_SWIGLU},
            hub_id="bioptimus/H0-mini",
            hub_kwargs={**_SWIGLU},
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            pooling="cls+mean",
            embed_dim=768,
            patch_size=14,
            n_params=85_739_520,
            n_params_published="85.7M",
            license="CC-BY-NC-ND-4.0 (non-commercial)",
            sources="HF card bioptimus/H0-mini (usage code); TRIDENT README + load.py; LazySlide registry (85.7M)",
        ),
        # Virchow2 (Zimmermann et al. 2024, arXiv 2408.00738: "Virchow2, a 632 million parameter vision
        # transformer"): ViT-H/14, 4 registers, SwiGLU. timm args of TRIDENT's local-checkpoint path and the card
        # (`hf-hub:paige-ai/Virchow2`, mlp_layer=SwiGLUPacked, act_layer=SiLU): vit_huge_patch14_224, init_values
        # 1e-5, reg_tokens 4, mlp_ratio 5.3375. Card embedding: cat(class token, mean of the patch tokens [5:]) (2560).
        # ImageNet mean/std; 224 px at 20x (TRIDENT; trained on mixed 5x-40x).
        PathologyModel(
            name="virchow2",
            title="Virchow2",
            arch="vit_huge_patch14_224",
            kwargs={"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, **_SWIGLU},
            hub_id="paige-ai/Virchow2",
            hub_kwargs={**_SWIGLU},
            pooling="cls+mean",
            embed_dim=1280,
            patch_size=14,
            n_params=631_239_424,
            n_params_published="632M",
            license="CC-BY-NC-ND-4.0 (non-commercial)",
            sources="arXiv 2408.00738; HF card paige-ai/Virchow2; TRIDENT load.py (timm_kwargs, pooling)",
        ),
        # Phikon-v2 (Filiot et al. 2024, arXiv 2409.09173): ViT-L/16 trained with DINOv2 on 224 px tiles at 20x
        # (0.5 µm/px), no registers, ImageNet mean/std; published as a transformers `Dinov2Model`
        # (`model.safetensors`); features = last_hidden_state[:, 0] (1024). Rebuilt here as timm's ViT-L/16 with
        # LayerScale; the transformers keys are converted (inverse of transformers' convert_dinov2_to_hf.py). 307M is
        # the count quoted for the paper's ViT-L/16; the checkpoint's tensors sum to 303.35M (+ a 1024-d mask token
        # used only in training; LazySlide: 303.4M).
        PathologyModel(
            name="phikon-v2",
            title="Phikon-v2",
            arch="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1.0},
            hub_id="owkin/phikon-v2",
            hub_kwargs=None,
            checkpoint="hf-dinov2",
            weight_files=("model.safetensors",),
            embed_dim=1024,
            patch_size=16,
            n_params=303_350_784,
            n_params_published="307M",
            license="Owkin non-commercial licence (research use; not gated)",
            gated=False,
            sources="arXiv 2409.09173 (ViT-L/16, 224 px at 20x); HF card owkin/phikon-v2; TRIDENT load.py",
        ),
        # Prov-GigaPath tile encoder (Xu et al., Nature 2024): ViT-g DINOv2-style with 16 px patches. timm args of
        # TRIDENT's local-checkpoint path (= the HF config's model_args): vit_giant_patch14_dinov2 with patch 16,
        # embed 1536, depth 40, 24 heads, mlp_ratio 5.33334 (SwiGLUPacked, SiLU, init_values 1e-5 from the arch).
        # README: `timm.create_model("hf_hub:prov-gigapath/prov-gigapath", pretrained=True)`, Resize(256) +
        # CenterCrop(224) of 256 px tiles at 0.5 µm/px ("trained with 0.5 mpp"), ImageNet mean/std: the model sees
        # the central 224 px (112 µm). Class token (1536). 1.13B: LazySlide registry / paper summaries.
        PathologyModel(
            name="gigapath",
            title="Prov-GigaPath",
            arch="vit_giant_patch14_dinov2",
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },
            hub_id="prov-gigapath/prov-gigapath",
            hub_kwargs={},
            embed_dim=1536,
            patch_size=16,
            n_params=1_134_953_984,
            n_params_published="1.13B",
            license="Apache-2.0 with research-only terms (HF access form; no clinical or deployed use)",
            sources="prov-gigapath/prov-gigapath README + demo; TRIDENT load.py (timm_kwargs); LazySlide (1.13B)",
        ),
    )
}


def get_pathology_model(name: str) -> PathologyModel:
    """The registry entry of `name` (case-insensitive); `ValueError` naming the choices for an unknown name."""
    if not isinstance(name, str):
        msg = f"A pathology encoder name must be a string, got {type(name).__name__}."
        raise TypeError(msg)
    key = name.lower()
    if key not in PATHOLOGY_ENCODERS:
        msg = f"Unknown pathology encoder {name!r}; choose one of {sorted(PATHOLOGY_ENCODERS)}."
        raise ValueError(msg)
    return PATHOLOGY_ENCODERS[key]


def is_pathology_encoder(name) -> bool:
    """Whether `name` is a registry name (so `build_encoder` dispatches it here)."""
    return isinstance(name, str) and name.lower() in PATHOLOGY_ENCODERS


def _import_timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        msg = "The pathology encoders are built with timm; install it with `pip install 'timm>=1.0.3'`."
        raise ImportError(msg) from e
    return timm


def create_vit(model: str | PathologyModel, *, meta: bool = False, random_state: int | None = 0) -> nn.Module:
    """Build the timm ViT of a registry entry at random initialisation (no download).

    Parameters
    ----------
    model
        Registry name or entry.
    meta
        Build on torch's meta device: shapes only, no memory, no initialisation (parameter counts, key checks).
    random_state
        Seed of the initialisation (the global torch generator is left untouched); `None`: unseeded.
    """
    entry = get_pathology_model(model) if isinstance(model, str) else model
    timm = _import_timm()
    kwargs = entry.timm_kwargs()
    if meta:  # shapes only: timm's initialisation is skipped (it costs ~1 s per giant model even on meta)
        with torch.device("meta"):
            try:
                return timm.create_model(entry.arch, pretrained=False, weight_init="skip", **kwargs)
            except (AssertionError, TypeError, ValueError):  # timm versions without weight_init='skip'
                return timm.create_model(entry.arch, pretrained=False, **kwargs)
    with torch.random.fork_rng(devices=[]):
        if random_state is not None:
            torch.manual_seed(int(random_state))
        return timm.create_model(entry.arch, pretrained=False, **kwargs)


def count_parameters(model: str | PathologyModel) -> int:
    """Parameter count of a registry entry's architecture, from a meta-device build (allocates nothing)."""
    return sum(p.numel() for p in create_vit(model, meta=True).parameters())


class ViTTrunk(nn.Module):
    """A timm ViT as a trunk: normalised `(B, 3, H, W)` -> pooled `(B, d)`, or the patch-token map.

    Parameters
    ----------
    vit
        timm `VisionTransformer` (`num_classes=0`, `dynamic_img_size=True`).
    pooling
        `'cls'` or `'cls+mean'` (class token concatenated with the mean of the patch tokens; registers excluded).
    """

    def __init__(self, vit: nn.Module, *, pooling: Pooling = "cls"):
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"`pooling` must be one of {_POOLINGS}, got {pooling!r}."
            raise ValueError(msg)
        self.vit = vit
        self.pooling = pooling
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.embed_dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])

    @property
    def out_dim(self) -> int:
        """Width of the pooled features."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: `(B, prefix + h * w, C)` (class, registers, patches).

        Sides that are not multiples of the patch size are cropped to the largest multiple (bottom/right).
        """
        p = self.patch_size
        height, width = x.shape[-2] // p * p, x.shape[-1] // p * p
        if height == 0 or width == 0:
            msg = f"The input ({x.shape[-2]} x {x.shape[-1]} px) is smaller than one ViT patch ({p} px)."
            raise ValueError(msg)
        if (height, width) != tuple(x.shape[-2:]):
            x = x[..., :height, :width]
        return self.vit.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features `(B, d)` of a normalised batch."""
        t = self.tokens(x)
        cls = t[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, t[:, self.num_prefix_tokens :].mean(dim=1)], dim=1)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid `(h, w)` of an input of `height x width` pixels (`floor(side / patch_size)`)."""
        return int(height) // self.patch_size, int(width) // self.patch_size

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a map `(B, C, H // p, W // p)` (class and register tokens dropped), `p = patch_size`."""
        b, _, height, width = x.shape
        h, w = self.grid_size(height, width)
        t = self.tokens(x)[:, self.num_prefix_tokens :]
        return t.transpose(1, 2).reshape(b, t.shape[-1], h, w)


class PathologyEncoder(ImageEncoder):
    """An :class:`~histospace._nn._encoders.ImageEncoder` around a pathology ViT.

    `forward`: `(B, 3, H, W)` floats in `[0, 1]` -> `(B, d)` (normalised with the model's mean/std, pooled as its
    card says). :meth:`feature_map`: the patch-token map `(B, embed_dim, H // p, W // p)`. Attributes `pooling`,
    `patch_size` (p), `mpp`, `input_size`, `patch_size_um` and `model` (the registry entry) describe it.
    """

    def __init__(self, trunk: ViTTrunk, model: PathologyModel, *, mean, std, weights: str):
        super().__init__(trunk, out_dim=trunk.out_dim, mean=mean, std=std, name=model.name, weights=weights)
        self.model = model
        self.pooling = trunk.pooling
        self.patch_size = trunk.patch_size
        self.embed_dim = trunk.embed_dim
        self.mpp = float(model.mpp)
        self.input_size = int(model.input_size)
        self.patch_size_um = model.patch_size_um

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(B, 3, H, W)` floats in `[0, 1]` to patch tokens `(B, embed_dim, H // p, W // p)`.

        Every token attends to the whole input (global self-attention), so unlike a CNN map a token depends on all of
        the tile, not only on its own `p x p` pixels; tiles of the model's `input_size` (or near it) at its `mpp` keep
        the tokens closest to what the model was trained on. Sides that are not multiples of `p` are floored.
        """
        x = (x - self.mean) / self.std
        return self.backbone.feature_map(x)


# ---- checkpoints ---------------------------------------------------------------------------------------------------


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


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _mismatch(own: Mapping[str, tuple], theirs: Mapping[str, tuple]) -> tuple[list, list, list]:
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    bad = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
    return missing, unexpected, bad


_SHAPES: dict[str, dict[str, tuple]] = {}


def architecture_shapes(entry: PathologyModel) -> dict[str, tuple]:
    """Key -> shape of an entry's state_dict (from a meta-device build, cached per entry)."""
    key = repr(entry)
    if key not in _SHAPES:
        _SHAPES[key] = _shapes(create_vit(entry, meta=True).state_dict())
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
        if not any(_mismatch(own, theirs)):
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
    own, theirs = _shapes(vit.state_dict()), _shapes(sd)
    missing, unexpected, bad = _mismatch(own, theirs)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if bad:
            parts.append(
                f"{len(bad)} keys with another shape (e.g. "
                + ", ".join(f"{k}: file {theirs[k]} vs {own[k]}" for k in bad[:2])
                + ")"
            )
        others = _which_entries(theirs, skip=entry.name)
        hint = (
            f" It fits the architecture of {', '.join(repr(n) for n in others)}: pass `encoder={others[0]!r}`"
            + (" (or the one it was trained as)." if len(others) > 1 else ".")
            if others
            else f" Pass the {entry.title} weights ({entry.url}) or the matching `encoder=`."
        )
        msg = (
            f"Weights {source!r} ({layout} layout) do not fit the encoder {entry.name!r} "
            f"({_describe(own)}): {'; '.join(parts)}. The file holds a {_describe(theirs)}.{hint}"
        )
        raise ValueError(msg)
    vit.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - timm ViTs hold no non-persistent buffers today
        msg = f"Internal error: {left[:3]} were not loaded from {source!r}."
        raise RuntimeError(msg)
    return vit


# ---- hub ------------------------------------------------------------------------------------------------------------


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
    kwargs = {
        **{k: (_swiglu() if v == "swiglu" else _silu() if v == "silu" else v) for k, v in entry.hub_kwargs.items()},
        "num_classes": 0,
        "dynamic_img_size": True,
    }
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
    theirs = _shapes(vit.state_dict())
    if any(_mismatch(own, theirs)):
        msg = (
            f"The hub model {hub_id!r} is a {_describe(theirs)}; it does not fit the {entry.title} architecture "
            f"({_describe(own)}). Pass the `encoder=` the repository belongs to."
        )
        raise ValueError(msg)
    return vit


# ---- builder --------------------------------------------------------------------------------------------------------


def build_pathology_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    mean=None,
    std=None,
    pooling: Pooling | None = None,
    random_state: int | None = 0,
    layers: str = "last",
    tf_padding: bool = False,
) -> tuple[PathologyEncoder, int, dict]:
    """Build a pathology foundation model as an image encoder: `(B, 3, H, W)` RGB in `[0, 1]` -> `(B, d)`.

    Parameters
    ----------
    name
        A key of :data:`PATHOLOGY_ENCODERS`: `'uni'`, `'uni2-h'`, `'h-optimus-0'`, `'h0-mini'`, `'virchow2'`,
        `'phikon-v2'`, `'gigapath'`.
    weights
        `None`: random initialisation seeded with `random_state` (nothing is downloaded). A path: the model's weights
        file as published (`pytorch_model.bin`, `model.safetensors`; Phikon-v2's transformers layout and the original
        DINOv2 layout are converted), or a folder holding one (a HuggingFace snapshot). `'hub'`, `'hf-hub:<org/name>'`
        or the repository name: download through timm's `hf-hub:` loader (Phikon-v2: `huggingface_hub`), cached in
        the HuggingFace cache; gated repositories need an accepted access request and a login.
    mean, std
        Normalisation of the `[0, 1]` input; `None` uses the model's (see :class:`PathologyModel`).
    pooling
        `'cls'` or `'cls+mean'`; `None` uses the model card's.
    random_state
        Seed of the random initialisation.
    layers, tf_padding
        Options of the CNN encoders; only `'last'` / `False` apply to a ViT.

    Returns
    -------
    `(encoder, d, info)`: the :class:`PathologyEncoder` in eval mode on the CPU, the feature width and `info` with
    `encoder`, `weights` (`'random'`, the file path or `'hf-hub:<repo>'`), `mean`, `std`, `pooling`, `mpp`,
    `input_size`, `patch_size_um` (default patch side in µm), `token_size` (ViT patch side in pixels) and `out_dim`.
    """
    entry = get_pathology_model(name)
    if layers != "last":
        msg = (
            f"`layers={layers!r}` applies to the CNN encoders only; the pathology encoder {entry.name!r} takes 'last'."
        )
        raise ValueError(msg)
    if tf_padding:
        msg = f"`tf_padding=True` applies to the CNN encoders only, not to the pathology encoder {entry.name!r}."
        raise ValueError(msg)
    pool = entry.pooling if pooling is None else pooling
    if pool not in _POOLINGS:
        msg = f"`pooling` must be one of {_POOLINGS} or None, got {pooling!r}."
        raise ValueError(msg)
    mean_t = _as_triplet(entry.mean if mean is None else mean, "mean")
    std_t = _as_triplet(entry.std if std is None else std, "std")

    if weights is None:
        label = "random"
        vit = create_vit(entry, random_state=random_state)
    elif isinstance(weights, str | os.PathLike):
        hub = _hub_id(entry, str(weights)) if isinstance(weights, str) else None
        if isinstance(weights, str) and weights.strip().lower() == "imagenet":
            msg = (
                f"The pathology encoder {entry.name!r} has no ImageNet weights. Pass `weights=` the path of its "
                f"weights file ({entry.url}), `weights='hub'` to download it, or `weights=None` for random init."
            )
            raise ValueError(msg)
        if hub is not None:
            label = f"hf-hub:{hub}"
            start = logg.info(f"loading {entry.title} weights from the HuggingFace hub ({hub})")
            vit = _from_hub(entry, hub)
            logg.info("    loaded", time=start)
        else:
            path = Path(weights).expanduser().resolve()
            label = str(path)
            start = logg.info(f"loading {entry.title} weights from {label}")
            vit = load_into_vit(entry, read_checkpoint(path), source=label)
            logg.info("    loaded", time=start)
    else:
        msg = f"`weights` must be a file path, 'hub' or None, got {type(weights).__name__}."
        raise TypeError(msg)

    trunk = ViTTrunk(vit, pooling=pool)
    enc = PathologyEncoder(trunk, entry, mean=mean_t, std=std_t, weights=label)
    enc.eval()
    d = trunk.out_dim
    info = {
        "encoder": entry.name,
        "weights": label,
        "mean": list(mean_t),
        "std": list(std_t),
        "pooling": pool,
        "mpp": float(entry.mpp),
        "input_size": int(entry.input_size),
        "patch_size_um": float(entry.patch_size_um),
        "token_size": int(trunk.patch_size),
        "out_dim": int(d),
    }
    return enc, d, info


def replace_model(model: PathologyModel, **changes) -> PathologyModel:
    """A copy of a registry entry with some fields changed (`kwargs` entries are merged, not replaced)."""
    if "kwargs" in changes:
        changes["kwargs"] = {**model.kwargs, **changes["kwargs"]}
    return dataclasses.replace(model, **changes)
