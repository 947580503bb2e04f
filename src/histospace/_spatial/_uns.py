"""The scanpy/squidpy Visium layout `uns['spatial'][library_id]`: the only module that reads or writes it.

`uns['spatial']` maps each library (slide) to `{'images': {'hires', 'lowres'}, 'scalefactors': {...},
'metadata': {...}}`. Readers here never raise on a missing or malformed entry (they return empty mappings); the
callers decide what is required and name the slot with :func:`uns_path`.
"""

from __future__ import annotations

from collections.abc import Mapping

from anndata import AnnData

from histospace._constants import SPATIAL_UNS_KEY


def uns_path(library_id=None, *keys: str, obj: str = "adata") -> str:
    """The slot as users write it, for messages: `uns_path('A', 'scalefactors')` is
    `"adata.uns['spatial']['A']['scalefactors']"` (no library: `"adata.uns['spatial']"`; `obj=''`: `"uns[...]..."`).
    """  # noqa: D205
    parts = [] if library_id is None else [library_id]
    head = f"{obj}.uns" if obj else "uns"
    return head + f"[{SPATIAL_UNS_KEY!r}]" + "".join(f"[{p!r}]" for p in (*parts, *keys))


def has_uns(adata: AnnData) -> bool:
    """Whether `adata` carries a `uns['spatial']` entry at all."""
    return SPATIAL_UNS_KEY in adata.uns


def uns_mapping(adata: AnnData) -> Mapping:
    """`adata.uns['spatial']` (an empty dict when absent or not a mapping)."""
    spatial = adata.uns.get(SPATIAL_UNS_KEY)
    return spatial if isinstance(spatial, Mapping) else {}


def uns_libraries(adata: AnnData) -> list[str]:
    """Libraries of `adata.uns['spatial']`, in their order (as str)."""
    return [str(k) for k in uns_mapping(adata)]


def library_entry(adata: AnnData, library_id: str | None) -> Mapping:
    """`adata.uns['spatial'][library_id]` (an empty dict when absent)."""
    if library_id is None:
        return {}
    entry = uns_mapping(adata).get(library_id)
    return entry if isinstance(entry, Mapping) else {}


def _part(adata: AnnData, library_id: str | None, part: str) -> Mapping:
    value = library_entry(adata, library_id).get(part)
    return value if isinstance(value, Mapping) else {}


def scalefactors(adata: AnnData, library_id: str | None) -> Mapping:
    """`uns['spatial'][library_id]['scalefactors']` (an empty dict when absent)."""
    return _part(adata, library_id, "scalefactors")


def metadata(adata: AnnData, library_id: str | None) -> Mapping:
    """`uns['spatial'][library_id]['metadata']` (an empty dict when absent)."""
    return _part(adata, library_id, "metadata")


def images(adata: AnnData, library_id: str | None) -> Mapping:
    """`uns['spatial'][library_id]['images']` (an empty dict when absent)."""
    return _part(adata, library_id, "images")


def set_uns(adata: AnnData, entries: Mapping) -> None:
    """Write `adata.uns['spatial'] = entries` (`{library_id: entry}`)."""
    adata.uns[SPATIAL_UNS_KEY] = entries


def share_uns(source: AnnData, target: AnnData) -> None:
    """Give `target` the `uns['spatial']` of `source` (the same object, not a copy), when it has one."""
    if has_uns(source):
        target.uns[SPATIAL_UNS_KEY] = source.uns[SPATIAL_UNS_KEY]


def drop_uns(adata: AnnData) -> None:
    """Remove `adata.uns['spatial']` (when present)."""
    adata.uns.pop(SPATIAL_UNS_KEY, None)
