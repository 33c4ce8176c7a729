"""Step-cost benchmark of sam_optax's methods (see sam_optax/benchmarking.py).

    python benchmarks/step_cost.py [--threads one|all] [--rounds 20] ...   # same as: sam-optax bench ...

prints a table of step-time ratios (to the base optimizer and to
optax.contrib.sam), compile times and peak memory, and writes
benchmarks/results/step_cost_<backend><tag>.json.
"""

import sys

from sam_optax import benchmarking

if __name__ == "__main__":
    sys.exit(benchmarking.launch(sys.argv[1:]))
