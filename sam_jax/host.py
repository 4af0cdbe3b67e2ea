"""The yardsticks of a speed measurement: the machine's CPU model, the matmul rate JAX reaches
there, and the FLOPs XLA counts in a computation.

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
from jax.extend.core import jaxpr_as_fun, jaxprs_in_params


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


def xla_flops(fn, *args) -> float:
    """FLOPs of one call `fn(*args)` (arrays or `jax.ShapeDtypeStruct`s) in XLA's cost analysis,
    with every loop's body counted as often as it runs.

    XLA's own count (`compiled.cost_analysis()`) takes a while loop's body once, so a step whose
    work sits in `lax.scan`, `lax.map`, `nn.scan` or a static `fori_loop` would be undercounted by
    the trip count (the main job's full-loop step: 9.96 GFLOP counted so, 28.24 in full). Here
    XLA counts the program before its optimisations (lowered for the CPU, not compiled: within a
    few per cent of the compiled count, without a compile) and each scan's body (nested ones
    included) is counted once per iteration it runs. So work that XLA would hoist out of a loop
    (a loop invariant) counts once per iteration too. A `lax.while_loop` whose trip count is not
    static stays counted once; a `lax.cond` counts as XLA counts it.
    """
    closed_jaxpr = jax.make_jaxpr(fn)(*args)
    return _lowered_flops(closed_jaxpr) + _uncounted_iterations(closed_jaxpr.jaxpr)


def _lowered_flops(closed_jaxpr) -> float:
    """XLA's FLOPs of a closed jaxpr lowered as its own program, loop bodies once."""
    shapes = [jax.ShapeDtypeStruct(aval.shape, aval.dtype) for aval in closed_jaxpr.in_avals]
    program = jax.jit(jaxpr_as_fun(closed_jaxpr))
    try:
        # Backends behind the PJRT C API (GPU, TPU plugins) count compiled programs only; the CPU
        # client counts a lowered one, so an accelerator host need not compile the step twice.
        with jax.default_device(jax.devices("cpu")[0]):
            cost = program.lower(*shapes).cost_analysis()
    except (NotImplementedError, RuntimeError):  # no CPU client, or ops that lower only for the accelerator
        cost = program.lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def _bodies_counted(length: int, unroll: int) -> int:
    """How many copies of a scan's body XLA's count takes: `lax.scan` lowers `unroll` copies in
    a while loop (counted once) and the remainder, or all of them when that is no more than one
    trip."""
    trips, remainder = (0, length) if unroll == 0 else divmod(length, unroll)
    return length if trips <= 1 else unroll + remainder


def _outer_scans(jaxpr):
    """The scan equations of a jaxpr that are not inside another scan, searched through
    sub-jaxprs (jit, remat, custom derivatives)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        elif eqn.primitive.name != "cond":
            for sub in jaxprs_in_params(eqn.params):
                yield from _outer_scans(getattr(sub, "jaxpr", sub))


def _uncounted_iterations(jaxpr) -> float:
    """The FLOPs that XLA's count of `jaxpr` leaves out: the iterations of its scans (and of the
    scans nested in them) beyond the body copies the count takes. Each body is lowered once."""
    uncounted = 0.0
    for eqn in _outer_scans(jaxpr):
        body, length = eqn.params["jaxpr"], eqn.params["length"]
        counted = _bodies_counted(length, int(eqn.params["unroll"]))
        uncounted += (length - counted) * _lowered_flops(body) + length * _uncounted_iterations(body.jaxpr)
    return uncounted
