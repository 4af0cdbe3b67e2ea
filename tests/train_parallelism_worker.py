"""Trains `synthetic_smoke` once per parallelism ("fsdp", "pmap") in this one process, on the CPU
devices XLA_FLAGS gives it, so that model init and evaluation compile once for both runs.

  python tests/train_parallelism_worker.py DATA_DIR OUT_DIR OVERRIDE...   ->  OUT_DIR/<parallelism>/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

from experiments.train_configs import get_config  # noqa: E402
from sam_jax.training.config import PARALLELISMS  # noqa: E402
from sam_jax.training.loop import train_and_evaluate  # noqa: E402


def main() -> None:
    data_dir, out, *overrides = sys.argv[1:]
    for parallelism in PARALLELISMS:
        config = get_config("synthetic_smoke", (*overrides, f"parallelism={parallelism}"))
        train_and_evaluate(config, Path(out) / parallelism, data_dir, progress=False)


if __name__ == "__main__":
    main()
