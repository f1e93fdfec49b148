"""Stage two: the CLIP-CAER head (temporal encoders, fusion, prompts), training and metrics."""

from heads.model import CaerModel, HeadConfig
from heads.run import load_run, save_run

__all__ = ["CaerModel", "HeadConfig", "load_run", "save_run"]
