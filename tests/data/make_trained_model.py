"""Writes synthetic_cpu_official.npz: a model the project trained, in the official state_dict layout,
for tests that need masks which follow objects (random weights give one or two records after NMS).

    python -m experiments.train                                   # the README's main job (~15 min)
    python tests/data/make_trained_model.py workdir/synthetic_cpu/model

The export's params are mapped back to the official modules' keys by the inverse converter
(`checkpoints_convert.official.flax_to_official`) and stored as float16 (the tests load them
as float32 into both models, so both run the same weights).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from checkpoints_convert.official import flax_to_official  # noqa: E402
from sam_jax.weights import load_params, read_metadata  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_cpu_official.npz")


def main() -> None:
    export = sys.argv[1]
    config, params = load_params(export)
    if config.name != "vit_synthetic":
        raise SystemExit(f"{export} is a {config.name} model, not the main job's vit_synthetic")
    state = {k: v.astype(np.float16) for k, v in flax_to_official(params).items()}
    source = f"{read_metadata(export)['source']} of `python -m experiments.train` (synthetic_cpu)"
    np.savez_compressed(OUT, source=np.array(source), **state)
    print(f"wrote {OUT}: {len(state)} tensors, {sum(v.size for v in state.values())} values, from {source}")


if __name__ == "__main__":
    main()
