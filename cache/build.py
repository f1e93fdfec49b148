"""A valid store from arrays already in memory (synthetic data, tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.hdf5 import export_hdf5, remove_store
from cache.fingerprint import make_fingerprint
from cache.layout import FORMAT_VERSION, ClipRow, is_hdf5, staging_path
from cache.store import FeatureStore, StoreError, open_store
from cache.writer import StoreWriter, create_zarr, write_every_chunk
from cache.core.labels import load_label_set


def build_store_from_arrays(path, *, face, context, labels, splits, ids=None, fingerprint,
                            face_flip=None, context_flip=None, pixels_face=None,
                            pixels_context=None, metadata=None) -> FeatureStore:
    """Write a valid store from features already in memory (synthetic data, benchmarks).

    ``face``/``context`` are ``[N, S, K, D]`` (or ``[N, S, D]``, K=1); ``labels`` 0-based ints;
    ``splits`` one string per clip (or one string for all); ``fingerprint`` a full
    ``make_fingerprint`` dict or a partial one (missing keys take extract's defaults and the
    array shapes). Every clip is written as ok with its face found. Returns the open store.
    """
    import zarr

    path = Path(path)
    face, context = _as_nskd(face), _as_nskd(context)
    n, s, k, d = face.shape
    if context.shape != face.shape:
        raise StoreError(f"face {face.shape} and context {context.shape} differ in shape")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    splits = [splits] * n if isinstance(splits, str) else list(splits)
    ids = [f"clip{i:06d}" for i in range(n)] if ids is None else [str(i) for i in ids]
    if not (len(labels) == len(splits) == len(ids) == n):
        raise StoreError(f"{n} clips but {len(labels)} labels, {len(splits)} splits, "
                         f"{len(ids)} ids")
    if len(set(ids)) != n:
        raise StoreError("ids must be unique")
    fp = _complete_fingerprint(fingerprint, s, k, d, flip=face_flip is not None,
                               pixels=pixels_face is not None)
    label_set = load_label_set(fp["labels"])
    if n and (labels.min() < 0 or labels.max() >= len(label_set)):
        raise StoreError(f"labels must be in 0..{len(label_set) - 1}")
    from cache.lock import StoreLock

    with StoreLock(path):  # as extract: one writer per store, and a leftover removed under it
        if path.exists():
            raise StoreError(f"{path}: already exists")
        from cache.lifecycle import remove_temporary

        target = staging_path(path) if is_hdf5(path) else path
        if target != path:
            remove_temporary(target)
        rows = [ClipRow(ids[i], ids[i], int(labels[i]), splits[i]) for i in range(n)]
        create_zarr(target, fp, rows, [], metadata)
        writer = StoreWriter(target)
        with write_every_chunk():
            r = zarr.open_group(str(target), mode="r+")
            _fill_arrays(r, n, s, k, face, context, face_flip, context_flip, pixels_face,
                         pixels_context)
        writer.close()
        if is_hdf5(path):
            export_hdf5(target, path)
            remove_store(target)
    return open_store(path)


def _fill_arrays(r, n, s, k, face, context, face_flip, context_flip, pixels_face,
                 pixels_context) -> None:
    step = 64
    views = {"face": face, "context": context, "face_flip": face_flip, "context_flip": context_flip}
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        m = sl.stop - sl.start
        for view, value in views.items():
            if value is not None:
                r[f"features/{view}"][sl] = _as_nskd(value[sl]).astype(np.float16)
        for stream, value in (("face", pixels_face), ("context", pixels_context)):
            if value is not None:
                r[f"pixels/{stream}"][sl] = np.asarray(value[sl], np.uint8).reshape(
                    (m,) + r[f"pixels/{stream}"].shape[1:])
        r["frames/index"][sl] = np.broadcast_to(np.arange(s * k, dtype=np.int32).reshape(s, k),
                                                (m, s, k))
        r["faces/found"][sl] = True
        r["faces/score"][sl] = 1.0
        r["clips/n_frames"][sl] = s * k
        for name in ("clips/reason", "clips/note", "clips/fps", "clips/width", "clips/height",
                     "faces/box"):  # every chunk of an ok clip exists (INTEGRITY)
            r[name][sl] = r[name].fill_value
        r["clips/status"][sl] = 1


def _as_nskd(x) -> np.ndarray:
    x = np.asarray(x)
    return x[:, :, None, :] if x.ndim == 3 else x


def _complete_fingerprint(partial: dict, s: int, k: int, d: int, flip: bool, pixels: bool) -> dict:
    fp = make_fingerprint(clip_spec="arrays", clip_revision="arrays", feature_dim=d,
                          image_size=224, segments=s, candidates=k, flip=flip, pixels=pixels,
                          normalize="clip", face_model="full", face_margin=20,
                          min_face_score=0.5, face_resize="squash", face_boxes=None,
                          labels=load_label_set("raer5"))
    given = dict(partial or {})
    if "labels" in given:
        given["labels"] = load_label_set(given["labels"]).as_dict()
    fp.update(given)
    for key, value in (("segments", s), ("candidates", k), ("feature_dim", d), ("flip", flip),
                       ("pixels", pixels)):
        if fp[key] != value:
            raise StoreError(f"fingerprint says {key}={fp[key]} but the arrays say {value}")
    fp["format_version"] = FORMAT_VERSION
    return fp
