"""Stage one: clips -> frames -> face and context crops -> CLIP features (written by cache/)."""

from cache.core import __version__  # noqa: F401
