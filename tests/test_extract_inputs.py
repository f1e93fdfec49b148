"""extract on inputs people really have: list files from another machine, paths that leave
--root (and --confine-to-root), on real frame folders and real symlinks."""

from __future__ import annotations

import os

import numpy as np
from click.testing import CliRunner

from cache import open_store
from cli import main
from conftest import moving_square_frames, write_frame_folder
from pipeline.prepare import moved_prefix


def _extract(*args):
    result = CliRunner().invoke(main, ["extract", "--clip", "random:tiny", "--workers", "0",
                                       "--segments", "4", "--batch-size", "8", "--quiet", *args])
    return result


def _reasons(cache):
    with open_store(cache) as store:
        m = store.manifest
        return dict(zip(m["id"], zip(m["status"], m["reason"])))


def test_absolute_paths_from_another_machine_name_the_prefix_to_strip(tmp_path):
    root = tmp_path / "RAER"
    write_frame_folder(root / "Images" / "0001", moving_square_frames(8, (48, 64)))
    listing = root / "train.txt"
    listing.write_text("/home/author/datasets/RAER/Images/0001 8 1\n"
                       "RAER/Images/0001 8 2\n"          # the root's own name given twice
                       "/home/author/nothing/here 8 3\n")
    cache = tmp_path / "c.zarr"
    result = _extract("--annotations", str(listing), "--split", "train", "--root", str(root),
                      "--cache", str(cache))
    assert result.exit_code == 3, result.output
    reasons = _reasons(cache)
    status, reason = reasons["/home/author/datasets/RAER/Images/0001"]
    assert status == "failed" and "\n" not in reason
    assert reason == (f"file not found; {root / 'Images' / '0001'} exists: the annotation paths "
                      f"carry a prefix from another machine or layout; strip "
                      f"'/home/author/datasets/RAER/' from them")
    assert reasons["RAER/Images/0001"][1].endswith("strip 'RAER/' from them")
    assert reasons["/home/author/nothing/here"] == ("failed", "file not found")
    # After stripping as told, the clip is found.
    listing.write_text("Images/0001 8 1\n")
    fixed = tmp_path / "fixed.zarr"
    result = _extract("--annotations", str(listing), "--split", "train", "--root", str(root),
                      "--cache", str(fixed))
    assert result.exit_code == 0, result.output
    assert _reasons(fixed) == {"Images/0001": ("ok", "")}


def test_moved_prefix_prefers_the_longest_trailing_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    assert moved_prefix("/x/y/a/b", str(tmp_path)).endswith("strip '/x/y/' from them")
    assert moved_prefix("/x/y/q/b", str(tmp_path)).endswith("strip '/x/y/q/' from them")
    assert moved_prefix(str(tmp_path / "z" / "a" / "b"), str(tmp_path)).endswith(
        "strip 'z/' from them")
    assert moved_prefix("/x/y/nothing", str(tmp_path)) == ""


def test_confine_to_root_refuses_paths_and_symlinks_that_leave_it(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "private"
    frames = moving_square_frames(8, (48, 64))
    write_frame_folder(root / "inside", frames)
    write_frame_folder(elsewhere / "photos", frames[::-1])  # images that are not the dataset's
    write_frame_folder(root / "mixed", frames)
    os.remove(root / "mixed" / "3.jpg")
    os.symlink(elsewhere / "photos" / "3.jpg", root / "mixed" / "3.jpg")  # one planted frame
    os.symlink(elsewhere / "photos", root / "linked")  # a planted folder
    listing = root / "list.txt"
    listing.write_text("inside 8 1\n../private/photos 8 2\nlinked 8 3\nmixed 8 4\n"
                       "/dev/urandom 8 5\n")

    # Without the option, any readable images go in; with --pixels, their crops too.
    open_cache = tmp_path / "open.zarr"
    result = _extract("--annotations", str(listing), "--split", "train", "--pixels",
                      "--cache", str(open_cache))
    assert result.exit_code == 3, result.output
    reasons = _reasons(open_cache)
    assert reasons["../private/photos"] == ("ok", "") and reasons["linked"] == ("ok", "")
    assert reasons["/dev/urandom"] == ("failed", "not a regular file (a device, FIFO or socket)")

    confined = tmp_path / "confined.zarr"
    result = _extract("--annotations", str(listing), "--split", "train", "--pixels",
                      "--confine-to-root", "--cache", str(confined))
    assert result.exit_code == 3, result.output
    reasons = _reasons(confined)
    assert reasons["inside"] == ("ok", "")
    for clip_id in ("../private/photos", "linked", "mixed", "/dev/urandom"):
        status, reason = reasons[clip_id]
        assert status == "failed" and reason.startswith(f"outside --root {root} (")
        assert reason.endswith("--confine-to-root refuses it") and "\n" not in reason
    assert "resolves to " + str(elsewhere / "photos") in reasons["linked"][1]
    assert "resolves to " + str(elsewhere / "photos" / "3.jpg") in reasons["mixed"][1]
    with open_store(open_cache) as store:  # unconfined, the private photos' crops are stored
        row = int(np.flatnonzero(store.manifest["id"] == "../private/photos")[0])
        assert store.pixels("context")[row].any()


def test_a_two_stream_video_and_a_mac_copied_folder_extract_with_their_notes(tmp_path):
    from test_video import _apple_double, _two_stream_video

    _two_stream_video(tmp_path / "angles.mkv", default=None)
    folder = write_frame_folder(tmp_path / "0001", moving_square_frames(12, (48, 64)))
    for i in range(1, 13):
        (folder / f"._{i}.jpg").write_bytes(_apple_double(f"{i}.jpg"))
    (tmp_path / "list.txt").write_text("angles.mkv 12 1\n0001 12 2\n")
    cache = tmp_path / "c.zarr"
    result = _extract("--annotations", str(tmp_path / "list.txt"), "--split", "train",
                      "--cache", str(cache))
    assert result.exit_code == 0, result.output
    with open_store(cache) as store:
        m = store.manifest.set_index("id")
    assert (m.loc["angles.mkv", "width"], m.loc["angles.mkv", "height"]) == (128, 96)
    assert m.loc["angles.mkv", "note"] == "2 video streams; read stream #1 (the largest, 128x96)"
    assert m.loc["0001", "n_frames"] == 12 and m.loc["0001", "note"] == ""
    assert (m["status"] == "ok").all()
