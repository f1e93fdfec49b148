"""The model a training recipe starts from: a new head on the cache's CLIP (train-head,
finetune --init none) or the weights of an earlier run (finetune --init RUN)."""

from __future__ import annotations

import logging

from cache.core.errors import CaerError

log = logging.getLogger("caer")


def build_model(config, store):
    """The CaerModel ``config`` trains, checked against the cache it trains on."""
    from heads.model import CaerModel, HeadConfig
    from pipeline.clip import load_clip

    fp = store.fingerprint
    if config.init_run is not None:
        return _from_run(config, config.init_run, store)
    clip = load_clip(fp["clip_spec"])
    if clip.revision != fp["clip_revision"]:
        raise CaerError(f"the cache was built with CLIP {fp['clip_spec']} revision "
                        f"{fp['clip_revision']}, but it now loads as revision {clip.revision}: "
                        f"its text tower would not match the features; extract the cache again")
    default = HeadConfig()
    head = HeadConfig(feature_dim=int(fp["feature_dim"]), segments=int(fp["segments"]),
                      n_ctx=config.n_ctx or default.n_ctx,
                      temporal_layers=config.temporal_layers or default.temporal_layers,
                      streams=config.streams or default.streams)
    return CaerModel(head, clip, store.labels, normalize=fp.get("normalize", "clip"))


def _from_run(config, init: str, store):
    from heads.run import load_run, read_run_config

    fp = store.fingerprint
    run_config = read_run_config(init)
    model = load_run(init)
    if list(model.labels.names) != list(store.labels.names):
        raise CaerError(f"--init {init} predicts {', '.join(model.labels.names)} but the "
                        f"cache is labelled {', '.join(store.labels.names)}")
    for name, value in (("n_ctx", model.config.n_ctx),
                        ("temporal_layers", model.config.temporal_layers),
                        ("streams", model.config.streams)):
        if getattr(config, name) is not None and getattr(config, name) != value:
            raise CaerError(f"--{name.replace('_', '-')} {getattr(config, name)} differs from "
                            f"the --init run's {value}; drop the option or pass {value}")
    if model.config.segments != fp["segments"]:
        raise CaerError(f"--init {init} was trained with {model.config.segments} segments, "
                        f"the cache has {fp['segments']}")
    if run_config.get("kind") == "train-head" and model.clip_revision != fp["clip_revision"]:
        log.warning("--init %s was trained on features of another CLIP (%s) than the "
                    "cache's (%s); fine-tuning the run's CLIP", init, model.clip_spec,
                    fp["clip_spec"])
    return model
