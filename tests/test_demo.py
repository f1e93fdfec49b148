"""The offline demo: its dataset (fast checks) and one real end-to-end `python cli.py demo`."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from heads import demo, demo_data
from pipeline.annotations import read_annotations
from cache.core.errors import CaerError
from cache.core.labels import load_label_set


@pytest.fixture(scope="module")
def sources() -> dict:
    return demo_data.load_sources()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> demo_data.DemoDataset:
    return demo_data.build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", progress=False)


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _frame_names(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir()), key=lambda n: int(Path(n).stem))


@pytest.fixture(scope="module")
def clips(dataset) -> list[dict]:
    """Every clip of the built dataset, decoded from disk: id, label, split, frames."""
    from PIL import Image

    label_of = {c.name: i for i, c in enumerate(demo_data.CLASSES)}
    out = []
    with open(dataset.videos_csv, newline="") as f:
        for row in csv.DictReader(f):
            out.append({"id": row["id"], "label": label_of[row["label"]], "split": row["split"],
                        "frames": _decode(dataset.root / row["path"])})
    for split, path in dataset.list_files.items():
        for line in path.read_text().splitlines():
            folder, _, label = line.split(" ")
            frames = np.stack([np.asarray(Image.open(dataset.root / folder / n).convert("RGB"))
                               for n in _frame_names(dataset.root / folder)])
            out.append({"id": folder, "label": int(label) - 1, "split": split, "frames": frames})
    return out


def test_dataset_has_enough_classes_clips_and_stratified_splits(dataset):
    labels = load_label_set(str(dataset.labels))
    assert len(labels) >= 5 and labels.names == [c.name for c in demo_data.CLASSES]
    files = [dataset.videos_csv] + [dataset.list_files[s] for s in demo_data.SPLITS]
    # The CSV's own split column wins over the split given for it.
    rows, meta = read_annotations(files, labels, splits=["train", *demo_data.SPLITS],
                                  root=dataset.root)
    assert len(rows) == dataset.n_clips >= 40
    assert len({r.id for r in rows}) == len(rows)
    assert {"scene", "lighting"} <= set(meta)
    per_class = {}
    for r in rows:
        per_class.setdefault(r.label, {}).setdefault(r.split, 0)
        per_class[r.label][r.split] += 1
    assert sorted(per_class) == list(range(len(labels)))
    # Stratified: every class has the same number of clips in each split.
    assert all(counts == per_class[0] for counts in per_class.values()), per_class
    assert set(per_class[0]) == set(demo_data.SPLITS) and per_class[0]["test"] >= 3
    # At least one class is RAER-style frame folders listed in the original format.
    folder_rows = [r for r in rows if Path(r.path).is_dir()]
    video_rows = [r for r in rows if Path(r.path).is_file()]
    assert folder_rows and video_rows and len(folder_rows) + len(video_rows) == len(rows)
    assert all(r.listed_frames > 0 for r in folder_rows)
    assert all(r.metadata["scene"] for r in video_rows)


def test_list_files_use_the_original_release_format(dataset):
    for split, path in dataset.list_files.items():
        for line in path.read_text().splitlines():
            folder, n_frames, label = line.split(" ")
            assert 1 <= int(label) <= len(demo_data.CLASSES)  # 1-based, as the release has it
            names = _frame_names(dataset.root / folder)
            assert int(n_frames) == len(names)
            # Unpadded numeric names, 1..N: "10.jpg" sorts before "2.jpg" as strings.
            assert names == [f"{i}.jpg" for i in range(1, len(names) + 1)]
            assert len(names) >= 10


def test_every_clip_is_a_real_decodable_video_or_folder(dataset, clips):
    assert len(clips) == dataset.n_clips
    for clip in clips:
        frames = clip["frames"]
        assert frames.shape[1:] == (demo_data.FRAME_H, demo_data.FRAME_W, 3), clip["id"]
        assert 24 <= len(frames) <= 40
        assert frames.std() > 10  # a picture, not a flat colour


def test_classes_differ_visibly_and_clips_are_not_copies(clips):
    flat = np.stack([c["frames"][::4, ::8, ::8].mean(0).reshape(-1) for c in clips])
    labels = np.array([c["label"] for c in clips])
    # No two clips are the same picture, not even within a class.
    distances = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert distances[~np.eye(len(clips), dtype=bool)].min() > 5.0
    # Learnable: a nearest-class-mean rule on 20x15 thumbnails of the training clips already
    # labels most held-out clips correctly (the demo's head must do better than chance).
    train = np.array([c["split"] == "train" for c in clips])
    means = np.stack([flat[train & (labels == k)].mean(0) for k in range(len(demo_data.CLASSES))])
    guess = np.abs(flat[~train][:, None] - means[None]).mean(-1).argmin(1)
    assert (guess == labels[~train]).mean() >= 0.6


def test_dataset_is_deterministic_and_seeded(sources):
    assert demo_data.plan_clips(seed=0) == demo_data.plan_clips(seed=0)
    assert demo_data.plan_clips(seed=0) != demo_data.plan_clips(seed=1)
    plan = demo_data.plan_clips()[-1]  # shaky-driver: the per-frame random shake is seeded too
    assert demo_data.CLASSES[plan.label].motion == "shake"
    np.testing.assert_array_equal(demo_data.render_clip(plan, sources),
                                  demo_data.render_clip(plan, sources))


def test_faces_are_in_view_in_the_face_classes(clips):
    from pipeline.faces import FaceDetector

    faces = [demo_data.CLASSES.index(c) for c in demo_data.CLASSES if c.name in ("driver", "astronaut")]
    chosen = [c for c in clips if c["label"] in faces][::4]
    with FaceDetector("full") as detector:
        found = [detector.detect(frame).box is not None
                 for c in chosen for frame in c["frames"][::8]]
    assert len(found) >= 20 and np.mean(found) >= 0.9


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """The README's first command, the real default path: exit 0 inside the time budget, the
    report files exist, and the head learned the visibly different scenes."""
    out = tmp_path / "demo_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    png = out / "report" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "config.json").is_file() and (out / "run" / "curves.png").is_file()
    chance = 1 / len(demo_data.CLASSES)
    assert report["n"] >= 3 * len(demo_data.CLASSES)
    assert report["uar"] > chance + 0.2, report
    text = proc.stdout + proc.stderr
    assert "untrained" in text.lower()
    assert str(png) in text
    assert "python cli.py extract" in text and "--clip openai/clip-vit-base-patch32" in text
    # Issue 8 asks for at most 3 minutes on a 2-core CPU; the margin is for a busy machine.
    assert seconds < 240, f"demo took {seconds:.0f} s"
    summary = json.loads((out / "demo.json").read_text())
    assert summary["uar"] == pytest.approx(report["uar"]) and summary["n_clips"] >= 40

    # The commands it prints are the ones it ran: extract resumes with nothing left to do,
    # evaluate gives the same numbers.
    joined = re.sub(r" \\\n\s+", " ", proc.stdout)  # undo the "\" line continuations
    shown = {line.split()[2]: shlex.split(line.strip())[2:]
             for line in joined.splitlines() if line.startswith("      python cli.py ")}
    assert set(shown) == {"extract", "train-head", "evaluate", "ablate", "explain"}
    results = (out / "ablate" / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 4 + 3  # header, 2 configurations x 2 seeds, 3 baseline rows
    assert (out / "ablate" / "summary.png").is_file() and "**" in (
        out / "ablate" / "summary.md").read_text()
    assert Path(summary["explain_png"]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "explain" / "index.html").is_file()
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), *shown["extract"]],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(0 done in this run" in again.stdout + again.stderr
    evaluated = subprocess.run([sys.executable, str(ROOT / "cli.py"), *shown["evaluate"],
                                "--json"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["uar"] == pytest.approx(report["uar"])


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(CaerError, match="not a demo directory"):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path)))
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
