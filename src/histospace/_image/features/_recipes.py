"""Named feature recipes of `pp.image_features(preset=...)`, and the validated mclSTExp recipe the CLI runs.

:data:`PRESETS` holds each recipe's options; :func:`preset_options` adds what depends on the weights (TensorFlow
padding for weights trained with it); :func:`with_preset` fills them into a call (explicit arguments win).
:data:`MCLSTEXP_FEATURES` and :func:`mclstexp_features` are the recipe as the `histospace mclstexp` command, the
benchmarks and the tutorials pass it: the preset with its options spelled out, so that the stored features' settings
can be compared with them (:func:`histospace._image.features._slot.settings_mismatch`).
"""

from __future__ import annotations

import functools

__all__ = ["MCLSTEXP_FEATURES", "PRESETS", "mclstexp_features", "preset_options", "with_preset"]

#: named feature recipes of `image_features(preset=...)`: the options each fills (see `preset_options`)
PRESETS: dict[str, dict] = {
    # mclSTExp on her2st (validated by the expression benchmark): stage features of the patch and of a patch twice as
    # wide, averaged over the 8 flips/rotations; plus `tf_padding` for weights trained with TF 'SAME' padding
    "mclstexp": {"encoder": "mobilenet_v2", "layers": "stages", "context": 2.0, "dihedral": True},
}

#: image features of the mclSTExp pipeline (validated by the expression benchmark): `hs.pp.image_features`'s
#: `preset='mclstexp'` (stage features of the patch and of a patch twice as wide, averaged over the 8
#: flips/rotations; the TF padding of weights trained with it). The options are spelled out too, so that the CLI can
#: compare them with stored features; they equal the preset's (a test checks it).
MCLSTEXP_FEATURES = {"preset": "mclstexp", "layers": "stages", "context": 2.0, "dihedral": True}


def preset_options(preset: str, *, encoder=None, weights="imagenet") -> dict:
    """The options that `image_features(preset=preset)` fills for `encoder` and `weights` (the caller's or defaults).

    `PRESETS[preset]`, plus `tf_padding=True` when `weights` is a file known to be trained with TensorFlow 'SAME'
    padding (by its SHA-256, e.g. the shared TF-converted MobileNetV2) and the encoder is a named one.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        msg = f"`preset` must be one of {sorted(PRESETS)} or None, got {preset!r}."
        raise ValueError(msg)
    from histospace._image.encoders._torchvision import trained_with_tf_padding

    out = dict(PRESETS[preset])
    enc = out.get("encoder") if encoder is None else encoder
    if isinstance(enc, str) and trained_with_tf_padding(weights):
        out["tf_padding"] = True
    return out


def mclstexp_features(weights) -> dict:
    """The mclSTExp image-feature options for `weights` (`preset='mclstexp'` and what it fills for these weights).

    The encoder is left out: the caller's (the command's `--encoder`) decides.
    """
    opts = preset_options("mclstexp", weights=weights)
    opts.pop("encoder")
    return {"preset": "mclstexp"} | opts


def with_preset(func):
    """Fill the options of `preset=` that the caller did not pass (explicit arguments win) before calling `func`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        preset = kwargs.get("preset")
        if preset is not None:
            filled = preset_options(preset, encoder=kwargs.get("encoder"), weights=kwargs.get("weights", "imagenet"))
            kwargs = filled | kwargs
        return func(*args, **kwargs)

    return wrapper
