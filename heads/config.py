"""Stage two's command options as dataclasses (evaluate, predict, import-official, demo,
train-head, finetune, ...): cli.py makes one --flag of each field.

Kept free of torch so that the command line (and every process that re-imports it, such as
extract's spawned workers) starts without loading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

from pipeline.config import ExtractConfig


# ============================================================== evaluate, predict, import-official
# (issue 13) Declared here, not beside their code, so that cli.py builds their options without
# importing torch.

DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: this process's GPU when CUDA is present)."


def _check_device_name(device: str) -> None:
    from cache.core.errors import CaerError

    if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()):
        raise CaerError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def _require(**values) -> None:
    from cache.core.errors import CaerError

    for name, value in values.items():
        if not value:
            raise CaerError(f"--{name.replace('_', '-')} is required")


@dataclass
class EvaluateConfig:
    """``evaluate`` options: a run scored on one split of a cache."""

    run: str = field(default="", metadata={
        "help": "Run directory from train-head, finetune or import-official."})
    cache: str = field(default="", metadata={
        "help": "Cache from extract (.zarr or .h5); must match the run's CLIP and "
                "preprocessing, else the command that builds a matching one is printed."})
    split: str = field(default="test", metadata={"help": "Manifest split to score."})
    out: str | None = field(default=None, metadata={
        "help": "Directory for report.json, predictions.csv, confusion_matrix.png "
                "[default: RUN/eval/<cache name>-<split>]."})
    json: bool = field(default=False, metadata={
        "help": "Print the report as JSON on stdout (and nothing else there)."})
    group_by: str | None = field(default=None, metadata={
        "help": "Also score each value of this manifest metadata column (e.g. scene).",
        "metavar": "COLUMN"})
    batch_size: int = field(default=64, metadata={"help": "Clips per forward pass."})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})
    allow_pending: bool = field(default=False, metadata={
        "help": "Score the finished clips of a split that still has pending ones (an extract "
                "running or killed); refused by default."})

    def validate(self) -> None:
        """Raise CaerError (exit 2) on options that cannot work, before anything is read."""
        from cache.core.errors import CaerError

        _require(run=self.run, cache=self.cache)
        if self.batch_size < 1:
            raise CaerError(f"--batch-size must be at least 1, not {self.batch_size}")
        _check_device_name(self.device)


@dataclass
class PredictConfig:
    """``predict`` options: labels for clips straight from disk."""

    run: str = field(default="", metadata={
        "help": "Run directory from train-head, finetune or import-official."})
    paths: tuple[str, ...] = field(default=(), metadata={
        "help": "Video files or folders of frames.", "argument": True, "metavar": "PATHS..."})
    json: bool = field(default=False, metadata={
        "help": "Print the predictions as JSON on stdout (and nothing else there)."})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})

    def validate(self) -> None:
        from cache.core.errors import CaerError

        _require(run=self.run)
        if not self.paths:
            raise CaerError("no clip given: pass one or more video files or frame folders")
        _check_device_name(self.device)


@dataclass
class ImportOfficialConfig:
    """``import-official`` options: a checkpoint of the original release -> a run."""

    checkpoint: str = field(default="", metadata={
        "help": "The release's .pth file.", "argument": True, "metavar": "CHECKPOINT"})
    out: str = field(default="", metadata={"help": "Run directory to write."})
    labels: str = field(default="raer5", metadata={
        "help": "Label set the checkpoint was trained with: raer5, caer7 or a YAML/JSON file.",
        "metavar": "NAME|FILE"})
    force: bool = field(default=False, metadata={"help": "Replace --out if it exists."})

    def validate(self) -> None:
        _require(checkpoint=self.checkpoint, out=self.out)


@dataclass
class DemoConfig:
    """``demo`` options: the offline dataset, then extract -> train-head -> evaluate."""

    out: str = field(default="demo_out", metadata={
        "help": "Directory for the dataset, cache, run and report (a previous demo directory "
                "is replaced; any other non-empty directory is refused)."})
    clips_per_class: int = field(default=14, metadata={
        "help": "Clips per scene (2 val and 4 test each; the rest train); at least 8."})
    seed: int = field(default=0, metadata={"help": "Seed of the dataset's clip cuts."})
    epochs: int = field(default=20, metadata={"help": "train-head epochs."})
    # The paper's 1e-2 suits RAER's ~2,200 training clips; on the demo's 40 the temporal
    # transformers memorise the training set within a few epochs at 1e-2, and a tenth of it
    # generalises better (test UAR 0.66 -> 0.79, mean of seeds 42-45).
    lr_temporal: float = field(default=1e-3, metadata={
        "help": "train-head's lr of the temporal transformers (the paper's 1e-2 overfits the "
                "demo's 40 training clips)."})
    workers: int = field(default=ExtractConfig.workers, metadata={
        "help": "extract's decode/face-detection processes (as extract's default)."})

    def validate(self) -> None:
        from cache.core.errors import CaerError

        if self.clips_per_class < 8:
            raise CaerError(f"--clips-per-class must be at least 8 (2 val, 4 test and 2 train "
                            f"per scene), not {self.clips_per_class}")
        if self.epochs < 1:
            raise CaerError(f"--epochs must be at least 1, not {self.epochs}")
        if self.workers < 0:
            raise CaerError(f"--workers must be 0 or more, not {self.workers}")



@dataclass
class TrainConfig:
    """train-head options. Defaults are the paper's recipe (docs/reproducing.md)."""

    cache: str = field(default="", metadata={"help": "Cache from `extract`."})
    out: str = field(default="", metadata={"help": "Run directory to write."})
    n_ctx: int = field(default=8, metadata={"help": "Learnable prompt context vectors per class."})
    temporal_layers: int = field(default=1, metadata={"help": "Depth of each temporal transformer."})
    streams: str = field(default="both", metadata={
        "help": "both | face | context (face uses the face-only descriptors)."})
    epochs: int = field(default=20, metadata={"help": "Training epochs."})
    batch_size: int = field(default=8, metadata={"help": "Clips per optimizer step (global)."})
    drop_last: bool = field(default=False, metadata={
        "help": "Drop each epoch's last, partial batch, as the original's DataLoader does "
                "(default: train on it)."})
    lr_temporal: float = field(default=1e-2, metadata={"help": "SGD lr of the temporal transformers."})
    lr_prompt: float = field(default=1e-3, metadata={"help": "SGD lr of the prompt context."})
    lr_fusion: float = field(default=1e-5, metadata={"help": "SGD lr of the fusion Linear."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay."})
    milestones: tuple[int, ...] = field(default=(10, 15), metadata={
        "help": "Epochs at which every lr is multiplied by --gamma (comma-separated)."})
    gamma: float = field(default=0.1, metadata={"help": "lr factor at each milestone."})
    val_fraction: float = field(default=0.1, metadata={
        "help": "Stratified fraction of train held out for model selection (ignored when the "
                "cache has a val split; 0: none)."})
    val_seed: int = field(default=0, metadata={
        "help": "Seed of that split: the same for every --seeds run."})
    select: str = field(default="val-uar", metadata={
        "help": "Saved weights: val-uar (best validation epoch) | last. --val-fraction 0 "
                "--select last is the original's protocol without its test-set selection."})
    seeds: tuple[int, ...] = field(default=(42,), metadata={
        "help": "One run per seed (RUN/seed-N/ and RUN/summary.json when more than one)."})
    max_steps: int | None = field(default=None, metadata={
        "help": "Stop after this many optimizer steps (smoke tests, benchmarks)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (auto: CUDA when present)."})
    precision: str = field(default="auto", metadata={
        "help": "auto | fp32 | bf16 | fp16: the training step's autocast (auto: bf16 on CUDA "
                "when supported, else fp16; bf16 on CPUs with native bf16, else fp32).",
        "choices": ("auto", "fp32", "bf16", "fp16")})
    resume: bool = field(default=False, metadata={
        "help": "Continue a killed run in --out from its last finished epoch."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})
    allow_pending: bool = field(default=False, metadata={
        "help": "Train on the finished clips of a cache that still has pending ones (an "
                "extract running or killed); refused by default."})

    # The recipe is the config's type: what finetune does differently is said here, once.
    kind: ClassVar[str] = "train-head"  # the run's config.json kind
    reencodes_crops: ClassVar[bool] = False  # cached features; finetune re-encodes crops

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step."""
        return 1

    @property
    def image_encoder_lr(self) -> float | None:
        """The CLIP image encoder's lr; None: it stays frozen."""
        return None

    @property
    def init_run(self) -> str | None:
        """The run whose weights training starts from; None: a new head."""
        return None

    def validate(self) -> None:
        """Every bad flag is refused here, before anything is read or written."""
        import math

        from cache.core.errors import CaerError

        if not self.cache:
            raise CaerError("--cache is required")
        if not self.out:
            raise CaerError("--out is required")
        if self.streams is not None and self.streams not in ("both", "face", "context"):
            raise CaerError(f"--streams {self.streams}: choose both, face or context")
        if self.select not in ("val-uar", "last"):
            raise CaerError(f"--select {self.select}: choose val-uar or last")
        if self.device not in ("auto", "cpu", "cuda"):
            raise CaerError(f"--device {self.device}: choose auto, cpu or cuda")
        if self.device == "cuda" and not _cuda_available():
            raise CaerError("--device cuda: no CUDA device is available (use --device cpu)")
        for name in ("epochs", "batch_size", "n_ctx", "temporal_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CaerError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise CaerError("--max-steps must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise CaerError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CaerError("--seeds must list distinct integers, e.g. 42,43,44")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise CaerError(f"--milestones must be increasing positive epochs, not {self.milestones}")
        for name in ("lr_temporal", "lr_prompt", "lr_fusion", "momentum", "weight_decay", "gamma"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise CaerError(f"--{name.replace('_', '-')} must be a finite number >= 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise CaerError(f"--precision {self.precision}: choose auto, fp32, bf16 or fp16")
        if self.precision == "fp16" and not (
                self.device == "cuda" or (self.device == "auto" and _cuda_available())):
            raise CaerError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
        self.validate_recipe()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.batch_size % (world * self.micro_batches):
            raise CaerError(f"--batch-size {self.batch_size} must be divisible by the number of "
                            f"processes ({world}) x --accumulate ({self.micro_batches})")

    def validate_recipe(self) -> None:
        """The checks of the options only this recipe has."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class FinetuneConfig(TrainConfig):
    """finetune options: train-head's, plus the image encoder's."""

    n_ctx: int | None = field(default=None, metadata={
        "help": "Prompt context vectors per class (default: the --init run's, else 8)."})
    temporal_layers: int | None = field(default=None, metadata={
        "help": "Temporal transformer depth (default: the --init run's, else 1)."})
    streams: str | None = field(default=None, metadata={
        "help": "both | face | context (default: the --init run's, else both)."})
    init: str = field(default="none", metadata={
        "help": "A train-head (or finetune) run to start from, or none (train from scratch)."})
    lr_image_encoder: float = field(default=1e-5, metadata={"help": "SGD lr of the CLIP image encoder."})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute the image encoder's activations in backward (less memory)."})
    accumulate: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step (the batch size stays --batch-size)."})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes (decode, augment)."})
    augment: str = field(default="ours", metadata={
        "choices": ["ours", "original"],
        "help": "ours | original. ours: one rotation (+-4 degrees, bilinear) and one flip per "
                "clip, shared by face and context. original: as the original code, rotation "
                "and flip drawn for each stream on its own, PIL's nearest rotation, the face "
                "rotated as its raw crop (squashed caches)."})

    kind: ClassVar[str] = "finetune"
    reencodes_crops: ClassVar[bool] = True

    @property
    def micro_batches(self) -> int:
        return self.accumulate

    @property
    def image_encoder_lr(self) -> float | None:
        return self.lr_image_encoder

    @property
    def init_run(self) -> str | None:
        return None if self.init in ("none", "", None) else self.init

    def validate_recipe(self) -> None:
        from cache.core.errors import CaerError

        if self.workers < 0:
            raise CaerError("--workers must be >= 0")
        if self.accumulate < 1:
            raise CaerError("--accumulate must be at least 1")
        if self.lr_image_encoder < 0:
            raise CaerError("--lr-image-encoder must be >= 0")
        choices = next(f for f in fields(self) if f.name == "augment").metadata["choices"]
        if self.augment not in choices:
            raise CaerError(f"--augment {self.augment}: choose one of {', '.join(choices)}")


# ============================================================================ ablate, explain
# (issue 15) The grid axes are strings, not tuples: an empty value means "the grid's own
# default" (8 tokens / 1 layer / both streams; --grid table6 its own rows), which a tuple
# default could not tell apart from the same value given explicitly.

# train-head options that ablate sets itself per run (the grid axes, the run directory).
ABLATE_SETS = ("cache", "out", "n_ctx", "temporal_layers", "streams", "seeds", "resume")
GRIDS = ("product", "table6")
BASELINES = ("zero-shot", "linear-probe")


@dataclass
class AblateConfig:
    """ablate options. ``train`` carries every other train-head option to each run."""

    cache: str = field(default="", metadata={"help": "Cache from `extract`."})
    out: str = field(default="", metadata={
        "help": "Directory for runs/, results.csv, summary.csv, summary.md, summary.png; "
                "running again resumes, a larger grid adds only its new runs."})
    grid: str = field(default="product", metadata={
        "choices": list(GRIDS),
        "help": "product: every combination of the lists below; table6: the paper's Table 6 "
                "rows (1, 2, 3 layers at 8 tokens; 4, 8, 12, 16 tokens at 1 layer) with "
                "--streams face,both."})
    n_ctx: str = field(default="", metadata={
        "metavar": "LIST", "help": "Prompt context lengths, comma-separated [default: 8]."})
    temporal_layers: str = field(default="", metadata={
        "metavar": "LIST", "help": "Temporal transformer depths, comma-separated [default: 1]."})
    streams: str = field(default="", metadata={
        "metavar": "LIST", "help": "Any of both, face, context, comma-separated "
                                   "[default: both; with --grid table6: face,both]."})
    seeds: tuple[int, ...] = field(default=(42,), metadata={
        "help": "One run per seed and configuration (comma-separated)."})
    baselines: str = field(default="zero-shot,linear-probe", metadata={
        "metavar": "LIST", "help": "zero-shot, linear-probe (comma-separated), or none."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"cli": False})

    def validate(self) -> None:
        """The checks that need no parsing of the grid (heads/ablate.py's check_ablate parses
        it and checks every run's train-head options)."""
        from cache.core.errors import CaerError

        _require(cache=self.cache, out=self.out)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CaerError("ablate runs its train-head runs one after another in one process; "
                            "start it without torchrun")


@dataclass
class ExplainConfig:
    """explain options: Grad-CAM maps and temporal attention of a run, per clip."""

    run: str = field(default="", metadata={"help": "Run directory (train-head, finetune, ...)."})
    out: str = field(default="", metadata={
        "help": "Directory for one .npz and .png per clip, index.csv and index.html."})
    cache: str | None = field(default=None, metadata={
        "help": "Explain clips of this cache (with --ids or --split)."})
    ids: tuple[str, ...] = field(default=(), metadata={
        "metavar": "ID", "help": "A clip id of --cache (repeat the option for more)."})
    split: str | None = field(default=None, metadata={
        "help": "Explain the clips of this split of --cache (see --limit)."})
    limit: int | None = field(default=None, metadata={
        "help": "At most this many clips of --split, in store order [default: all]."})
    target: str | None = field(default=None, metadata={
        "metavar": "CLASS", "help": "Explain this class's logit [default: the predicted class]."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    paths: tuple[str, ...] = field(default=(), metadata={
        "help": "Video files or folders of frames to explain (instead of --cache's clips).",
        "argument": True, "path": True, "metavar": "[PATHS]..."})

    def validate(self) -> None:
        """Raise CaerError (exit 2) on options that cannot work together, before anything is
        read (--target and --out are checked against the run and the disk by explain)."""
        from cache.core.errors import CaerError

        _require(run=self.run, out=self.out)
        if bool(self.cache) == bool(self.paths):
            raise CaerError("give either --cache (with --ids or --split) or clip paths, not both"
                            if self.cache else "nothing to explain: give --cache CACHE with --ids "
                            "or --split, or clip paths (video files, frame folders)")
        if self.cache and bool(self.ids) == bool(self.split):
            raise CaerError("with --cache give either --ids or --split")
        if (self.ids or self.split or self.limit is not None) and not self.cache:
            raise CaerError("--ids, --split and --limit select clips of --cache")
        if self.limit is not None and self.limit < 1:
            raise CaerError("--limit must be at least 1")
        if self.limit is not None and not self.split:
            raise CaerError("--limit goes with --split")
