"""Image encoders for H&E patches: torchvision backbones (classifier removed, global average pooling) or any module.

:func:`~histospace._image.encoders._build.build_encoder` builds them for `pp.image_features` (frozen features) and
mclSTExp (fine-tuning). The returned :class:`ImageEncoder` maps an RGB batch `(B, 3, H, W)` float in `[0, 1]` to
`(B, d)` features; it normalises the input itself (`(x - mean) / std`, the statistics the weights were trained with),
so callers only scale to `[0, 1]`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: encoder name -> (torchvision constructor, weight enum name, feature width)
ENCODERS = {
    "densenet121": ("densenet121", "DenseNet121_Weights", 1024),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights", 1280),
}
#: encoder name -> (indices of the trunk's children whose outputs are the stage outputs pooled by `layers='stages'`,
#: their total width). MobileNetV2: the ends of its bottleneck stages 2-7 (24, 32, 64, 96, 160, 320 channels; the
#: 16-channel first stage and the final 1x1 expansion to 1280 are left out); ResNet-50: layer1-layer4 (256, 512, 1024, 2048); DenseNet-121: the three
#: transitions and the final norm (128, 256, 512, 1024).
STAGES = {
    "mobilenet_v2": ((3, 6, 10, 13, 16, 17), 696),
    "resnet50": ((4, 5, 6, 7), 3840),
    "densenet121": ((5, 7, 9, 11), 1920),
}
#: weight files whose input normalisation is known (SHA-256 of the file -> mean, std of inputs in [0, 1]): used when
#: `mean`/`std` are not given. The TF-converted ImageNet MobileNetV2 (google-coral/test_data, the shared weights
#: folder) expects `x / 127.5 - 1`.
KNOWN_WEIGHTS = {
    "6b0398544a2505f102dd61afb70dfc85bf5817a8672ccff805e78ed846022b90": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


#: SHA-256 of weights files trained with TensorFlow 'SAME' padding (see `tf_padding` of `hs.pp.image_features`)
KNOWN_TF_PADDING = {"6b0398544a2505f102dd61afb70dfc85bf5817a8672ccff805e78ed846022b90"}


def _sha256(weights) -> str | None:
    import hashlib

    if not isinstance(weights, str | os.PathLike):
        return None
    p = Path(weights).expanduser()
    if not p.is_file() or p.stat().st_size > 2**30:
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def known_normalization(weights) -> tuple[tuple, tuple] | None:
    """`(mean, std)` of a known weights file (by its SHA-256), else `None`."""
    return KNOWN_WEIGHTS.get(_sha256(weights))


def trained_with_tf_padding(weights) -> bool:
    """Whether `weights` is a known file of weights trained with TensorFlow 'SAME' padding (by its SHA-256)."""
    return _sha256(weights) in KNOWN_TF_PADDING


#: keys of the torchvision classifiers, ignored when a state_dict is loaded
_CLASSIFIER_PREFIXES = ("classifier.", "fc.")


class ImageEncoder(nn.Module):
    """Normalise, run a backbone, global-average-pool: `(B, 3, H, W)` in `[0, 1]` -> `(B, out_dim)`.

    Attributes
    ----------
    backbone
        The convolutional trunk (trainable; `requires_grad` is left as constructed).
    out_dim
        Feature width `d`.
    name
        Encoder name (`'densenet121'`, ..., or the class name of a user module).
    weights
        What the weights are: `'imagenet'`, a file path, `'random'` or `'module'` (a user module as given).
    mean, std
        Per-channel normalisation applied to the `[0, 1]` input.
    taps
        `None`: pool the trunk's output. Else indices of the trunk's children (an `nn.Sequential`) whose outputs are
        each average-pooled and concatenated (multi-layer features, `layers='stages'`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name: str = "module",
        weights: str = "module",
        final_relu: bool = False,
        taps: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.taps = None if taps is None else tuple(int(t) for t in taps)
        self.out_dim = int(out_dim)
        self.name = name
        self.weights = weights
        self.final_relu = final_relu
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def normalization(self) -> dict:
        """`{'mean': (r, g, b), 'std': (r, g, b)}` applied to inputs in `[0, 1]`."""
        return {
            "mean": tuple(float(v) for v in self.mean.flatten()),
            "std": tuple(float(v) for v in self.std.flatten()),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(B, 3, H, W)` floats in `[0, 1]` to `(B, out_dim)` features."""
        x = (x - self.mean) / self.std
        if self.taps is not None:
            return self._pooled_taps(x)
        y = self.backbone(x)
        if self.final_relu:
            y = F.relu(y)
        if y.ndim == 4:
            y = y.mean(dim=(2, 3))
        elif y.ndim != 2:
            y = y.flatten(1)
        return y

    def _pooled_taps(self, x: torch.Tensor) -> torch.Tensor:
        children = list(self.backbone.named_children())
        fast_dense = isinstance(self.backbone, DenseNetFeatures) and not self.training
        last, outs = len(children) - 1, []
        for i, (name, mod) in enumerate(children[: max(self.taps) + 1]):
            x = self.backbone.run_child(name, mod, x) if fast_dense else mod(x)
            if i in self.taps:
                y = F.relu(x) if self.final_relu and i == last else x
                outs.append(y.mean(dim=(2, 3)))
        return torch.cat(outs, dim=1)


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, ENCODERS[name][0])(weights=None)


class DenseNetFeatures(nn.Sequential):
    """torchvision's `DenseNet.features` (same modules and state_dict keys) with a faster forward in eval mode.

    In training mode the forward is torchvision's. In eval mode every dense block writes its layers' outputs into one
    preallocated buffer instead of concatenating all earlier outputs again for each layer, and applies each layer's
    first BatchNorm + ReLU as one affine op on a view of that buffer: same output up to float rounding, about 25%
    faster on a CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the trunk: `(B, 3, H, W)` -> `(B, 1024, H / 32, W / 32)` (before the final ReLU)."""
        if self.training:
            return super().forward(x)
        for name, mod in self.named_children():
            x = self.run_child(name, mod, x)
        return x

    def run_child(self, name: str, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one child module in eval mode (dense blocks through the preallocated buffer)."""
        return self._dense_block(mod, x) if name.startswith("denseblock") else mod(x)

    @staticmethod
    def _dense_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layers = list(block.children())
        n, c, h, w = x.shape
        growth = layers[0].conv2.out_channels
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        buf = torch.empty((n, c + growth * len(layers), h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        buf[:, :c] = x
        for layer in layers:
            bn = layer.norm1
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            y = torch.addcmul(shift.view(1, -1, 1, 1), buf[:, :c], scale.view(1, -1, 1, 1)).clamp_min_(0)
            y = layer.conv2(layer.relu2(layer.norm2(layer.conv1(y))))
            buf[:, c : c + growth] = y
            c += growth
        return buf


def _trunk(name: str, model: nn.Module) -> tuple[nn.Module, bool]:
    """The convolutional trunk of a torchvision classifier and whether a ReLU follows it (DenseNet)."""
    if name == "resnet50":
        return nn.Sequential(*list(model.children())[:-2]), False
    if name == "densenet121":
        return DenseNetFeatures(OrderedDict(model.features.named_children())), True
    return model.features, False


def _imagenet_state_dict(name: str) -> dict:
    import torchvision

    enum = getattr(torchvision.models, ENCODERS[name][1])
    w = enum.IMAGENET1K_V1
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, RuntimeError)
        msg = (
            f"Could not download the ImageNet weights of {name!r} through torchvision ({type(e).__name__}: {e}). "
            "This machine may be offline. Pass `weights=` a local state_dict file (torchvision keys; e.g. "
            f"`torch.save(torchvision.models.{ENCODERS[name][0]}(weights='IMAGENET1K_V1').state_dict(), path)` on a "
            "connected machine) together with its `mean=`/`std=`, or `weights=None` for random initialisation."
        )
        raise ConnectionError(msg) from e


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a weights file as a state_dict (`torch.load(weights_only=True)`), unwrapping `state_dict`/`model` keys.

    Raises `FileNotFoundError` for a missing file and `ValueError` for a file that is not a state_dict.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        msg = (
            f"Weights file {str(p)!r} not found. Pass the path of a torch state_dict (torchvision keys), "
            "`weights='imagenet'` (download) or `weights=None` (random init)."
        )
        raise FileNotFoundError(msg)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        msg = (
            f"Could not read weights file {str(p)!r} as a torch state_dict ({type(e).__name__}: {e}). The file may "
            "be corrupt or a pickled module; save `model.state_dict()` with `torch.save` and pass that file."
        )
        raise ValueError(msg) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()) or not sd:
        msg = (
            f"Weights file {str(p)!r} does not hold a state_dict (a dict of tensors); got {type(sd).__name__}. "
            "Save `model.state_dict()` with `torch.save` and pass that file."
        )
        raise ValueError(msg)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def state_dict_shapes(sd) -> dict[str, tuple]:
    """Key -> shape of a state_dict's tensors."""
    return {k: tuple(v.shape) for k, v in sd.items()}


def state_dict_mismatch(own: dict[str, tuple], theirs: dict[str, tuple]) -> tuple[list, list, list]:
    """`(missing, unexpected, reshaped)` keys of a file's shapes `theirs` against a model's shapes `own` (sorted)."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    bad = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
    return missing, unexpected, bad


def mismatch_text(own: dict[str, tuple], theirs: dict[str, tuple]) -> str | None:
    """What keeps a state_dict of shapes `theirs` from loading into a model of shapes `own`; `None` when it fits."""
    missing, unexpected, bad = state_dict_mismatch(own, theirs)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if bad:
        shapes = ", ".join(f"{k}: file {theirs[k]} vs {own[k]}" for k in bad[:2])
        parts.append(f"{len(bad)} keys with another shape (e.g. {shapes})")
    return "; ".join(parts) or None


def _load_into(model: nn.Module, sd: dict, *, source: str, drop_classifier: bool) -> None:
    if drop_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = state_dict_shapes(model.state_dict())
    if drop_classifier:
        own = {k: s for k, s in own.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    problem = mismatch_text(own, state_dict_shapes(sd))
    if problem:
        msg = (
            f"Weights {source!r} do not fit the encoder {type(model).__name__}: {problem}. "
            "Pass a state_dict saved from the same torchvision architecture, or the matching `encoder=`."
        )
        raise ValueError(msg)
    model.load_state_dict(sd, strict=False)


def _tf_same_padding(module: nn.Module) -> None:
    """Make stride-2 convolutions pad like TensorFlow 'SAME' (extra row/column at the bottom/right)."""

    def hook(conv, args):
        x = args[0]
        pads = []
        for size, k, s, d in zip(
            (x.shape[-1], x.shape[-2]), conv.kernel_size[::-1], conv.stride[::-1], conv.dilation[::-1], strict=True
        ):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return (F.pad(x, pads),)

    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            m.padding = (0, 0)
            m.register_forward_pre_hook(hook)


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm layers into the convolutions right before them, in place (inference only).

    Handles `Conv2d` followed by `BatchNorm2d` in an `nn.Sequential` (MobileNetV2, ResNet stems and shortcuts) and
    `convN`/`bnN` attribute pairs (ResNet bottlenecks) and `conv1`/`norm2` (DenseNet layers). Outputs equal the
    unfused module's up to float rounding; DenseNet's pre-activation BatchNorms (BN -> ReLU -> conv) stay.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    for m in list(module.modules()):
        if isinstance(m, nn.Sequential):
            items = list(m._modules.items())
            for (n1, a), (n2, b) in zip(items, items[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats:
                    m._modules[n1] = fuse_conv_bn_eval(a, b)
                    m._modules[n2] = nn.Identity()
        conv, bn = getattr(m, "conv1", None), getattr(m, "norm2", None)  # DenseNet layer: conv1 -> norm2
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            m.conv1 = fuse_conv_bn_eval(conv, bn)
            m.norm2 = nn.Identity()
        for i in range(1, 10):
            conv, bn = getattr(m, f"conv{i}", None), getattr(m, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                setattr(m, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(m, f"bn{i}", nn.Identity())
    return module


def _as_triplet(v, name: str) -> tuple[float, float, float]:
    """One number (numpy scalars included) for the three channels, or three numbers (R, G, B)."""
    import numbers

    from histospace._utils import check_number

    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = (v,) * 3
    if isinstance(v, str | bytes) or not hasattr(v, "__len__") or len(v) != 3:
        msg = f"`{name}` must be a number or three numbers (R, G, B), got {v!r}."
        raise (ValueError if hasattr(v, "__len__") and not isinstance(v, str | bytes) else TypeError)(msg)
    low = {"low": 0, "low_inclusive": False} if name == "std" else {}
    return tuple(check_number(x, name, **low) for x in v)


def check_encoder_options(encoder, *, layers: str = "last", tf_padding: bool = False) -> None:
    """Raise `ValueError` unless `layers` is `'last'` or `'stages'`, and `'stages'`/`tf_padding` name an encoder."""
    if layers not in ("last", "stages"):
        msg = f"`layers` must be 'last' or 'stages', got {layers!r}."
        raise ValueError(msg)
    if layers == "stages" and isinstance(encoder, nn.Module):
        msg = "`layers='stages'` works only with a named encoder ('mobilenet_v2', ...), not with a torch.nn.Module."
        raise ValueError(msg)
    if tf_padding and isinstance(encoder, nn.Module):
        msg = "`tf_padding=True` works only with a named encoder ('mobilenet_v2', ...), not with a torch.nn.Module."
        raise ValueError(msg)
