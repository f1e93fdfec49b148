"""caer-kit command line: extract -> train-head / finetune -> evaluate / predict.

Run ``python cli.py --help`` (or ``caer --help`` once installed). Exit statuses: 0 success,
1 an unexpected internal error, 2 unusable arguments or input (one line on stderr, nothing
written), 3 extract finished but some clips failed (the store is valid; see ``info``).
"""

from __future__ import annotations

import logging
import os
import sys

import click

# Make `python cli.py` work from a fresh clone before `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline import __version__  # noqa: E402
from pipeline.clip import DEFAULT_CLIP  # noqa: E402
from pipeline.errors import CaerError  # noqa: E402

CLIP_HELP = ("CLIP to use: a Hugging Face id (default: the paper's "
             f"{DEFAULT_CLIP}), a local directory written by save_pretrained, or "
             "random:tiny|random:vit-b-32|random:vit-b-16 (untrained, offline; tests and timing).")


def _not_built(name: str):
    raise CaerError(f"'{name}' is not built yet in caer-kit {__version__}", exit_code=1)


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
    Stage one, once:   extract    clips -> per-frame CLIP features of face and context (a cache)
    Stage two, often:  train-head the temporal encoders, fusion and prompts, from the cache alone
    Full recipe:       finetune   end to end, image encoder unfrozen at lr 1e-5
    Results:           evaluate   UAR, WAR, per-class recall, confusion matrix
                       predict    labels for new clips, straight from video
    Also:              info, import-official (the authors' weights), demo (offline, minutes)

    Start with `python cli.py demo`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")


@main.command()
def extract():
    """Decode clips, find faces, and write CLIP features of face and context to a cache.

    \b
    In:  annotation CSV or list files, clips (video files or folders of frames)
    Out: a .zarr directory (default) or .h5 file; see docs/cache-format.md
    Example:
      python cli.py extract --annotations train.txt --split train --root RAER/ \\
          --cache raer.zarr
    """
    _not_built("extract")


@main.command()
def info():
    """Summarise a cache: counts, failures with reasons, face-detection rate, fingerprint.

    \b
    Example:
      python cli.py info raer.zarr --json
    """
    _not_built("info")


@main.command("train-head")
def train_head():
    """Train the temporal encoders, fusion layer and prompts on cached features only.

    \b
    In:  a cache from `extract`
    Out: a run directory (config.json, weights, metrics.jsonl, curves.png)
    Example:
      python cli.py train-head --cache raer.zarr --out runs/head
    """
    _not_built("train-head")


@main.command()
def finetune():
    """The paper's full recipe: train end to end with the image encoder unfrozen at lr 1e-5.

    \b
    In:  a cache built with `extract --pixels`, optionally a train-head run to start from
    Out: a run directory with the fine-tuned CLIP inside
    Example:
      python cli.py finetune --cache raer.zarr --init runs/head --out runs/ft
    """
    _not_built("finetune")


@main.command()
def evaluate():
    """UAR, WAR, per-class recall/precision/F1 and the confusion matrix of a run on a cache.

    \b
    Example:
      python cli.py evaluate --run runs/head --cache raer.zarr --split test --out report/
    """
    _not_built("evaluate")


@main.command()
def predict():
    """Label new clips (video files or frame folders) straight from disk with a trained run.

    \b
    Example:
      python cli.py predict --run runs/head clip1.mp4 frames_dir/
    """
    _not_built("predict")


@main.command("import-official")
def import_official():
    """Convert a checkpoint of the original CLIP-CAER release into a caer-kit run.

    \b
    Reads the pickle without executing anything from it.
    Example:
      python cli.py import-official model_best.pth --out runs/official
    """
    _not_built("import-official")


@main.command()
def demo():
    """Build a small offline dataset, then extract, train-head and evaluate it (minutes).

    \b
    Example:
      python cli.py demo --out demo_out
    """
    _not_built("demo")


if __name__ == "__main__":
    main()
