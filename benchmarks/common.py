"""What every benchmark script records beside its figures, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def environment() -> dict:
    """The torch build and threads the figures were measured with."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "machine": platform.platform()}


def write_result(result: dict, out: str | Path) -> Path:
    """Write ``result`` as indented JSON to ``out`` (folders created); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
