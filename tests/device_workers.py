"""Running a test worker script on K fake CPU devices, as one or several `jax.distributed` processes.

A worker calls `init_worker()` first (it parses OUT [--process-id --num-processes
--port] and joins the localhost cluster, gloo collectives) and saves its
results to OUT as .npz; the test calls `run_workers` and gets them back.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def init_worker() -> argparse.Namespace:
    """Parses the worker's arguments and, for several processes, initialises jax.distributed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.num_processes > 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes, process_id=args.process_id)
    return args


def cpu_devices_env(count: int) -> dict:
    """os.environ with XLA_FLAGS asking for `count` CPU devices, the inherited flags (conftest's FAST_COMPILE) kept."""
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    return dict(os.environ, XLA_FLAGS=xla_flags.strip())


def run_workers(worker: str, tmp_path, num_processes: int, devices_per_process: int) -> list:
    """Runs `worker` as `num_processes` processes of `devices_per_process` CPU devices; their .npz contents."""
    import numpy as np

    env = cpu_devices_env(devices_per_process)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / f"process_{i}.npz" for i in range(num_processes)]
    workers = [
        subprocess.Popen(
            [sys.executable, worker, str(out), "--process-id", str(i), "--num-processes", str(num_processes), "--port", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, out in enumerate(outs)
    ]
    for w in workers:
        log, _ = w.communicate(timeout=600)
        assert w.returncode == 0, log[-3000:]
    return [dict(np.load(out)) for out in outs]
