"""The README's short results summary, generated from the committed results (the details are on
the docs' benchmark pages).

    python benchmarks/headline.py                 # print it
    python benchmarks/headline.py --write-readme  # replace the README block between its markers

tests/test_benchmark_pages.py checks that the README block equals this script's output.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _pages  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
STEPS = ("sam", "looksam_host", "sam_chunks", "esam")  # the step-cost rows shown


def _step_cost() -> list[str]:
    res = json.loads((RESULTS / "step_cost_cpu.json").read_text())
    models = list(res["models"])
    machine = res["machine"]
    lines = [
        f"Step time as a multiple of the base step (SGD with momentum), measured side by side on "
        f"{machine['cpu_count']} CPU cores (jax {machine['jax']}; "
        + ("GPU figures: the step-cost page" if (RESULTS / "step_cost_gpu.json").exists() else "no GPU figures yet")
        + "):",
        "",
        "| step | " + " | ".join(models) + " |",
        "| --- |" + " --- |" * len(models),
    ]
    for row in STEPS:
        cells = [res["models"][x]["methods"].get(row) for x in models]
        ratios = ["-" if c is None else f"{c['ratio_to_base']:.2f}x" for c in cells]
        lines.append(f"| {row} | " + " | ".join(ratios) + " |")
    targets = [(k, t) for x in models for k, t in res["models"][x]["targets"].items()]
    missed = sorted({k for k, t in targets if t["applies"] and t["met"] is False})
    lines += ["", f"Targets not met on some model: {', '.join(f'`{k}`' for k in missed)} (why: the step-cost page)."]
    return lines


def _frontier() -> list[str]:
    summary = json.loads((RESULTS / "frontier" / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    shown = ["sgd", "sam"] + [m for m, r in rows.items() if r["pareto"] and m not in ("sgd", "sam")]
    lines = [
        f"Accuracy against cost on MNIST-1D (1-D CNN, {summary['settings']['epochs']} epochs, mean over "
        f"{summary['settings']['seeds']} seeds, each method tuned on a validation split): SGD, SAM and the "
        "methods on the Pareto front:",
        "",
        "| method | test acc. (%) | cost (x SGD) |",
        "| --- | --- | --- |",
    ]
    for m in shown:
        acc, cost = rows[m]["accuracy"], rows[m]["cost"]
        lines.append(f"| {m} | {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} | {cost:.2f} |")
    return lines


def headline() -> str:
    return "\n".join(_step_cost() + [""] + _frontier())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true", help="replace the README block")
    args = parser.parse_args(argv)
    text = headline()
    if args.write_readme:
        _pages.write_block(README, START, END, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
