"""Draws compute and all-to-all kernels of one rank from two chrome traces written by
benchmarks/pipeline_step.py --trace-dir (without and with the overlapped F&B), over the same
stretch of the step, so the overlap can be seen:

    python benchmarks/plot_overlap.py TRACE_DIR OUT.png [--start-ms 400 --width-ms 25]
"""
import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def kernels(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    events = json.loads(opener(path).read())["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--start-ms", type=float, default=400.0)
    parser.add_argument("--width-ms", type=float, default=25.0)
    args = parser.parse_args()
    runs = [("dualpipev", "F&B pairs run forward then backward"),
            ("dualpipev-overlap", "F&B pairs interleaved around asynchronous all-to-alls")]
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 3.2 * len(runs)))
    for ax, (name, title) in zip(axes, runs):
        ks = kernels(next(args.trace_dir.glob(f"{name}-rank0.json*")))
        t0 = min(k["ts"] for k in ks)
        nccl_streams = Counter(k["args"]["stream"] for k in ks if k["name"].startswith("nccl"))
        a2a_stream = nccl_streams.most_common(1)[0][0]
        lo, hi = args.start_ms * 1e3, (args.start_ms + args.width_ms) * 1e3
        rows = {"compute": [], "all-to-all": []}
        for k in ks:
            start, end = k["ts"] - t0, k["ts"] - t0 + k["dur"]
            if end < lo or start > hi:
                continue
            if not k["name"].startswith("nccl"):
                rows["compute"].append((start / 1e3, k["dur"] / 1e3))
            elif k["args"]["stream"] == a2a_stream:
                rows["all-to-all"].append((start / 1e3, k["dur"] / 1e3))
        for y, (label, bars) in enumerate(rows.items()):
            ax.broken_barh(bars, (y - 0.35, 0.7), color=("tab:blue", "tab:orange")[y])
        ax.set_yticks(range(len(rows)), list(rows))
        ax.set_xlim(args.start_ms, args.start_ms + args.width_ms)
        ax.set_title(f"{name}: {title} (rank 0)")
        ax.set_xlabel("ms into the profiled step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
