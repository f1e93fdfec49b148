"""The demo's last two stages: a short ``ablate`` (context only against face + context, two
seeds, both baselines) and one ``explain`` picture, through the commands' library calls."""

from __future__ import annotations

from pathlib import Path

from heads.config import DemoConfig
from heads.demo import print_stage, shell_command, short_path


def run_analyses(config: DemoConfig, cache: Path, run: Path, out: Path, echo) -> dict:
    """Stages 5 and 6: a short ablation (context only against face + context, two seeds, both
    baselines) and one Grad-CAM picture, with the same library calls as the commands."""
    from heads.ablate import run_ablate
    from heads.config import AblateConfig, ExplainConfig, TrainConfig
    from heads.explain import explain

    ablate_dir, cams = out / "ablate", out / "explain"
    epochs = max(1, config.epochs // 6)  # four more runs: a sixth of the epochs each
    print_stage(5, "ablate", "context only against face + context, two seeds each, and the "
                        "zero-shot and linear-probe baselines")
    echo(shell_command(["ablate", "--cache", cache, "--out", ablate_dir, "--streams", "context,both",
                 "--seeds", "1,2", "--baselines", "zero-shot,linear-probe", "--epochs", epochs,
                 "--lr-temporal", config.lr_temporal, "--quiet"]))
    echo(f"      four ordinary train-head runs ({epochs} epochs each, selected on val, scored on "
         f"test) in {short_path(ablate_dir / 'runs')}/")
    run_ablate(AblateConfig(cache=str(cache), out=str(ablate_dir), streams="context,both",
                            seeds=(1, 2), baselines="zero-shot,linear-probe",
                            train=TrainConfig(epochs=epochs, lr_temporal=config.lr_temporal,
                                              quiet=True)))
    summary = ablate_dir / "summary.md"
    table = [line for line in summary.read_text(encoding="utf-8").splitlines()
             if line.startswith("|")]
    echo("\n".join("      " + line for line in table) + "\n")

    print_stage(6, "explain", "Grad-CAM on the crops and temporal attention, one test clip")
    echo(shell_command(["explain", "--run", run, "--cache", cache, "--split", "test", "--limit", 1,
                 "--out", cams]))
    result = explain(ExplainConfig(run=str(run), cache=str(cache), split="test", limit=1,
                                   out=str(cams)), progress=False)
    png = cams / result["clips"][0]["file"].replace(".npz", ".png")
    echo(f"      the cache holds no crops (no --pixels), so the clip was re-decoded with the "
         f"cache's frames and face boxes\n      picture: {png}\n")
    return {"ablate_summary": str(summary), "ablate_results": str(ablate_dir / "results.csv"),
            "explain_png": str(png)}
