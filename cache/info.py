"""``python cli.py info CACHE``: what a store holds, what failed, how often a face was found."""

from __future__ import annotations

import numpy as np

from cache.store import open_store


def store_info(path) -> dict:
    """Counts, failures, per-clip and overall face-detection rate, fingerprint, arrays."""
    with open_store(path) as store:
        manifest = store.manifest
        found = store.face_found[:] if store.n_clips else np.zeros((0, 1, 1), bool)
        arrays = {name: {"shape": list(shape), "dtype": dtype}
                  for name, (shape, dtype) in store.arrays().items()}
        fingerprint = store.fingerprint
        backend = store.backend
        boxes = box_counts(store)
    ok = (manifest.status == "ok").to_numpy()
    rates = found.reshape(len(found), -1).mean(axis=1) if len(found) else np.zeros(0)
    clips = []
    for i, row in enumerate(manifest.itertuples()):
        clips.append({"id": row.id, "path": row.path, "label": int(row.label),
                      "label_name": row.label_name, "split": row.split, "status": row.status,
                      "face_rate": round(float(rates[i]), 4) if ok[i] else None,
                      "n_frames": int(row.n_frames), "note": row.note})
    failures = [{"id": r.id, "path": r.path, "reason": r.reason}
                for r in manifest.itertuples() if r.status == "failed"]
    overall = float(found[ok].mean()) if ok.any() else None
    return {"cache": str(path), "backend": backend, "n_clips": len(manifest),
            "n_ok": int(ok.sum()), "n_failed": len(failures),
            "n_pending": int((manifest.status == "pending").sum()),
            "face_rate": None if overall is None else round(overall, 4),
            "boxes": boxes, "failures": failures, "clips": clips, "fingerprint": fingerprint,
            "arrays": arrays}


def box_counts(store) -> dict | None:
    """What the boxes left out, over the ok clips (None when the store used no face box file
    and no body boxes): ``face`` counts clips none of whose kept frames has a box in the
    ``--face-boxes`` file and distinct kept frames without one; ``body`` counts clips without
    a body box (from ``--body-boxes`` or the person detector)."""
    fp = store.fingerprint
    if not fp.get("face_boxes") and store.body_boxes is None:
        return None
    ok = np.flatnonzero(store.status == 1)
    out = {"clips": int(len(ok))}
    if fp.get("face_boxes"):
        found = store.face_found[ok] if len(ok) else np.zeros((0, 1, 1), bool)
        index = store.frame_indices[ok] if len(ok) else np.zeros((0, 1, 1), np.int32)
        frames = without = clips_without = 0
        for f, i in zip(found.reshape(len(ok), -1), index.reshape(len(ok), -1)):
            first = np.unique(i, return_index=True)[1]
            frames += len(first)
            without += int((~f[first]).sum())
            clips_without += int(not f.any())
        out["face"] = {"clips_without": clips_without, "frames": frames,
                       "frames_without": without}
    body = store.body_boxes
    if body is not None:
        boxes = body[ok] if len(ok) else np.zeros((0, 4), np.float32)
        out["body"] = {"clips_without": int(np.isnan(boxes).any(axis=1).sum())}
    return out


def box_count_lines(counts: dict | None) -> list[str]:
    if not counts:
        return []
    lines = []
    if "face" in counts:
        c = counts["face"]
        lines.append(f"face boxes: {c['clips_without']} of {counts['clips']} ok clips have no "
                     f"box in any kept frame; {c['frames_without']} of {c['frames']} kept "
                     f"frames have none (their face crop is the whole frame)")
    if "body" in counts:
        lines.append(f"body boxes: {counts['body']['clips_without']} of {counts['clips']} ok "
                     f"clips have none (their context is the whole frame)")
    return lines


def info_text(data: dict, show_all: bool = False, lowest: int = 10) -> str:
    fp = data["fingerprint"]
    lines = [f"{data['cache']} ({data['backend']}): {data['n_clips']} clips, {data['n_ok']} ok, "
             f"{data['n_failed']} failed, {data['n_pending']} pending"]
    if data["face_rate"] is not None:
        lines.append(f"face found in {100 * data['face_rate']:.1f}% of kept frames of ok clips")
    lines += box_count_lines(data.get("boxes"))
    splits: dict[str, int] = {}
    for clip in data["clips"]:
        splits[clip["split"] or "(none)"] = splits.get(clip["split"] or "(none)", 0) + 1
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    if data["failures"]:
        lines.append("failures:")
        lines += [f"  {f['id']}: {f['reason']}  [{f['path']}]" for f in data["failures"]]
    rated = [c for c in data["clips"] if c["face_rate"] is not None]
    shown = rated if show_all else sorted(rated, key=lambda c: c["face_rate"])[:lowest]
    if shown:
        title = "face rate per clip:" if show_all else \
            f"lowest face rates ({len(shown)} of {len(rated)} clips; --all or --json for all):"
        lines.append(title)
        lines += [f"  {c['face_rate']:6.1%}  {c['id']}" + (f"  ({c['note']})" if c["note"] else "")
                  for c in shown]
    lines.append("fingerprint:")
    for key, value in fp.items():
        if key == "labels":
            value = f"{value['name']} ({', '.join(c['name'] for c in value['classes'])})"
        lines.append(f"  {key}: {value}")
    lines.append("arrays:")
    lines += [f"  {name:22s} {a['dtype']:8s} {tuple(a['shape'])}"
              for name, a in data["arrays"].items()]
    return "\n".join(lines)


def verify_text(cache, damage) -> str:
    """What ``info --verify`` prints for a damaged store: one line per damaged chunk."""
    clips = {d.row for d in damage if d.redoable}
    lines = [f"verify: {cache}: {len(damage)} damaged chunks in {len(clips)} clips"]
    lines += [f"  {d.describe()}" for d in damage]
    if clips:
        lines.append("repair: run the same extract command with --redo-damaged (re-extracts "
                     "only these clips)")
    if any(not d.redoable for d in damage):
        lines.append("the clip list itself (clips/id, path, label, split) is damaged: "
                     "re-extracting cannot repair it; extract into a new store")
    return "\n".join(lines)
