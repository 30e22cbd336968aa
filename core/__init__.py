"""Pieces every thaw component shares: errors, units, the function spec, config."""

from thaw.core.errors import ThawError

__all__ = ["ThawError"]
