"""Stage two: the CLIP-CAER head (temporal encoders, fusion, prompts), training and metrics."""

__all__ = ["CaerModel", "HeadConfig", "load_run", "save_run"]


def __getattr__(name: str):
    # Lazy, so that importing heads.config (the command line does) does not load torch.
    if name in ("CaerModel", "HeadConfig"):
        from heads import model

        return getattr(model, name)
    if name in ("load_run", "save_run"):
        from heads import run

        return getattr(run, name)
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
