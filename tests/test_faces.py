"""The vendored BlazeFace detector on real faces (carphone video, astronaut photo) and on
images without one; model integrity; quiet creation; pickling into worker processes."""

import hashlib
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pipeline.faces as faces
from cache.core.errors import CaerError
from pipeline.faces import MODEL_DIR, MODEL_FILES, FaceDetector, FaceModelError, load_model_bytes
from pipeline.video import read_frames, sample_indices


@pytest.fixture(scope="module")
def detector():
    with FaceDetector("full") as d:
        yield d


def test_vendored_models_match_their_checksums():
    sums = dict(reversed(line.split()) for line in (MODEL_DIR / "SHA256SUMS").read_text().splitlines())
    for name in MODEL_FILES.values():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == sums[name]
    assert "Apache License" in (MODEL_DIR / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("model", ["full", "short"])
def test_carphone_face_in_the_sampled_frames(carphone, model):
    # A man in a car, face ~50 px in 176x144 frames, in every frame.
    frames = read_frames(carphone, sample_indices(120, 16, 1).reshape(-1))
    with FaceDetector(model) as d:
        detections = {i: d.detect(f) for i, f in frames.items()}
    found = {i: det for i, det in detections.items() if det.box is not None}
    assert len(found) / len(detections) >= 0.95
    for i, det in found.items():
        x0, y0, x1, y1 = det.box
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        # The face sits left of centre in the upper-middle of the frame, 40-60 px across
        # (checked by eye on frames 3 and 100).
        assert 50 <= cx <= 110 and 40 <= cy <= 95, (i, det.box)
        assert 30 <= w <= 80 and 30 <= h <= 80, (i, det.box)
        assert 0.5 <= det.score <= 1.0
    centres = np.array([((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2) for b in found.values()])
    assert np.abs(np.diff(centres, axis=0)).max() < 25  # the box follows the face, no jumps


def test_astronaut_face(detector, astronaut):
    det = detector.detect(astronaut)
    assert det.box is not None and det.score > 0.8
    x0, y0, x1, y1 = det.box
    # Eyes at about (205, 112) and (245, 112), mouth at (225, 145); hair top ~y 15, chin ~y 175.
    for x, y in ((205, 112), (245, 112), (225, 145)):
        assert x0 < x < x1 and y0 < y < y1
    assert 160 <= x0 and x1 <= 290 and 40 <= y0 and y1 <= 190


def test_no_face_in_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    for image in (np.zeros((200, 300, 3), np.uint8), np.full((128, 128, 3), 255, np.uint8),
                  rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)):
        det = detector.detect(image)
        assert det.box is None and det.score == 0.0


def test_rejects_a_non_rgb_array(detector):
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10), np.uint8))


def test_bad_settings_are_caer_errors():
    with pytest.raises(CaerError, match="unknown face model"):
        FaceDetector("huge")
    with pytest.raises(CaerError, match="min face score"):
        FaceDetector("full", min_score=1.5)


def test_missing_or_corrupt_model_names_the_file(tmp_path, monkeypatch):
    copy = tmp_path / "models"
    shutil.copytree(MODEL_DIR, copy)
    monkeypatch.setattr(faces, "MODEL_DIR", copy)
    load_model_bytes("short")  # an intact copy loads
    name = MODEL_FILES["short"]
    data = bytearray((copy / name).read_bytes())
    data[1000] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(FaceModelError, match=f"{name} does not match its SHA256SUMS"):
        FaceDetector("short").detect(np.zeros((64, 64, 3), np.uint8))
    (copy / name).unlink()
    with pytest.raises(FaceModelError, match=f"{name} is missing"):
        load_model_bytes("short")


def test_pickles_without_its_native_handle(detector, astronaut):
    detector.detect(astronaut)  # created
    clone = pickle.loads(pickle.dumps(detector))
    assert clone._detector is None and (clone.model, clone.min_score) == ("full", 0.5)
    with clone:
        assert clone.detect(astronaut).box == detector.detect(astronaut).box


def test_creating_and_detecting_is_quiet():
    # MediaPipe/LiteRT print delegate and sparsity notices on stderr from native code.
    script = textwrap.dedent("""
        import numpy as np
        from pipeline.faces import FaceDetector
        d = FaceDetector("full")
        d.detect(np.zeros((64, 64, 3), np.uint8))
        d.detect(np.zeros((64, 64, 3), np.uint8))
        for size in range(60, 80):  # LiteRT's alignment notice comes with whichever call's
            d.detect(np.zeros((size, size + 3, 3), np.uint8))  # buffer is misaligned
        print("done")
    """)  # no close(): the exit handler must close it without a traceback
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(MODEL_DIR.parents[1]), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done"
    assert result.stderr.strip() == "", result.stderr[:2000]
