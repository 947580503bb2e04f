"""Internal torch modules (not public API)."""
