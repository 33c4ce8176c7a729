"""Markdown summary of the committed benchmark results, as it appears in the README.

    python benchmarks/summarize.py                 # print it
    python benchmarks/summarize.py --write-readme  # replace the block between the README's markers

tests/test_readme.py checks that the README block equals this script's output.
"""

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "step_cost_cpu.json"
START, END = "<!-- step-cost:start -->", "<!-- step-cost:end -->"
ROWS = ["sam", "wsam", "gsam", "asam", "esam", "looksam", "looksam_host", "sam_chunks", "sam_chunks_unroll",
        "contrib_opaque", "contrib_transparent"]


def summary(path=RESULTS) -> str:
    res = json.loads(pathlib.Path(path).read_text())
    m = res["machine"]
    models = list(res["models"])
    out = [f"Measured with `sam-optax bench` on {m['cpu_count']} CPU cores ({m['platform']}, jax {m['jax']}), "
           f"XLA threads: {res['settings'].get('threads', 'all')}, batch {res['settings']['batch_size']}, "
           f"{res['settings']['rounds']} interleaved rounds of {res['settings']['steps_per_round']} steps, ratios as "
           f"medians of the per-round ratios "
           f"(`benchmarks/results/{pathlib.Path(path).name}`).", ""]
    head = "| step | " + " | ".join(f"{x}: x base | {x}: x SAM | {x}: x contrib" for x in models) + " |"
    out += [head, "|" + " --- |" * (1 + 3 * len(models))]
    for row in ["base"] + ROWS:
        cells = []
        for name in models:
            t = res["models"][name]["methods"]
            r = t[row]
            cells += [f"{r['ratio_to_base']:.2f}", f"{r['ratio_to_sam']:.2f}", f"{r['ratio_to_contrib_opaque']:.2f}"]
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    out += ["", "XLA's cost analysis of the compiled steps (per step; LookSAM counts both branches of its cond):", "",
            "| step | " + " | ".join(f"{x}: FLOPs x SAM | {x}: bytes x SAM" for x in models) + " |",
            "|" + " --- |" * (1 + 2 * len(models))]
    for row in ["base", "sam", "gsam", "esam", "sam_chunks", "sam_chunks_unroll", "contrib_opaque"]:
        cells = []
        for name in models:
            t = res["models"][name]["methods"]
            cells += [f"{t[row]['flops'] / t['sam']['flops']:.2f}",
                      f"{t[row]['bytes_accessed'] / t['sam']['bytes_accessed']:.2f}"]
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    out += ["", "| target | " + " | ".join(models) + " |", "|" + " --- |" * (1 + len(models))]
    keys = list(res["models"][models[0]]["targets"])
    for key in keys:
        goal = res["models"][models[0]]["targets"][key]["target"]
        cells = [f"{res['models'][x]['targets'][key]['value']:.3f} {'met' if res['models'][x]['targets'][key]['met'] else '**not met**'}"
                 for x in models]
        out.append(f"| {key} {goal} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    text = summary()
    if args.write_readme:
        readme = ROOT / "README.md"
        s = readme.read_text()
        i, j = s.index(START) + len(START), s.index(END)
        readme.write_text(s[:i] + "\n" + text + "\n" + s[j:])
    else:
        print(text)


if __name__ == "__main__":
    main()
