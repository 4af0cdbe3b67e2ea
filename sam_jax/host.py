"""The yardsticks of a speed measurement: the machine's CPU model, the matmul rate JAX reaches
there, and the FLOPs XLA counts in a compiled computation.

Hosts differ several-fold in matmul rate, so a speed figure is reported beside
the rate measured in the same run, on the same machine, and the CPU's name.
"""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9B14"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
    """JAX's (n, n) @ (n, n) rate in `dtype` on the default device, FLOP/s (median of `repeats`)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def compiled_flops(compiled) -> float:
    """FLOPs in XLA's cost analysis of a compiled computation (`jax.jit(f).lower(...).compile()`),
    0.0 where the backend gives none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))
