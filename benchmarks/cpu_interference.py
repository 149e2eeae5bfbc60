"""Does work on one core slow a jitted matmul pinned to another? (issue 14 point 2: the loop's step
runs slower than the step alone even when the input pipeline has a core of its own.)

    .venv/bin/python benchmarks/cpu_interference.py [--size 1024] [--rounds 2]

Linux, two or more cores. XLA's threads run on the first core of this process's CPU set; a second
process runs on the second, either spinning in Python (``spin``: no memory traffic) or adding to an
array of 64 MiB (``memory``: streams through the caches). Each round times the matmul alone, then
with the other process running; milliseconds per call, the median of 20 calls. Where the two cores
are independent the two times agree; a slower second time says the cores share something (an
SMT sibling, a frequency limit, the memory bus), so no host work is free on that machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

LOADS = {
    "spin": "while True: pass",
    "memory": "import numpy as np\na = np.ones(8 << 20)\nwhile True: a += 1.0",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="the matmul is (a @ a) @ a of a [size, size]")
    p.add_argument("--rounds", type=int, default=2, help="alone / loaded pairs per kind of load")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        p.error(f"needs Linux and two cores (this process may use {len(cpus) or 'an unknown number of'})")
    os.sched_setaffinity(0, {cpus[0]})   # before JAX starts its CPU client: its threads inherit it
    import jax
    import numpy as np

    a = jax.numpy.ones((args.size, args.size))
    f = jax.jit(lambda x: (x @ x) @ x)
    f(a).block_until_ready()

    def timed() -> float:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            f(a).block_until_ready()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3

    print(f"matmul on core {cpus[0]}, load on core {cpus[1]}; ms per call, median of 20")
    for kind, code in LOADS.items():
        for r in range(args.rounds):
            alone = timed()
            load = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpus[1]}}})\n{code}"])
            try:
                time.sleep(1.0)   # the load process started and running
                loaded = timed()
            finally:
                load.kill()
                load.wait()
            print(f"{kind} round {r + 1}: alone {alone:.1f}, with the load {loaded:.1f} "
                  f"({(loaded / alone - 1) * 100:+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
