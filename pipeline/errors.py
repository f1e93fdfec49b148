"""Moved to cache.core.errors (the ground floor); kept so that older imports still work."""

from cache.core.errors import CaerError, WriteFailed, first_line  # noqa: F401
