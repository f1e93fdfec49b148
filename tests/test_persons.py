"""The vendored pose detector (pipeline/persons.py) on real photos and video of people and on
images without one; agreement with MediaPipe's own graph; pick_body_box on one and on two
people; model integrity; quiet, torch-free use."""

import hashlib
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pipeline.persons as persons
from cache.core.errors import CaerError
from pipeline.faces import FaceDetector
from pipeline.persons import (MODEL_DIR, MODEL_FILE, PersonDetector, PersonModelError,
                              detect_persons, pick_body_box)
from pipeline.video import read_frames, sample_indices

# What MediaPipe 0.10.21 itself answers (its PoseDetectionCpu graph run through
# mediapipe.python.solution_base in a separate Python 3.11 venv holding only that wheel, since
# it cannot share one with mediapipe 1.x): score, relative face box (xmin, ymin, w, h) and the
# 4 relative keypoints of its one detection.
MEDIAPIPE_0_10_21 = {
    "astronaut": (0.80706, (0.31050, 0.26035, 0.19989, 0.19985),
                  ((0.31002, 1.02346), (0.46630, 0.05559), (0.40543, 0.47207), (0.51362, -0.23663))),
    "carphone3": (0.93629, (0.45466, 0.51314, 0.19980, 0.24415),
                  ((0.71368, 1.67770), (0.45049, 0.17323), (0.55957, 0.81996), (0.36938, -0.24492))),
}


@pytest.fixture(scope="module")
def detector():
    return PersonDetector()


@pytest.fixture(scope="module")
def faces():
    with FaceDetector("full") as d:
        yield d


@pytest.fixture(scope="module")
def carphone_frames(carphone):
    frames = read_frames(carphone, sample_indices(120, 16, 1).reshape(-1))
    return [frames[i] for i in sorted(frames)]


def holds(outer, inner, slack=0.0):
    return (outer[0] - slack <= inner[0] and outer[1] - slack <= inner[1]
            and inner[2] <= outer[2] + slack and inner[3] <= outer[3] + slack)


def test_vendored_model_matches_its_checksum_and_is_documented():
    sums = dict(reversed(line.split()) for line in (MODEL_DIR / "SHA256SUMS").read_text().splitlines())
    assert hashlib.sha256((MODEL_DIR / MODEL_FILE).read_bytes()).hexdigest() == sums[MODEL_FILE]
    assert MODEL_FILE in (MODEL_DIR / "README.md").read_text()
    assert "Apache License" in (MODEL_DIR / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("name", sorted(MEDIAPIPE_0_10_21))
def test_same_detection_as_mediapipe_itself(detector, astronaut, carphone, name):
    image = astronaut if name == "astronaut" else read_frames(carphone, [3])[3]
    h, w = image.shape[:2]
    (person,) = detector.detect(image)
    score, (x, y, bw, bh), keypoints = MEDIAPIPE_0_10_21[name]
    assert person.score == pytest.approx(score, abs=0.005)
    assert np.allclose(person.face, (x * w, y * h, (x + bw) * w, (y + bh) * h), atol=1.0)
    assert np.allclose(person.keypoints, np.array(keypoints) * (w, h), atol=1.0)


def test_astronaut_body_holds_the_face_and_reaches_into_the_torso(detector, faces, astronaut):
    people = detect_persons(astronaut)
    assert len(people) == 1
    x0, y0, x1, y1, score = people[0]
    assert score > 0.7
    face = faces.detect(astronaut).box       # about (175, 70, 279, 174)
    assert holds((x0, y0, x1, y1), face)
    # The suit's name patch (~(305, 355)) and mission patch (~(170, 385)) are torso.
    assert y1 >= face[3] + 2 * (face[3] - face[1]) and y1 >= 400
    assert x0 <= 170 and x1 >= 305 and y0 <= 60   # from above the hair across the chest
    assert pick_body_box([astronaut], [face]) == pytest.approx((x0, y0, x1, y1))


def test_carphone_man_in_every_sampled_frame(detector, faces, carphone_frames):
    found = 0
    for frame in carphone_frames:
        people = detector.detect(frame)
        face = faces.detect(frame).box
        assert face is not None
        if people:
            found += 1
            body = people[0].body
            # He fills the frame below the head: the box runs from above his hair to the
            # bottom edge (176x144 frames), and holds his face.
            assert holds(body, face) and body[1] <= face[1] - 10 and body[3] == 144
            assert people[0].score >= 0.5
    assert found == len(carphone_frames)


@pytest.mark.parametrize("name", ["coffee", "rocket", "brick", "chelsea"])
def test_no_confident_person_without_one(name):
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    assert detect_persons(image) == []


def test_no_person_in_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    for image in (np.zeros((120, 200, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8),
                  rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)):
        assert detector.detect(image) == []


def test_pick_body_box_over_a_clip(faces, carphone_frames):
    face_boxes = [faces.detect(f).box for f in carphone_frames]
    box = pick_body_box(carphone_frames, face_boxes)
    assert box is not None and all(holds(box, f, slack=3) for f in face_boxes)
    assert holds(box, np.median(face_boxes, axis=0))
    # Frames without a face are left out; a clip without any face, or whose face no detected
    # person holds, has no body box.
    assert pick_body_box(carphone_frames, [None] * 15 + face_boxes[15:]) is not None
    assert pick_body_box(carphone_frames[:3], [None, None, None]) is None
    from skimage import data
    coffee = data.coffee()
    assert pick_body_box([coffee], [(250.0, 100.0, 350.0, 200.0)]) is None
    with pytest.raises(ValueError, match="3 frames but 2 face boxes"):
        pick_body_box(carphone_frames[:3], face_boxes[:2])


def test_pick_body_box_chooses_the_person_whose_face_it_is(detector, faces, astronaut):
    # Two astronauts side by side (the right one mirrored): each body box, a square about as
    # wide as a person is tall, holds both faces, so the pick must come from the face.
    half = astronaut[:, 100:400]
    two = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
    people = detector.detect(two)
    assert len(people) == 2
    left_face = faces.detect(np.ascontiguousarray(two[:, :300])).box
    right = faces.detect(np.ascontiguousarray(two[:, 300:])).box
    right_face = (right[0] + 300, right[1], right[2] + 300, right[3])
    assert all(holds(p.body, left_face) and holds(p.body, right_face) for p in people)
    left_pick = pick_body_box([two], [left_face])
    right_pick = pick_body_box([two], [right_face])
    left_person = min(people, key=lambda p: p.keypoints[0, 0])   # hip centre further left
    right_person = max(people, key=lambda p: p.keypoints[0, 0])
    assert left_person is not right_person
    assert left_pick == pytest.approx(left_person.body)
    assert right_pick == pytest.approx(right_person.body)
    assert holds(left_pick, left_face) and holds(right_pick, right_face)


def test_rejects_bad_input_and_settings(detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(CaerError, match="min person score"):
        PersonDetector(min_score=2.0)


def test_missing_or_corrupt_model_names_the_file(tmp_path, monkeypatch):
    copy = tmp_path / "models"
    shutil.copytree(MODEL_DIR, copy)
    monkeypatch.setattr(persons, "MODEL_DIR", copy)
    persons.load_model_bytes()  # an intact copy loads
    data = bytearray((copy / MODEL_FILE).read_bytes())
    data[5000] ^= 0xFF
    (copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(PersonModelError, match=f"{MODEL_FILE} does not match its SHA256SUMS"):
        PersonDetector().detect(np.zeros((64, 64, 3), np.uint8))
    (copy / "SHA256SUMS").write_text("0" * 64 + "  other.tflite\n")
    with pytest.raises(PersonModelError, match=f"{MODEL_FILE} has no line in"):
        persons.load_model_bytes()
    (copy / MODEL_FILE).unlink()
    with pytest.raises(PersonModelError, match=f"{MODEL_FILE} is missing"):
        persons.load_model_bytes()


def test_pickles_without_its_interpreter(detector, astronaut):
    expected = detector.detect(astronaut)
    clone = pickle.loads(pickle.dumps(detector))
    assert clone._interpreter is None and clone.min_score == detector.min_score
    assert [p.body for p in clone.detect(astronaut)] == [p.body for p in expected]


def test_quiet_and_torch_free():
    # LiteRT announces its XNNPACK delegate on stderr from native code; decode workers must
    # not load torch.
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from pipeline.persons import detect_persons
        detect_persons(np.zeros((64, 64, 3), np.uint8))
        detect_persons(np.zeros((64, 48, 3), np.uint8))
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(MODEL_DIR.parents[1]), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
    assert result.stderr.strip() == "", result.stderr[:2000]
