"""The registry of pathology foundation models: one :class:`PathologyModel` per name, and their timm architectures.

:data:`PATHOLOGY_ENCODERS` maps a name to how the model is built (timm architecture and arguments), fed (input size,
normalisation, resolution), pooled, how large it is and under which licence, each with its source.
:func:`create_vit` builds an entry's architecture at random initialisation or on the meta device (no download).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from histospace._image.encoders._torchvision import IMAGENET_MEAN, IMAGENET_STD

#: Bioptimus' H&E statistics (H-optimus-0 model card and `bioptimus/H-optimus-0` config.json `pretrained_cfg`)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pooling = Literal["cls", "cls+mean"]
_POOLINGS = ("cls", "cls+mean")


def _swiglu():
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


def _silu():
    return nn.SiLU


def _layer_classes(kwargs: Mapping) -> dict:
    """`kwargs` with the values `'swiglu'` / `'silu'` replaced by `timm.layers.SwiGLUPacked` / `torch.nn.SiLU`."""
    return {k: {"swiglu": _swiglu, "silu": _silu}[v]() if v in ("swiglu", "silu") else v for k, v in kwargs.items()}


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
        return {"num_classes": 0, "dynamic_img_size": True, **_layer_classes(self.kwargs)}


_SWIGLU = {"mlp_layer": "swiglu", "act_layer": "silu"}
#: UNI2-h's timm arguments (sources at its entry); its hub load adds `dynamic_img_size=True`
_UNI2_H = {
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
}

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
            kwargs=dict(_UNI2_H),
            hub_id="MahmoodLab/UNI2-h",
            hub_kwargs={**_UNI2_H, "dynamic_img_size": True},
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


def replace_model(model: PathologyModel, **changes) -> PathologyModel:
    """A copy of a registry entry with some fields changed (`kwargs` entries are merged, not replaced)."""
    if "kwargs" in changes:
        changes["kwargs"] = {**model.kwargs, **changes["kwargs"]}
    return dataclasses.replace(model, **changes)
