"""`extract --preset original` stores exactly the crops the original data loader fed its model.

`OriginalLoader` below is an independent re-implementation, in test code, of what the
original's `VideoDataset.get` does to one clip (zgsfer/CLIP-CAER, dataloader/
video_dataloader.py and video_transform.py): glob + sort of the folder, frame positions from
the list file's count, `Image.open`, the face box truncated with int() and grown by 20 px,
a PIL crop, the body box cropped by PIL, converted to BGR, resized by cv2 and padded with
copyMakeBorder, back to RGB, `GroupResize` (PIL bilinear to 224), `Stack` and
`ToTorchFormatTensor`. It runs as the authors ran it: list files and box-file keys that name
the real folders. caer-kit gets what a user has: list files with the prefix stripped and
the release's box files, whose keys carry the authors' absolute prefix.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import open_store
from pipeline.config import ExtractConfig
from pipeline.extract import run_extract

AUTHORS = "/media/F/FERDataset/AER-DB/RAER"  # the prefix the release's keys carry
S, K = 16, 4


# ------------------------------------------------------------------ the reference loader

class OriginalLoader:
    """One clip as the original's VideoDataset (num_segments 16, duration 1, image_size 224)
    turns it into tensors; `mode` is "train" or "test"."""

    def __init__(self, face_boxes: dict, body_boxes: dict, size: int = 224):
        self.face_boxes, self.body_boxes, self.size = face_boxes, body_boxes, size

    @staticmethod
    def test_offsets(n: int) -> list[int]:
        if n > S:
            tick = (n - 1 + 1) / float(S)
            return [int(tick / 2.0 + tick * x) for x in range(S)]
        return list(np.pad(np.arange(n), (0, S - n), "edge"))

    @staticmethod
    def train_offsets(n: int, rng: np.random.RandomState) -> list[int]:
        average = (n - 1 + 1) // S
        if average > 0:
            return list(np.arange(S) * average + rng.randint(average, size=S))
        if n > S:
            return list(np.sort(rng.randint(n - 1 + 1, size=S)))
        return list(np.pad(np.arange(n), (0, S - n), "edge"))

    def _letterbox_bgr(self, bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        ratio = min(self.size / w, self.size / h)
        nw, nh = int(w * ratio), int(h * ratio)
        bgr = cv2.resize(bgr, (nw, nh))
        pad_w, pad_h = (self.size - nw) // 2, (self.size - nh) // 2
        extra_h = 1 if 2 * pad_h + nh < self.size else 0
        extra_w = 1 if 2 * pad_w + nw < self.size else 0
        return cv2.copyMakeBorder(bgr, pad_h, pad_h + extra_h, pad_w, pad_w + extra_w,
                                  borderType=cv2.BORDER_CONSTANT, value=[0, 0, 0])

    def frames(self, folder: str, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(face, context) float tensors [16, 3, 224, 224] in [0, 1]."""
        paths = glob.glob(os.path.join(folder, "*"))
        paths.sort()
        faces, contexts = [], []
        for offset in offsets:
            path = paths[int(offset)]  # IndexError when the list count exceeds the folder
            parent, name = os.path.dirname(path), os.path.basename(path)
            box = self.face_boxes.get(parent, {}).get(name)
            image = Image.open(path)
            body = self.body_boxes.get(parent)
            body_image = image.crop(tuple(body)) if body is not None else image
            bgr = cv2.cvtColor(np.array(body_image), cv2.COLOR_RGB2BGR)
            rgb = cv2.cvtColor(self._letterbox_bgr(bgr), cv2.COLOR_BGR2RGB)
            contexts.append(Image.fromarray(rgb.astype("uint8")))
            face = Image.open(path)
            if box is not None:
                x0, y0, x1, y1 = (int(v) for v in box)
                face = face.crop((max(0, x0 - 20), max(0, y0 - 20),
                                  min(face.width, x1 + 20), min(face.height, y1 + 20)))
            faces.append(face)
        return self._to_tensor(faces), self._to_tensor(contexts)

    def _to_tensor(self, group: list) -> torch.Tensor:
        group = [img.resize((self.size, self.size), Image.BILINEAR) for img in group]  # GroupResize
        stacked = np.concatenate(group, axis=2)  # Stack
        tensor = torch.from_numpy(stacked).permute(2, 0, 1).contiguous()  # ToTorchFormatTensor
        tensor = tensor.to(torch.float32).div(255)
        return tensor.reshape(-1, 3, self.size, self.size)


# ------------------------------------------------------------------ the dataset

def _frame(rng: np.random.RandomState, width: int, height: int, number: int) -> np.ndarray:
    """A frame unlike its neighbours: smooth random texture plus the frame number's stripe."""
    small = rng.randint(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).copy()
    rgb[:, (number * 7) % width] = 255
    return rgb


# folder -> (frames on disk, the list file's count, size, split)
CLIPS = {
    "0001": (23, 23, (101, 67), "train"),    # unpadded names: string order differs
    "0002": (9, 9, (101, 67), "train"),      # shorter than 16 frames; no body box, no face box
    "0003": (50, 50, (97, 71), "train"),     # 3 training frames per segment: repeated to K=4
    "0004": (90, 90, (320, 180), "train"),   # 5 per segment: 4 of them; frames shrink
    "0005": (30, 20, (101, 67), "test"),     # the list counts fewer frames than the folder holds
    "0006": (17, 17, (97, 71), "test"),
    "0007": (12, 40, (101, 67), "test"),     # the list counts more: the original fails on it
    "0008": (5, 5, (97, 71), "test"),        # short test clip
}


@pytest.fixture(scope="module")
def raer(tmp_path_factory):
    """RAER-shaped data; returns (root, caer-kit's list files, release box files, the
    original's box dicts keyed by the real folders)."""
    root = tmp_path_factory.mktemp("raer") / "RAER"
    rng = np.random.RandomState(0)
    face_release, body_release, face_real, body_real = {}, {}, {}, {}
    for folder, (n_disk, _, (w, h), _) in CLIPS.items():
        directory = root / "Images" / folder
        directory.mkdir(parents=True)
        for i in range(1, n_disk + 1):
            Image.fromarray(_frame(rng, w, h, i)).save(directory / f"{i}.jpg", quality=90)
        boxes = {}
        if folder != "0002":
            for i in range(1, n_disk + 1):
                if i % 3 == 0:
                    continue  # frames without a face box
                x0, y0 = rng.uniform(-5, w / 2), rng.uniform(-5, h / 2)  # near or past an edge
                boxes[f"{i}.jpg"] = [round(x0, 3), round(y0, 3),
                                     round(x0 + rng.uniform(8, w / 2 + 25), 3),
                                     round(y0 + rng.uniform(8, h / 2 + 25), 3)]
            face_release[f"{AUTHORS}/Images/{folder}"] = boxes
            face_real[str(directory)] = boxes
        if folder not in ("0002", "0006"):
            body = [round(rng.uniform(0, w / 3), 2), round(rng.uniform(0, h / 4), 2),
                    round(rng.uniform(w / 2, w + 3), 2), round(rng.uniform(h / 2, h), 2)]
            body_release[f"{AUTHORS}/Images/{folder}"] = body
            body_real[str(directory)] = body
    lists = {}
    for split in ("train", "test"):
        lines = [f"Images/{f} {listed} {1 + int(f) % 5}"
                 for f, (_, listed, _, s) in CLIPS.items() if s == split]
        lists[split] = root / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    face_file, body_file = root / "face_detection_result.json", root / "body_detection_result.json"
    face_file.write_text(json.dumps(face_release))
    body_file.write_text(json.dumps(body_release))
    return root, lists, (face_file, body_file), (face_real, body_real)


@pytest.fixture(scope="module")
def preset_store(raer, tiny_clip_dir, tmp_path_factory):
    root, lists, (face_file, body_file), _ = raer
    cache = tmp_path_factory.mktemp("preset") / "raer.zarr"
    summary = run_extract(ExtractConfig(
        annotations=(str(lists["train"]), str(lists["test"])), split=("train", "test"),
        root=str(root), clip=str(tiny_clip_dir), candidates=K, pixels=True, preset="original",
        face_boxes=str(face_file), body_boxes=str(body_file), workers=0, batch_size=32,
        precision="fp32",
        quiet=True, cache=str(cache)))
    return cache, summary


# ------------------------------------------------------------------ the comparison

def _stored(store, i: int):
    face = store.pixels("face")[i]  # uint8 [S, K, 3, 224, 224]
    context = store.pixels("context")[i]
    return face, context, store.frame_indices[i]


@pytest.mark.slow
def test_stored_crops_equal_the_original_loaders_pixel_for_pixel(raer, preset_store):
    root, _, _, (face_real, body_real) = raer
    cache, summary = preset_store
    store = open_store(cache)
    manifest = store.manifest.set_index("id")
    reference = OriginalLoader(face_real, body_real)
    rng = np.random.RandomState(1)
    compared = 0
    for folder, (n_disk, listed, _, split) in CLIPS.items():
        row = manifest.loc[f"Images/{folder}"]
        real = str(root / "Images" / folder)
        if folder == "0007":
            with pytest.raises(IndexError):
                reference.frames(real, reference.test_offsets(listed))
            assert row.status == "failed" and "past the 12 on disk" in row.reason
            continue
        assert row.status == "ok", row.reason
        face, context, index = _stored(store, manifest.index.get_loc(f"Images/{folder}"))
        if split == "test":
            offsets = reference.test_offsets(listed)
            want_face, want_context = reference.frames(real, offsets)
            for k in range(K):  # the test frame in every candidate slot
                np.testing.assert_array_equal(index[:, k], offsets)
                assert torch.equal(torch.from_numpy(face[:, k]).float().div(255), want_face)
                assert torch.equal(torch.from_numpy(context[:, k]).float().div(255),
                                   want_context)
                compared += 2 * S
            continue
        # Train: every candidate is a frame the original's training draws in that segment,
        # and every frame it can draw is a candidate when it has at most K per segment.
        drawn = np.array([reference.train_offsets(listed, rng) for _ in range(400)])
        for s in range(S):
            possible = set(drawn[:, s].tolist())
            assert set(index[s].tolist()) <= possible, (folder, s)
            if len(possible) <= K:
                assert set(index[s].tolist()) == possible, (folder, s)
        for k in range(K):
            want_face, want_context = reference.frames(real, list(index[:, k]))
            assert torch.equal(torch.from_numpy(face[:, k]).float().div(255), want_face)
            assert torch.equal(torch.from_numpy(context[:, k]).float().div(255), want_context)
            compared += 2 * S
    assert compared == 2 * S * K * (len(CLIPS) - 1)


def test_string_order_and_the_list_count_decide_the_frames(raer, preset_store):
    cache, _ = preset_store
    store = open_store(cache)
    manifest = store.manifest.set_index("id")
    i = manifest.index.get_loc("Images/0005")
    # 30 files, the list says 20: tick 1.25, the original's int(tick / 2 + tick * s).
    np.testing.assert_array_equal(store.frame_indices[i][:, 0],
                                  [int(0.625 + 1.25 * s) for s in range(16)])
    assert "list file says 20 frames, 30 on disk (list used)" in manifest.loc["Images/0005"].note
    # Training frames of a 50-frame clip: 3 per segment, repeated into 4 candidates.
    j = manifest.index.get_loc("Images/0003")
    np.testing.assert_array_equal(store.frame_indices[j][2], [6, 7, 7, 8])
    # A 90-frame clip: 5 per segment, 4 evenly spaced of them.
    j = manifest.index.get_loc("Images/0004")
    np.testing.assert_array_equal(store.frame_indices[j][1], [5, 6, 8, 9])
    fp = store.fingerprint
    assert (fp["frame_order"], fp["frame_count"], fp["frame_sampling"], fp["frame_decode"],
            fp["face_crop"], fp["context"], fp["context_resize"], fp["normalize"]) == (
        "string", "list", "original", "original", "original", "body", "original", "none")


def test_body_boxes_stored_per_clip_and_counts_reported(raer, preset_store):
    import hashlib

    from cache.info import info_text, store_info

    root, _, (face_file, body_file), (face_real, body_real) = raer
    cache, summary = preset_store
    store = open_store(cache)
    manifest = store.manifest
    body = store.body_boxes[:]
    for i, row in enumerate(manifest.itertuples()):
        want = body_real.get(str(root / row.id))
        if row.status != "ok" or want is None:
            assert np.isnan(body[i]).all()
        else:
            np.testing.assert_allclose(body[i], want, rtol=1e-6)
    assert store.fingerprint["body_boxes"] == hashlib.sha256(body_file.read_bytes()).hexdigest()
    assert store.fingerprint["face_boxes"] == hashlib.sha256(face_file.read_bytes()).hexdigest()

    # Counted independently: distinct kept frames whose file has no box in the release.
    ok = np.flatnonzero(manifest.status == "ok")
    frames = without = clips_without = 0
    for i in ok:
        folder = root / manifest.id[i]
        files = sorted(os.listdir(folder))
        kept = np.unique(store.frame_indices[i])
        have = [files[p] in face_real.get(str(folder), {}) for p in kept]
        frames, without = frames + len(kept), without + have.count(False)
        clips_without += not any(have)
    body_without = sum(np.isnan(body[i]).any() for i in ok)
    face_line = (f"face boxes: {clips_without} of {len(ok)} ok clips have no box in any kept "
                 f"frame; {without} of {frames} kept frames have none")
    body_line = f"body boxes: {body_without} of {len(ok)} ok clips have none"
    assert clips_without == 1 and body_without == 2 and 0 < without < frames
    text = "\n".join(summary.box_lines)
    assert face_line in text and body_line in text
    assert f"--face-boxes {face_file}: 1 of 8 clips match no key" in text
    assert f"--body-boxes {body_file}: 2 of 8 clips match no key" in text
    info = info_text(store_info(cache))
    assert face_line in info and body_line in info


def test_an_option_given_with_the_preset_wins(raer):
    cfg = ExtractConfig(preset="original", context="full", normalize="clip").resolved()
    assert (cfg.context, cfg.normalize, cfg.frame_order) == ("full", "clip", "string")
    assert ExtractConfig(body_boxes="b.json").resolved().context == "body"
    assert ExtractConfig().resolved().frame_sampling == "caer"


def test_extract_help_says_what_the_preset_sets():
    from cli import main

    from pipeline.config import PRESETS

    text = CliRunner().invoke(main, ["extract", "--help"]).output
    listed = [line.split()[:2] for line in text.splitlines() if line.strip().startswith("--")]
    for name, value in PRESETS["original"].items():
        assert ["--" + name.replace("_", "-"), value] in listed, name


# ------------------------------------------------------------------ matching box-file keys

def test_a_clip_takes_the_key_with_the_longest_trailing_agreement(tmp_path):
    from pipeline.boxes import BoxFileError, load_face_boxes

    path = tmp_path / "face.json"
    path.write_text(json.dumps({
        "/media/D/zlm/RAER/Images/0001": {"1.jpg": [1, 2, 3, 4]},
        "/media/F/AER-DB/new_confusion/Images/0001": {"1.jpg": [5, 6, 7, 8]},
        "C:\\data\\RAER\\Images\\0002": {"1.jpg": [1, 1, 2, 2]},
        "Images/0003/": {},
    }))
    boxes = load_face_boxes(str(path))
    assert boxes.match("/home/me/RAER/Images/0001") == "/media/D/zlm/RAER/Images/0001"
    assert boxes.match("/x/new_confusion/Images/0001").endswith("new_confusion/Images/0001")
    assert boxes.match("/home/me/RAER/Images/0002") == "C:/data/RAER/Images/0002"
    assert boxes.match("/anything/Images/0003") == "Images/0003"
    assert boxes.match("/home/me/RAER/Images/0004") is None
    with pytest.raises(BoxFileError, match="matches two keys equally .2 trailing path"):
        boxes.match("/home/me/elsewhere/Images/0001")


def test_an_ambiguous_key_exits_2_and_writes_nothing(raer, tiny_clip_dir, tmp_path):
    from cli import main

    root, lists, (face_file, _), _ = raer
    data = json.loads(face_file.read_text())
    data["/media/F/other/Images/0001"] = {}  # agrees with Images/0001 as far as the real key
    data = {k.replace("/RAER/", "/raer/"): v for k, v in data.items()}
    boxes = tmp_path / "face.json"
    boxes.write_text(json.dumps(data))
    cache = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, [
        "extract", "--annotations", str(lists["train"]), "--split", "train", "--root",
        str(root), "--clip", str(tiny_clip_dir), "--face-boxes", str(boxes), "--cache",
        str(cache), "--workers", "0"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --face-boxes {boxes}: clip {root}/Images/0001 matches "
                               f"two keys equally")
    assert not cache.exists() and not list(tmp_path.glob("out.zarr*"))


@pytest.mark.slow
def test_context_body_without_a_box_file_crops_to_the_detected_person(carphone, tiny_clip_dir,
                                                                       tmp_path):
    """A real video of a man in a car: the person detector's box holds his face, the store
    keeps it, and the context crop is that box letterboxed."""
    from pipeline.crops import crop_box, letterbox
    from pipeline.persons import pick_body_box
    from pipeline.video import read_frames

    csv = tmp_path / "one.csv"
    csv.write_text(f"path,label\n{carphone},1\n")
    cache = tmp_path / "body.zarr"
    summary = run_extract(ExtractConfig(annotations=(str(csv),), clip=str(tiny_clip_dir),
                                        segments=4, context="body", pixels=True, workers=0,
                                        quiet=True, cache=str(cache)))
    assert summary.exit_code == 0
    store = open_store(cache)
    body = store.body_boxes[0]
    assert store.fingerprint["body_boxes"].startswith("detector:")
    index, found, faces = store.frame_indices[0][:, 0], store.face_found[0][:, 0], \
        store.face_boxes[0][:, 0]
    assert found.all() and not np.isnan(body).any()
    assert (body[:2] <= faces[:, :2]).all() and (body[2:] >= faces[:, 2:]).all()
    frames = read_frames(carphone, index)
    want = pick_body_box([frames[int(i)] for i in index], [tuple(b) for b in faces])
    np.testing.assert_allclose(body, want, atol=1e-3)
    x0, y0, x1, y1 = crop_box(body, 176, 144, margin=0)
    for s, i in enumerate(index):
        np.testing.assert_array_equal(store.pixels("context")[0][s, 0].transpose(1, 2, 0),
                                      letterbox(frames[int(i)][y0:y1, x0:x1]))
    assert "body boxes: 0 of 1 ok clips have none" in "\n".join(summary.box_lines)


def test_a_frame_kept_in_several_slots_is_encoded_once_into_each(raer, preset_store,
                                                                  tiny_clip_dir):
    """Each slot's features are the encoding of that slot's stored crop (repeated frames are
    encoded once and copied: a wrong copy would give a slot another frame's features)."""
    from pipeline.clip import load_clip
    from pipeline.crops import to_clip_pixels

    cache, summary = preset_store
    store = open_store(cache)
    clip = load_clip(str(tiny_clip_dir))
    ids = list(store.manifest.id)
    for folder in ("0003", "0005", "0002"):
        i = ids.index(f"Images/{folder}")
        for stream in ("face", "context"):
            crops = store.pixels(stream)[i].reshape(-1, 3, 224, 224).transpose(0, 2, 3, 1)
            with torch.no_grad():
                want = clip.encode_images(to_clip_pixels(crops, "none")).numpy()
            got = store.features(stream)[i].reshape(len(crops), -1).astype(np.float32)
            np.testing.assert_allclose(got, want, atol=5e-3, rtol=5e-3)


def test_each_slot_gets_the_features_of_its_own_frame():
    """The copy from distinct frames back to slots, with an encoder whose output tells every
    crop apart (random:tiny's barely varies with the image)."""
    from pipeline.encode import stack_views, to_clip_result
    from pipeline.prepare import PreparedClip

    s, k, size = 4, 3, 8
    index = np.array([[0, 1, 1], [2, 2, 2], [5, 3, 5], [7, 7, 7]])
    frames = {n: np.full((size, size, 3), 10 * n + 1, np.uint8) for n in range(8)}
    result = PreparedClip(
        0, "ok", note="", n_frames=8, fps=0.0, width=size, height=size, frame_index=index,
        box=np.zeros((s, k, 4), np.float32), score=np.zeros((s, k), np.float32),
        found=np.zeros((s, k), bool), body_box=None,
        face=np.stack([np.stack([frames[n] for n in row]) for row in index]),
        context=np.stack([np.stack([255 - frames[n] for n in row]) for row in index]))
    images = stack_views(result, flip=True)
    assert len(images) == 4 * len(np.unique(index))  # each distinct frame once per view
    features = images.reshape(len(images), -1)[:, :5].astype(np.float16)  # the pixels
    fp = {"segments": s, "candidates": k, "flip": True, "pixels": False}
    out = to_clip_result(result, features, fp)
    for si in range(s):
        for ki in range(k):
            n = index[si, ki]
            assert (out.features["face"][si, ki] == 10 * n + 1).all()
            assert (out.features["context"][si, ki] == 254 - 10 * n).all()
            assert (out.features["face_flip"][si, ki] == 10 * n + 1).all()


def test_an_official_run_asks_for_a_preset_original_cache(tmp_path):
    from cache.fingerprint import fingerprint_mismatch, make_fingerprint
    from cli import main
    from heads.evaluate import extract_command, required_fingerprint
    from pipeline.config import PRESETS
    from cache.core.labels import load_label_set

    run_config = {"kind": "import-official", "clip": {"dir": "clip", "revision": "r"},
                  "model": {"feature_dim": 512}, "labels": load_label_set("raer5").as_dict(),
                  "preprocessing": {**PRESETS["original"], "face_resize": "squash",
                                    "face_margin": 20, "segments": 16, "image_size": 224}}
    wanted = required_fingerprint(run_config)
    assert {k: wanted[k] for k in PRESETS["original"]} == PRESETS["original"]
    command = extract_command(run_config, tmp_path / "official")
    for part in ("--preset original", "--face-boxes face_detection_result.json",
                 "--body-boxes body_detection_result.json", f"--clip {tmp_path}/official/clip"):
        assert part in command, command
    assert "--normalize" not in command and "--frame-order" not in command
    main.commands["extract"].make_context("extract", command.split()[3:])

    # A store written before these choices existed compares as caer-kit's own.
    base = dict(clip_spec="c", clip_revision="r", feature_dim=512, image_size=224,
                segments=16, candidates=1, flip=False, pixels=False, normalize="clip",
                face_model="full", face_margin=20, min_face_score=0.5, face_resize="squash",
                face_boxes=None, labels=load_label_set("raer5"))
    old = {k: v for k, v in make_fingerprint(**base).items() if k not in PRESETS["caer"]
           or k == "normalize"}
    assert "frame_order" not in old
    assert fingerprint_mismatch(old, make_fingerprint(**base)) == []
    assert fingerprint_mismatch(old, make_fingerprint(**base, frame_order="string")) == [
        "frame_order"]


def test_predict_crops_as_an_official_run_was_fed(caplog):
    from heads.predict import run_preprocessing
    from pipeline.config import PRESETS

    run_config = {"kind": "import-official", "model": {"segments": 16},
                  "preprocessing": {**PRESETS["original"], "face_resize": "squash",
                                    "face_margin": 20, "segments": 16, "image_size": 224}}
    with caplog.at_level("WARNING"):
        values = run_preprocessing(run_config, 224)
    for key in ("frame_order", "frame_sampling", "frame_decode", "face_crop", "context",
                "context_resize", "normalize"):
        assert values[key] == PRESETS["original"][key], key
    assert "person the built-in detector finds" in caplog.text
    assert run_preprocessing({"model": {"segments": 16}}, 224)["face_crop"] == "caer"


@pytest.mark.parametrize("args, message", [
    (["--preset", "original", "--face-resize", "letterbox"],
     "--face-crop original resizes the face as the original did"),
    (["--context", "full", "--body-boxes", "BODY"], "--body-boxes is used only with --context "
                                                    "body"),
    (["--preset", "original", "--downscale", "fast"], "--downscale fast changes only"),
])
def test_choices_that_cannot_go_together_exit_2_and_write_nothing(raer, tiny_clip_dir, tmp_path,
                                                                  args, message):
    from cli import main

    root, lists, (_, body_file), _ = raer
    args = [str(body_file) if a == "BODY" else a for a in args]
    cache = tmp_path / "never.zarr"
    result = CliRunner().invoke(main, ["extract", "--annotations", str(lists["test"]),
                                       "--split", "test", "--root", str(root), "--clip",
                                       str(tiny_clip_dir), "--cache", str(cache), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not cache.exists()
