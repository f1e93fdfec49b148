"""explain's pictures: a PNG per clip (frames in order, maps over the face and context crops,
the temporal attention as bars under them) and an index.html that shows them all."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write, atomic_write_text


def plot_clip(path: Path, clip, result, classes: list[str], row: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = ("face", "context")
    s = result.face_cam.shape[0] if result.face_cam.ndim == 3 else len(result.probs)
    fig = plt.figure(figsize=(max(6.0, 0.95 * s), 5.4))
    grid = fig.add_gridspec(4, s, height_ratios=[1, 0.45, 1, 0.45], hspace=0.25, wspace=0.04)
    for r, stream in enumerate(streams):
        crops = getattr(clip, stream)
        cam = getattr(result, f"{stream}_cam")
        attention = getattr(result, f"{stream}_attention")
        used = bool(np.isfinite(attention).all())
        # One scale per stream and clip, so frames can be compared with each other.
        top = float(np.nanmax(cam)) if used and np.nanmax(cam) > 0 else 1.0
        for i in range(s):
            ax = fig.add_subplot(grid[2 * r, i])
            ax.imshow(crops[i])
            if used:
                ax.imshow(cam[i] / top, cmap="jet", alpha=0.45, vmin=0, vmax=1,
                          extent=(-0.5, crops.shape[2] - 0.5, crops.shape[1] - 0.5, -0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(stream if used else f"{stream}\n(not used)", fontsize=9)
            if r == 0:
                ax.set_title(str(i + 1), fontsize=7)
        bars = fig.add_subplot(grid[2 * r + 1, :])
        if used:
            bars.bar(np.arange(s), attention, color="tab:orange", width=0.8)
            bars.set_xlim(-0.5, s - 0.5)
            bars.set_ylim(0, max(float(attention.max()) * 1.15, 1e-6))
        bars.set_xticks([])
        bars.tick_params(labelsize=7)
        bars.set_ylabel("attention", fontsize=7)
    target = classes[result.target]
    label = row["label"] or "unknown"
    fig.suptitle(f"{row['id']}: true {label}, predicted {row['prediction']} "
                 f"(p = {row['probability']:.2f}); maps explain {target}\n"
                 f"crops: {clip.source}", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def write_html(path: Path, rows: list[dict], run: str, classes: list[str],
               target: int | None) -> None:
    explained = "the predicted class" if target is None else f"class {classes[target]}"
    items = []
    for row in rows:
        png = html.escape(Path(row["file"]).with_suffix(".png").name)
        caption = html.escape(f"{row['id']}: true {row['label'] or 'unknown'}, predicted "
                              f"{row['prediction']} (p = {row['probability']:.2f})")
        items.append(f'<figure><img src="{png}" alt="{caption}"><figcaption>{caption} '
                     f'&middot; <a href="{html.escape(row["file"])}">npz</a></figcaption>'
                     f'</figure>')
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>explain "
            f"{html.escape(str(run))}</title>\n<style>body{{font-family:sans-serif;margin:1em}}"
            "figure{margin:0 0 2em 0}img{max-width:100%}</style></head><body>\n"
            f"<h1>explain: {html.escape(str(run))}</h1>\n<p>Grad-CAM of {explained} on the face "
            "and context crops (last vision block's first LayerNorm, patch tokens), and the "
            "temporal transformer's CLS attention over the frames (bars).</p>\n"
            + "\n".join(items) + "\n</body></html>\n")
    atomic_write_text(path, page)
