"""Image encoders of the wing: torchvision CNNs, pathology ViTs, and the one build entry.

:mod:`._torchvision` (CNN trunks, :class:`~._torchvision.ImageEncoder`, stage taps, BatchNorm folding, TF padding),
:mod:`._registry` (the pathology models: architecture, input, normalisation), :mod:`._weights` (their checkpoints),
:mod:`._pathology` (their encoder), and :mod:`._build` (:func:`~._build.build_encoder`: by name or from a module),
which alone imports both families: registry -> build, no back-import.
"""
