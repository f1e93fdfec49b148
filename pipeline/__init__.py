"""Stage one: clips -> frames -> face and context crops -> CLIP features (written by cache/)."""
