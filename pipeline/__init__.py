"""Stage one: clips -> frames -> face and context crops -> CLIP features (written by cache/)."""

__version__ = "0.1.0"
