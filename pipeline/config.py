"""extract's options as a dataclass: cli.py makes one --flag of each field.

Kept free of torch so that the command line (and every process that re-imports it, such as
extract's spawned workers) starts without loading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

DEFAULT_CLIP = "openai/clip-vit-base-patch32"

# --preset NAME: the value of every preprocessing choice. "original" is the original code's
# (zgsfer/CLIP-CAER's data loader), step by step in pipeline/original.py.
PRESETS = {
    "caer": {"frame_order": "natural", "frame_count": "disk", "frame_sampling": "caer",
             "frame_decode": "caer", "face_crop": "caer", "context": "full",
             "context_resize": "caer", "downscale": "fast", "normalize": "clip"},
    "original": {"frame_order": "string", "frame_count": "list", "frame_sampling": "original",
                 "frame_decode": "original", "face_crop": "original", "context": "body",
                 "context_resize": "original", "downscale": "exact", "normalize": "none"},
}
PRESET_NAMES = tuple(PRESETS)


def _option(default, help: str, **more):
    return field(default=default, metadata={"help": help, **more})


@dataclass
class ExtractConfig:
    """Every option of ``extract``: cli.py makes one --flag of each field, with its help."""

    annotations: tuple[str, ...] = _option(
        (), "CSV (path,label[,split,id,metadata...]) or list file (path n_frames label, "
            "1-based); repeat for several files.", metavar="FILE")
    split: tuple[str, ...] = _option(
        (), "Split of list files: once for all, or once per --annotations, in order.",
        metavar="NAME")
    root: str | None = _option(
        None, "Clip paths are relative to this [default: each annotation file's folder].",
        metavar="DIR")
    confine_to_root: bool = _option(
        False, "Record as failed every clip (and frame file) whose real path, symlinks "
               "followed, lies outside --root (default: its annotation file's folder): for "
               "annotation files from elsewhere, above all with --pixels, which stores crops.")
    labels: str = _option("raer5", "Label set: class names and descriptors; a built-in NAME "
                                   "(`python cli.py labels` lists them) or a YAML/JSON FILE of "
                                   "the same shape.", metavar="NAME|FILE")
    clip: str = _option(DEFAULT_CLIP, "CLIP to use: a Hugging Face id (the paper's by default), "
                                      "a local directory written by save_pretrained, or "
                                      "random:tiny|random:vit-b-32|random:vit-b-16 (untrained, "
                                      "offline; tests and timing).", metavar="SPEC")
    segments: int = _option(16, "Segments per clip.")
    candidates: int = _option(1, "Frames kept per segment: 1 = the middle frame; K>1 = K evenly "
                                 "spaced frames, so training can pick one at random.",
                              metavar="K")
    flip: bool = _option(False, "Also store features of horizontally flipped crops.")
    face_model: str = _option("full", "BlazeFace full range (small, far faces) or short range.",
                              choices=("full", "short"))
    min_face_score: float = _option(0.5, "Detections below this score count as no face "
                                         "(whole-frame fallback).")
    face_margin: int = _option(20, "Pixels added around a box.")
    face_resize: str = _option("squash", "Face crop to 224x224: stretch (the original's) or pad.",
                               choices=("squash", "letterbox"))
    face_boxes: str | None = _option(
        None, "The release's face_detection_result.json ({frame folder: {frame file: "
              "[x0,y0,x1,y1]}}) instead of the detector; a clip takes the key that agrees "
              "with its path on the most trailing components.", metavar="JSON")
    # --- preprocessing choices: each defaults to the --preset's value (see PRESETS) ---
    preset: str = _option(
        "caer", "caer: caer-kit's preprocessing. original: every choice of the original "
                "code (listed above); an option given as well wins.",
        choices=tuple(PRESET_NAMES))
    frame_order: str | None = _option(
        None, "Frame files of a folder in natural (2.jpg before 10.jpg) or string order "
              "[caer: natural; original: string].", choices=("natural", "string"))
    frame_count: str | None = _option(
        None, "Frame positions from the frames on disk, or from the list file's count "
              "[caer: disk; original: list].", choices=("disk", "list"))
    frame_sampling: str | None = _option(
        None, "caer: K evenly spaced frames per segment. original: the original's training "
              "frames for --split train clips, its test frame in every slot otherwise "
              "[caer: caer; original: original].", choices=("caer", "original"))
    frame_decode: str | None = _option(
        None, "Folder frames decoded upright (EXIF orientation applied), or by PIL as the "
              "original did [caer: caer; original: original].", choices=("caer", "original"))
    face_crop: str | None = _option(
        None, "caer: box rounded outwards, bicubic resize. original: int() box + margin, "
              "PIL crop, PIL bilinear resize to 224 [caer: caer; original: original].",
        choices=("caer", "original"))
    context: str | None = _option(
        None, "Context crop: the whole frame, or the frame cropped to the clip's body box "
              "(--body-boxes, else the built-in person detector) [caer: full; original: body].",
        choices=("full", "body"))
    body_boxes: str | None = _option(
        None, "The release's body_detection_result.json ({frame folder: [x0,y0,x1,y1]}, one "
              "box per clip, matched like --face-boxes); implies --context body.",
        metavar="JSON")
    context_resize: str | None = _option(
        None, "caer: PIL bicubic letterbox. original: OpenCV's default resize, the original's "
              "padding [caer: caer; original: original].", choices=("caer", "original"))
    downscale: str | None = _option(
        None, "How caer-kit's bicubic crops shrink a large image: fast (PIL's reducing_gap=2: "
              "box-average by whole factors first; a 1080p frame to 224 in a third of the "
              "time, within a few grey levels) or exact (one bicubic pass, as every store "
              "made before this option) [caer: fast; original: exact].",
        choices=("fast", "exact"))
    normalize: str | None = _option(
        None, "CLIP mean/std, or [0,1] pixels as the original code fed "
              "[caer: clip; original: none].", choices=("clip", "none"))
    pixels: bool = _option(False, "Also store the uint8 224x224 crops (finetune).")
    batch_size: int = _option(64, "Images per encoder batch.")
    workers: int = _option(max(1, min(4, (os.cpu_count() or 2) - 1)),
                           "Decode/detect processes (0: in the main process).")
    device: str = _option("auto", "auto: CUDA when present.", choices=("auto", "cpu", "cuda"))
    precision: str = _option("auto", "auto: bf16 on CPUs with native bf16, bf16/fp16 on CUDA, "
                                     "else fp32.", choices=("auto", "fp32", "bf16", "fp16"))
    cache: str = _option("features.zarr", "A .zarr directory, or a .h5 file (single process "
                                          "only).", metavar="PATH")
    retry_failed: bool = _option(False, "Redo clips the store records as failed; a failed clip "
                                        "whose list entry was fixed (path, label, split) "
                                        "takes the corrected entry.")
    # --- store safety (issue 12) ---
    redo_damaged: bool = _option(False, "Read every chunk first (as `info --verify`) and "
                                        "extract the clips with damaged chunks again.")
    wait: bool = _option(False, "If another extract is writing this store, wait for it to "
                                "finish instead of stopping at once.")
    quiet: bool = _option(False, "No progress bar; a log line every 10%.")


    def resolved(self) -> "ExtractConfig":
        """A copy whose preprocessing choices left unset take the preset's values
        (``--body-boxes`` without ``--context`` means body context)."""
        from dataclasses import replace

        values = dict(PRESETS.get(self.preset, {}))
        if self.body_boxes is not None:
            values["context"] = "body"
        given = {name: getattr(self, name) for name in values if getattr(self, name) is not None}
        return replace(self, **{**values, **given})

    def validate(self) -> None:
        """Raise CaerError (exit 2) on options that cannot work, before anything is read;
        call it on ``resolved()``, whose preset choices are filled in."""
        from pathlib import Path

        from cache.core.errors import CaerError

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise CaerError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"not {getattr(self, name)!r}")
        for name in ("segments", "candidates", "batch_size"):
            if getattr(self, name) < 1:
                raise CaerError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers < 0 or self.face_margin < 0:
            raise CaerError("--workers and --face-margin cannot be negative")
        if not 0.0 <= self.min_face_score <= 1.0:
            raise CaerError("--min-face-score must lie in [0, 1]")
        if self.root is not None and not Path(self.root).is_dir():
            raise CaerError(f"--root {self.root}: no such directory")
        self.validate_choices()

    def validate_choices(self) -> None:
        """Raise CaerError (exit 2) on preprocessing choices that cannot go together (call it
        on the ``resolved()`` config)."""
        from cache.core.errors import CaerError

        if self.face_crop == "original" and self.face_resize != "squash":
            raise CaerError("--face-crop original resizes the face as the original did (a "
                            "square stretch): it cannot be combined with --face-resize "
                            "letterbox")
        if self.body_boxes is not None and self.context != "body":
            raise CaerError("--body-boxes is used only with --context body; drop --context "
                            "full or the box file")
        if self.downscale == "fast" and self.face_crop == self.context_resize == "original":
            raise CaerError("--downscale fast changes only caer-kit's crops, and --face-crop "
                            "original with --context-resize original leaves none; drop "
                            "--downscale (the store would record a choice that changed nothing)")


CHOICES = {f.name: f.metadata["choices"] for f in fields(ExtractConfig)
           if "choices" in f.metadata}


# ------------------------------------------------------------------------------ index, labels
# `index LAYOUT ROOT`: fields marked argument=True are positional; the rest are --flags. Each
# layout-specific option names the layouts it applies to, so validate() can refuse a flag that
# would silently do nothing.

LAYOUTS = ("caer", "daisee", "dfew", "folders")
DAISEE_TARGETS = ("engagement", "boredom", "confusion", "frustration")
DFEW_CLIPS = ("auto", "clip_224x224", "clip_224x224_16f", "original")


@dataclass
class IndexConfig:
    """Every option of ``index``: LAYOUT and ROOT are arguments, the rest --flags."""

    layout: str = _option("", "Layout of ROOT.", choices=LAYOUTS, argument=True)
    root: str = _option("", "The dataset's top folder, as downloaded.", argument=True)
    out: str = _option("", "Annotation CSV to write (path,label,split,id + metadata columns).",
                       metavar="FILE.csv")
    target: str = _option("engagement", "daisee: the label column that becomes the label "
                                        "(label set daisee-TARGET4).", choices=DAISEE_TARGETS,
                          layouts=("daisee",))
    fold: int = _option(1, "dfew: which of the five folds (set_N.csv) gives train and test.",
                        layouts=("dfew",))
    clips: str = _option("auto", "dfew: which copy of the clips (auto: the first present of "
                                 "clip_224x224, clip_224x224_16f, original).",
                         choices=DFEW_CLIPS, layouts=("dfew",))
    split_from: str = _option("folder", "folders: folder = ROOT/<split>/<class>/<clip>; "
                                        "none = ROOT/<class>/<clip> (no split).",
                              choices=("folder", "none"), layouts=("folders",))
    labels: str | None = _option(
        None, "Label set whose class names the dataset uses [default: the layout's built-in; "
              "folders: one written from the folder names next to --out].",
        metavar="NAME|FILE")
    force: bool = _option(False, "Replace --out (and its .labels.yaml) if they exist.")

    def validate(self) -> None:
        """Raise CaerError (exit 2) on options that cannot work, before anything is read."""
        from cache.core.errors import CaerError

        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise CaerError(f"{_flag(f)} must be one of {', '.join(meta['choices'])}, "
                                f"not {value!r}")
            if "layouts" in meta and value != f.default and self.layout not in meta["layouts"]:
                raise CaerError(f"{_flag(f)} applies to the {' and '.join(meta['layouts'])} "
                                f"layout only, not {self.layout}")
        if not 1 <= self.fold <= 5:
            raise CaerError(f"--fold must be 1..5 (DFEW's five folds), not {self.fold}")
        if not self.root:
            raise CaerError("ROOT is required")
        if not self.out.lower().endswith(".csv"):
            raise CaerError(f"--out {self.out or '(missing)'}: must end in .csv (extract reads "
                            f"other suffixes as list files)")


@dataclass
class LabelsConfig:
    """``labels [NAME]``: the built-in label sets, or one of them."""

    name: str | None = _option(None, "One label set to show.", argument=True)
    json: bool = _option(False, "Print them as JSON (the shape --labels FILE takes).")


def _flag(f) -> str:
    return "--" + f.name.replace("_", "-") if not f.metadata.get("argument") else f.name.upper()


# ------------------------------------------------------------------------------------- info
# (issue 13) Declared here, not in cache/ (which imports nothing from pipeline/): cache/info.py
# reads the store, this says what `info` is asked for.

@dataclass
class InfoConfig:
    """``info CACHE``: a summary of a cache, optionally after reading every chunk back."""

    cache: str = _option("", "Cache from extract (.zarr or .h5).", argument=True, path=True)
    json: bool = _option(False, "Everything as one JSON object on stdout.")
    all: bool = _option(False, "List every clip, not only the lowest face rates and the "
                               "failures.")
    verify: bool = _option(False, "Read every chunk back first and list each clip whose chunks "
                                  "are missing or damaged (exit status 2 if any).")
