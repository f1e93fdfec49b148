"""Moved to cache.core.labels (the ground floor); kept so that older imports still work."""

from cache.core.labels import *  # noqa: F401,F403
