"""Does interactive training pay off? The small synthetic config trained three ways, same budget.

    python -m experiments.ablation        # ~25 min on 2 CPU cores (550 steps at 0.95 / 4.3 / 1.13
                                          # steps/s, ~100 s of evaluation each); workdir/ablation/

    interactive     the paper's 11 iterations: 1 prompt, 8 corrections, 2 mask-only
    single_prompt   1 iteration: one point or box per mask, no correction, no feedback
    no_mask_only    9 iterations: the loop without the two mask-only iterations

Each variant trains `synthetic_cpu` for the same number of steps on the same
batches (same seed), from the same initial params, then is evaluated with
`experiments.eval`'s point protocol at original resolution on the whole
held-out split. A finished variant is not trained again (delete its folder
to retrain); an interrupted one resumes. Writes workdir/ablation/
ablation.json, ablation.md (the README's table) and miou_vs_clicks.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from experiments import eval as evaluation
from experiments import train
from experiments.train_configs import get_config
from sam_jax.data.pipeline import DEFAULT_DATA_DIR
from sam_jax.training.loop import TrainingError, check_workdir_config

BASE_CONFIG = "synthetic_cpu"
# The paper's comparison: every step runs its variant's loop (no single-prompt steps first), 550
# steps at a constant learning rate. `--set` overrides come after these.
BASE_OVERRIDES = ("optimizer.decay_steps=()", "single_prompt_steps=0", "optimizer.total_steps=550")
VARIANTS = {
    "interactive": (),
    "single_prompt": ("interactive.num_correction_points=0", "interactive.num_mask_only=0"),
    "no_mask_only": ("interactive.num_mask_only=0",),
}
TABLE_CLICKS = ("1", "3", "5", "9")


def table(results: dict) -> str:
    """Markdown: mIoU (most confident mask) at 1, 3, 5, 9 clicks per variant."""
    lines = ["| training | iterations | " + " | ".join(f"{c} click{'s' * (c != '1')}" for c in TABLE_CLICKS) + " |",
             "|---|---|" + "---|" * len(TABLE_CLICKS)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['iterations']} | " + " | ".join(f"{r['points']['miou'][c]:.3f}" for c in TABLE_CLICKS)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdir/ablation")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field of every variant's config (e.g. optimizer.total_steps=100)")
    parser.add_argument("--num-images", type=int, help="held-out images to evaluate (default: the whole split)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    results = {}
    for name, variant in VARIANTS.items():
        run_dir = workdir / name
        overrides = BASE_OVERRIDES + tuple(args.overrides) + variant
        config = get_config(BASE_CONFIG, overrides)
        if not (run_dir / "model").is_dir():
            command = ["--config", BASE_CONFIG, "--workdir", str(run_dir), "--data-dir", args.data_dir]
            command += [f"--set={o}" for o in overrides]
            if train.main(command + ["--no-progress"] * args.no_progress) != 0:
                return 2
        try:
            check_workdir_config(run_dir.absolute(), config)  # a finished run of another config is refused
            evaluated = evaluation.evaluate_checkpoint(
                str(run_dir / "model"), config.data.dataset, config.data.eval_split, args.data_dir, args.num_images,
                ["points"], progress=not args.no_progress)
        except (TrainingError, ValueError, FileNotFoundError) as err:
            print(f"ablation: error: {err}", file=sys.stderr)
            return 2
        evaluation.write_results(run_dir / "eval", evaluated)
        results[name] = {"overrides": list(overrides), "iterations": config.interactive.num_iterations,
                         "steps": config.total_steps, "points": evaluated["points"]}
    (workdir / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    (workdir / "ablation.md").write_text(table(results))
    evaluation.plot_miou_vs_clicks(workdir / "miou_vs_clicks.png", {k: v["points"] for k, v in results.items()},
                                   f"{BASE_CONFIG}: same steps, three training loops")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
