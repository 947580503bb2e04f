"""Tools: StereoMM latent and spatial domains, mclSTExp training, prediction and evaluation."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._cohort import predict_cohort
    from ._domains import domains
    from ._evaluate import mclstexp_cross_validate
    from ._mclstexp import mclstexp_predict, mclstexp_train
    from ._stereomm import stereomm

__all__ = ["domains", "mclstexp_cross_validate", "mclstexp_predict", "mclstexp_train", "predict_cohort", "stereomm"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "domains": "._domains",
        "mclstexp_cross_validate": "._evaluate",
        "mclstexp_predict": "._mclstexp",
        "mclstexp_train": "._mclstexp",
        "predict_cohort": "._cohort",
        "stereomm": "._stereomm",
    },
)
