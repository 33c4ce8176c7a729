"""Step-cost benchmark of sam_optax's methods (see sam_optax/benchmarking.py).

    python benchmarks/step_cost.py            # or: sam-optax bench

prints a table of step-time ratios (to the base optimizer and to
optax.contrib.sam), compile times and peak memory, and writes
benchmarks/results/step_cost_<backend>.json.
"""

import argparse
import os

from sam_optax import benchmarking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    res = benchmarking.run(batch_size=args.batch_size, rounds=args.rounds, steps_per_round=args.steps_per_round,
                           out_dir=args.out)
    print(benchmarking.format_table(res))
    print(f"\nsaved {res['saved_to']}")


if __name__ == "__main__":
    main()
