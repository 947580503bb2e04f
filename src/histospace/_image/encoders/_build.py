"""Build an image encoder by name or from a module: the one entry of the encoders (registry -> build).

:mod:`._torchvision` holds the torchvision CNNs and the :class:`ImageEncoder` wrapper, :mod:`._registry` the
pathology foundation models (timm ViTs), :mod:`._weights` their checkpoints and :mod:`._pathology` their encoder.
None of them imports this module, which picks between them, so the encoders form no import circle.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from histospace._image.encoders._pathology import PATHOLOGY_ENCODERS, build_pathology_encoder
from histospace._image.encoders._registry import is_pathology_encoder
from histospace._image.encoders._torchvision import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGES,
    ImageEncoder,
    _as_triplet,
    _imagenet_state_dict,
    _load_into,
    _tf_same_padding,
    _torchvision_model,
    _trunk,
    check_encoder_options,
    known_normalization,
    load_state_dict_file,
)

__all__ = ["build_encoder"]


def build_encoder(
    name_or_module: str | nn.Module,
    weights: str | os.PathLike | None = None,
    mean=None,
    std=None,
    *,
    random_state: int | None = 0,
    tf_padding: bool = False,
    input_size: int = 224,
    layers: str = "last",
) -> tuple[ImageEncoder, int, dict]:
    """Build an image encoder: `(B, 3, H, W)` float RGB in `[0, 1]` -> `(B, d)` features.

    Parameters
    ----------
    name_or_module
        `'densenet121'` (d = 1024), `'resnet50'` (2048) or `'mobilenet_v2'` (1280): torchvision architectures with
        the classifier removed and global average pooling (DenseNet: after its final ReLU, as torchvision does).
        Or any `torch.nn.Module` taking normalised `(B, 3, H, W)` input and returning `(B, d)` or a map
        `(B, d, h, w)` (then averaged over `h, w`); `d` is found with one forward pass at `input_size`.
        Or a pathology foundation model of :data:`~histospace._image.encoders._pathology.PATHOLOGY_ENCODERS` (`'uni'`,
        `'uni2-h'`, `'h-optimus-0'`, `'h0-mini'`, `'virchow2'`, `'phikon-v2'`, `'gigapath'`), built by
        :func:`~histospace._image.encoders._pathology.build_pathology_encoder` (its own `weights=`, mean/std and `info`).
    weights
        `'imagenet'`: torchvision's `IMAGENET1K_V1` weights (downloaded and cached by torchvision; offline it raises
        `ConnectionError` suggesting a local file). A path: a state_dict with torchvision keys (read with
        `weights_only=True`; a `'state_dict'`/`'model'` wrapper and a `'module.'` prefix are removed; classifier keys
        `classifier.*`/`fc.*` are ignored). `None`: random initialisation seeded with `random_state` (a user module is
        used as given).
    mean, std
        Per-channel normalisation of the `[0, 1]` input. `None` uses the statistics of a known weights file (see
        :data:`~histospace._image.encoders._torchvision.KNOWN_WEIGHTS`: the TF-converted ImageNet MobileNetV2 of the shared weights folder takes
        `x / 127.5 - 1`, i.e. `mean=std=0.5`), else ImageNet's mean/std (`(0.485, 0.456, 0.406)` /
        `(0.229, 0.224, 0.225)`), right for torchvision weights.
    random_state
        Seed for random initialisation (`weights=None`); the global torch generator is left untouched.
    tf_padding
        Pad stride-2 convolutions like TensorFlow 'SAME' (for weights converted from TensorFlow).
    input_size
        Patch size used to infer `d` of a user module.
    layers
        `'last'`: pool the trunk's final map. `'stages'` (named encoders): pool the output of each stage (see
        :data:`~histospace._image.encoders._torchvision.STAGES`) and concatenate them: texture-level features of the early stages next to the late ones.

    Returns
    -------
    `(encoder, d, info)`: the :class:`~histospace._image.encoders._torchvision.ImageEncoder` in eval mode on the CPU, the feature width, and
    `info = {'encoder': name, 'weights': 'imagenet' | path | 'random' | 'module', 'mean': [...], 'std': [...]}`.
    """
    check_encoder_options(name_or_module, layers=layers, tf_padding=tf_padding)
    if is_pathology_encoder(name_or_module):  # pathology foundation models (timm ViTs): see `_pathology`
        return build_pathology_encoder(
            name_or_module, weights, mean=mean, std=std, random_state=random_state, layers=layers, tf_padding=tf_padding
        )
    if isinstance(name_or_module, nn.Module):
        module = name_or_module
        name = type(module).__name__
        if weights is None:
            label = "module"
        elif isinstance(weights, str) and weights == "imagenet":
            msg = "`weights='imagenet'` works only with a named encoder; load the weights into your module yourself."
            raise ValueError(msg)
        else:
            label = str(Path(weights).expanduser().resolve())
            _load_into(module, load_state_dict_file(weights), source=label, drop_classifier=False)
        trunk, final_relu = module, False
    elif isinstance(name_or_module, str):
        name = name_or_module.lower()
        if name not in ENCODERS:
            msg = (
                f"Unknown encoder {name_or_module!r}; choose one of {sorted(ENCODERS)}, a pathology model "
                f"{sorted(PATHOLOGY_ENCODERS)}, or pass a torch.nn.Module."
            )
            raise ValueError(msg)
        if weights is None:
            label = "random"
            with torch.random.fork_rng(devices=[]):
                if random_state is not None:
                    torch.manual_seed(int(random_state))
                model = _torchvision_model(name)
        else:
            model = _torchvision_model(name)
            if isinstance(weights, str) and weights == "imagenet":
                label = "imagenet"
                _load_into(model, _imagenet_state_dict(name), source=f"{name} ImageNet", drop_classifier=False)
            elif isinstance(weights, str | os.PathLike):
                label = str(Path(weights).expanduser().resolve())
                _load_into(model, load_state_dict_file(weights), source=label, drop_classifier=True)
            else:
                msg = f"`weights` must be 'imagenet', a file path or None, got {type(weights).__name__}."
                raise TypeError(msg)
        trunk, final_relu = _trunk(name, model)
    else:
        msg = (
            f"`encoder` must be a name ({sorted(ENCODERS)}) or a torch.nn.Module, got {type(name_or_module).__name__}."
        )
        raise TypeError(msg)

    known = known_normalization(weights) if mean is None or std is None else None
    mean_t = _as_triplet(mean if mean is not None else (known[0] if known else IMAGENET_MEAN), "mean")
    std_t = _as_triplet(std if std is not None else (known[1] if known else IMAGENET_STD), "std")
    if tf_padding:
        _tf_same_padding(trunk)
    taps = STAGES[name][0] if layers == "stages" else None
    enc = ImageEncoder(
        trunk, out_dim=1, mean=mean_t, std=std_t, name=name, weights=label, final_relu=final_relu, taps=taps
    )
    enc.eval()
    if isinstance(name_or_module, str):
        d = STAGES[name][1] if layers == "stages" else ENCODERS[name][2]
    else:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = next(iter(module.parameters()), None)
            dev = p.device if p is not None else torch.device("cpu")
            try:
                y = enc.to(dev)(torch.zeros(1, 3, input_size, input_size, device=dev))
            except Exception as e:  # any failure of the user module
                msg = (
                    f"The encoder module {name} failed on a (1, 3, {input_size}, {input_size}) input "
                    f"({type(e).__name__}: {e}); it must map (B, 3, H, W) images to (B, d) or (B, d, h, w)."
                )
                raise ValueError(msg) from e
        d = int(y.shape[1])
    enc.out_dim = d
    info = {"encoder": name, "weights": label, "mean": list(mean_t), "std": list(std_t)}
    if tf_padding:
        info["tf_padding"] = True
    if layers != "last":
        info["layers"] = layers
    return enc, d, info
