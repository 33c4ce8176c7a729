"""Markdown summary of a step-cost benchmark results JSON (CPU or GPU), as docs/benchmarks/step_cost.md shows it.

    python benchmarks/summarize.py                                  # the CPU results, printed
    python benchmarks/summarize.py --write-docs                     # replace the block in docs/benchmarks/step_cost.md
    python benchmarks/summarize.py benchmarks/results/step_cost_gpu.json --out benchmarks/results/step_cost_gpu.md

tests/test_benchmark_pages.py checks that the page's block equals this script's output for the
committed CPU results.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _pages  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "step_cost_cpu.json"
PAGE = ROOT / "docs" / "benchmarks" / "step_cost.md"
START, END = "<!-- step-cost:start -->", "<!-- step-cost:end -->"
# The order of the rows; methods in a results file but not here come after them.
ROWS = [
    "base",
    "sam",
    "wsam",
    "gsam",
    "asam",
    "esam",
    "esam_skip",
    "esam_swp",
    "esam_sds",
    "looksam",
    "looksam_host",
    "looksam_reuse",
    "sam_chunks",
    "sam_chunks_b4",
    "sam_chunks_vmap",
    "sam_chunks_unroll",
    "contrib_opaque",
    "contrib_transparent",
]


def summary(path=RESULTS) -> str:
    """The markdown block of one results file."""
    res = json.loads(pathlib.Path(path).read_text())
    models = list(res["models"])
    rows = _rows(res)
    out = [_header(res, pathlib.Path(path).name), ""]
    out += _table(
        ["step"] + [f"{x}: {c}" for x in models for c in ("x base", "x SAM", "x contrib")],
        [[row] + [c for x in models for c in _ratios(res["models"][x]["methods"].get(row))] for row in rows],
    )
    out += [
        "",
        "XLA's cost analysis and memory of the compiled steps (per step; LookSAM counts both branches of "
        "its cond; peak: inputs + temporaries + outputs not aliased; device peak: the allocator's "
        "high-water mark, `-` where the step did not raise it or on CPU), and compile times:",
        "",
    ]
    cols = ("FLOPs x SAM", "bytes x SAM", "peak x SAM", "device peak MB", "compile s")
    out += _table(
        ["step"] + [f"{x}: {c}" for x in models for c in cols],
        [[row] + [c for x in models for c in _costs(res["models"][x]["methods"], row)] for row in rows],
    )
    out += [
        "",
        "Targets (`-`: not measured; *report only*: the target does not apply to this model on this backend):",
        "",
    ]
    keys = list(dict.fromkeys(k for x in models for k in res["models"][x]["targets"]))
    body = []
    for key in keys:
        goal = next(res["models"][x]["targets"][key]["target"] for x in models if key in res["models"][x]["targets"])
        body.append([f"{key} {goal}"] + [_verdict(res["models"][x]["targets"].get(key)) for x in models])
    out += _table(["target"] + models, body)
    return "\n".join(out)


def _header(res, name) -> str:
    m, s = res["machine"], res["settings"]
    if m["backend"] == "cpu":
        where = f"{m['cpu_count']} CPU cores ({m['platform']}, jax {m['jax']}), XLA threads: {s.get('threads', 'all')}"
    else:
        where = (
            f"{m['devices']} x {m['device']} ({m['backend']}, jax {m['jax']}; host: {m['cpu_count']} CPU cores, "
            f"{m['platform']})"
        )
    batches = ", ".join(f"{x} {r.get('batch_size', s.get('batch_size'))}" for x, r in res["models"].items())
    conv = s.get("convnet")
    conv = (
        f"; convnet widths {'-'.join(map(str, conv['widths']))}, {conv['blocks']} block(s) per stage, "
        f"{res['models']['convnet']['param_count'] / 1e6:.2f}M params"
        if conv and "convnet" in res["models"]
        else ""
    )
    rounds = ", ".join(f"{x} {r['rounds_done']}" for x, r in res["models"].items() if r.get("rounds_done") is not None)
    incomplete = "" if res.get("complete", True) else " Incomplete run."
    return (
        f"Measured with `sam-optax bench` on {where}; batch: {batches}{conv}; up to {s['rounds']} interleaved "
        f"rounds of {s['steps_per_round']} steps (done: {rounds}), ratios as medians of the per-round ratios "
        f"(`benchmarks/results/{name}`).{incomplete}"
    )


def _rows(res) -> list:
    seen = list(dict.fromkeys(r for m in res["models"].values() for r in m["methods"]))
    return [r for r in ROWS if r in seen] + [r for r in seen if r not in ROWS]


def _table(head, body) -> list:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def _ratios(r) -> list:
    if r is None:
        return ["-"] * 3
    return [f"{r['ratio_to_base']:.2f}", f"{r['ratio_to_sam']:.2f}", f"{r['ratio_to_contrib_opaque']:.2f}"]


def _costs(t, row) -> list:
    r = t.get(row)
    if r is None:
        return ["-"] * 5
    sam = t["sam"]
    dev = (r.get("device_memory") or {}).get("device_peak_bytes")
    peak = r.get("peak_ratio_to_sam")
    return [
        f"{r['flops'] / sam['flops']:.2f}" if sam["flops"] else "-",
        f"{r['bytes_accessed'] / sam['bytes_accessed']:.2f}" if sam["bytes_accessed"] else "-",
        "-" if peak is None else f"{peak:.2f}",
        "-" if dev is None else f"{dev / 1e6:.1f}",
        f"{r['compile_s']:.1f}",
    ]


def _verdict(chk) -> str:
    if chk is None or chk["value"] is None:
        return "-"
    if not chk.get("applies", True):
        return f"{chk['value']:.3f} *report only*"
    return f"{chk['value']:.3f} {'met' if chk['met'] else '**not met**'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(RESULTS), help="a results JSON (default: the CPU one)")
    parser.add_argument("--out", help="write the table to this markdown file instead of printing it")
    parser.add_argument("--write-docs", action="store_true", help="replace the docs page's block (CPU results only)")
    args = parser.parse_args(argv)
    text = summary(args.results)
    if args.write_docs:
        _pages.write_block(PAGE, START, END, text)
    elif args.out:
        tmp = pathlib.Path(args.out + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)  # never a half-written table
    else:
        print(text)


if __name__ == "__main__":
    main()
