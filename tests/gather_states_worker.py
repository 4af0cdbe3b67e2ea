"""Each process gathers every process's input-iterator state (`sam_jax.training.parallel.gather_data_states`).

  python tests/gather_states_worker.py OUT.npz [--process-id I --num-processes P --port N]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import device_workers


def main() -> None:
    args = device_workers.init_worker()
    from sam_jax.training.parallel import gather_data_states

    # States of different lengths: the gather pads and cuts them back.
    state = {"process": args.process_id, "position": [3, 5 + args.process_id], "pad": "x" * (7 * args.process_id)}
    np.savez(args.out, gathered=np.array(json.dumps(gather_data_states(state))))


if __name__ == "__main__":
    main()
