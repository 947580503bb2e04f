"""The steps of the `histospace` commands before the models: image features (reused when they match) and graph."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from histospace._cli_io import CLIError, _floats, _positive_float, _positive_int, _table
from histospace._constants import CONNECTIVITIES_KEY, FEATURES_KEY, NEIGHBORS_KEY


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image features")
    g.add_argument("--encoder", default="mobilenet_v2", help="image encoder (default: %(default)s)")
    g.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (torchvision download), a local weights file, 'hub' (pathology encoders) or 'none' for "
        "random init (default: %(default)s)",
    )
    g.add_argument(
        "--mean", type=_floats, help="input normalisation mean, e.g. 0.5 or 0.5,0.5,0.5 (default: as weights)"
    )
    g.add_argument("--std", type=_floats, help="input normalisation std (default: as the weights)")
    g.add_argument("--patch-size", type=_positive_float, help="patch side in full-resolution pixels (default: 3 spots)")
    g.add_argument("--patch-size-um", type=_positive_float, help="patch side in µm")
    g.add_argument("--input-size", type=_positive_int, help="side of the encoder's input in pixels (default: 224)")
    g.add_argument("--image-key", help="SpatialData: the H&E image element (default: the only one)")
    g.add_argument("--recompute-features", action="store_true", help="compute image features even if present")


def _feature_kwargs(args: argparse.Namespace) -> dict:
    weights = None if str(args.weights).lower() in {"none", "random"} else args.weights
    kw = {
        "encoder": args.encoder,
        "weights": weights,
        "mean": args.mean,
        "std": args.std,
        "patch_size": args.patch_size,
        "patch_size_um": args.patch_size_um,
        "input_size": args.input_size,
    }
    return {k: v for k, v in kw.items() if v is not None or k == "weights"}


def _weights_label(weights) -> str:
    if weights is None:
        return "random"
    if str(weights) in ("imagenet", "hub"):
        return str(weights)
    return str(Path(weights).expanduser().resolve())


def features_mismatch(table, kw: dict, extra: dict) -> str | None:
    """Why the features in `obsm['img_features']` do not match the requested ones (`None` when they do).

    The one comparison of the feature slot (:func:`~histospace._image.features._slot.settings_mismatch`, the one the
    models use), on the settings the command asks for: encoder, weights, the recipe's options, the patch size.
    """
    from histospace._image import feature_settings, settings_mismatch

    if FEATURES_KEY not in table.obsm:
        return "no obsm['img_features']"
    params = (table.uns.get(FEATURES_KEY) or {}).get("params", {})
    want = {"encoder": kw["encoder"], "weights": _weights_label(kw["weights"])} | {
        k: v for k, v in extra.items() if k in ("layers", "context", "dihedral", "tf_padding")
    }
    for k in ("patch_size_px", "patch_size_um"):
        arg = kw.get("patch_size" if k == "patch_size_px" else "patch_size_um")
        if arg is not None:
            want[k] = float(arg)
    bad = settings_mismatch(want, feature_settings(params), keys=want)
    if bad is None:
        return None
    k, have, v = bad
    return f"uns['img_features']['params'][{k!r}] is {have!r}, not {v!r}"


def _feature_width(kw: dict, extra: dict) -> int | None:
    """The width of the requested features (torchvision encoders), `None` when it is not known without a download."""
    from histospace._image import ENCODERS, STAGES

    if kw["encoder"] not in ENCODERS:
        return None
    width = STAGES[kw["encoder"]][1] if extra.get("layers") == "stages" else ENCODERS[kw["encoder"]][2]
    return width * (2 if extra.get("context") else 1)


def _features_needed(data, args, *, label: str, extra: dict | None = None, image: str | None = None) -> bool:
    """Whether image features must be computed for `label` (the input file): `False` when its table holds matching
    ones (then say so), a `CLIError` when they are needed but there is no H&E image to compute them from.

    Features without recorded settings (another tool, an older histospace) are reused with a warning when their
    width fits: any width for StereoMM (`extra=None`), the requested features' width for mclSTExp.
    """  # noqa: D205
    kw = _feature_kwargs(args)
    extra = extra or {}
    table = _table(data, args.table_key)
    have = table.obsm[FEATURES_KEY].shape[1] if FEATURES_KEY in table.obsm else None
    if args.recompute_features:
        why = "--recompute-features was passed"
    elif have is not None and not (table.uns.get(FEATURES_KEY) or {}).get("params"):
        want = _feature_width(kw, extra) if extra else None
        if want in (None, have):
            warnings.warn(
                f"{label}: obsm['img_features'] ({have} columns) has no recorded settings (another tool or an older "
                "histospace made it): reusing it as it is; pass --recompute-features to compute them from the H&E",
                UserWarning,
                stacklevel=2,
            )
            return False
        why = f"obsm['img_features'] has {have} columns and no recorded settings, the {kw['encoder']} features {want}"
    elif (why := features_mismatch(table, kw, extra)) is None:
        print("reusing obsm['img_features']: computed with the requested encoder and weights", file=sys.stderr)
        return False
    if image is None and not _has_image(data):
        stored = "uns['img_features']['params'" in why
        msg = (
            f"{label}: {why}, and it holds no H&E image to compute the requested features from; pass --image "
            f"HE_FILE{', or feature options matching the stored ones' if stored else ''}"
        )
        raise CLIError(msg)
    return True


def _image_features(data, args, *, extra: dict | None = None, image: str | None = None) -> None:
    import histospace as hs
    from histospace._utils._sdata import is_spatialdata

    kw, extra = _feature_kwargs(args), extra or {}
    if is_spatialdata(data):
        hs.pp.image_features(
            data, table_key=args.table_key, image_key=args.image_key, progress_bar=not args.quiet, **kw, **extra
        )
    else:
        hs.pp.image_features(data, img=image, progress_bar=not args.quiet, **kw, **extra)


def _has_image(data) -> bool:
    from histospace._spatial._uns import images, metadata, uns_libraries
    from histospace._utils._sdata import is_spatialdata

    if is_spatialdata(data):
        return len(data.images) > 0
    return any(images(data, lib) or metadata(data, lib).get("source_image_path") for lib in uns_libraries(data))


def _spatial_graph(data, args) -> None:
    """Build the spatial graph unless the table holds one that matches its spots (then say so)."""
    import histospace as hs

    table = _table(data, args.table_key)
    g = table.obsp.get(CONNECTIVITIES_KEY)
    if g is not None and g.shape == (table.n_obs, table.n_obs) and NEIGHBORS_KEY in table.uns:
        n = (table.uns[NEIGHBORS_KEY].get("params") or {}).get("n_isolated")
        print(
            f"reusing obsp['spatial_connectivities']{f' ({n} spots without a neighbour)' if n else ''}", file=sys.stderr
        )
        return
    if g is not None:
        print("obsp['spatial_connectivities'] does not match the spots: rebuilding it", file=sys.stderr)
    hs.pp.spatial_graph(data, **({"table_key": args.table_key} if args.table_key else {}))
