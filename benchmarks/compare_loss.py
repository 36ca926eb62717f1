"""Relative difference of two runs' training loss, EMA-smoothed as DeepSeek-V3 compares FP8 with
BF16 (coefficient 0.9), and their median step throughput; prints one JSON line.

    python benchmarks/compare_loss.py runs/fp8/metrics.jsonl runs/bf16/metrics.jsonl \
        [--spread runs/bf16_seed1/metrics.jsonl] [--plot loss.png] [--names fp8,bf16,bf16_seed1]

--spread names a second baseline run (another seed): its gap to the baseline, computed the same way,
is the seed spread the test run's gap is read against. --plot draws the EMA losses and the gaps, with
the runs named by --names (default: test, baseline, spread).
"""
import argparse
import json
import statistics


def load(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "main_loss" in r}


def ema(values: list[float], coefficient: float = 0.9) -> list[float]:
    smoothed, current = [], values[0]
    for value in values:
        current = coefficient * current + (1 - coefficient) * value
        smoothed.append(current)
    return smoothed


def gap(run: dict[int, dict], baseline: dict[int, dict], steps: list[int]) -> tuple[list[float], dict]:
    """Per step, the relative difference of the EMA main losses, and its summary (percent)."""
    run_ema, base_ema = ema([run[s]["main_loss"] for s in steps]), ema([baseline[s]["main_loss"] for s in steps])
    relative = [(r - b) / b for r, b in zip(run_ema, base_ema)]
    marks = sorted({steps[-1]} | {s for s in steps if s % 100 == 0})
    return relative, {"relative_ema_loss_at": {s: round(100 * relative[steps.index(s)], 3) for s in marks},
                      "mean_relative_last_100_pct": round(100 * statistics.mean(relative[-100:]), 3)}


def draw(path: str, steps: list[int], runs: dict[str, dict[int, dict]], gaps: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, run in runs.items():
        top.plot(steps, ema([run[s]["main_loss"] for s in steps]), label=name, linewidth=1)
    top.set_ylabel("main loss, EMA 0.9 (nats)")
    top.legend()
    for name, relative in gaps.items():
        bottom.plot(steps, [100 * r for r in relative], label=name, linewidth=1)
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_ylabel("relative to the baseline (%)")
    bottom.set_xlabel("step")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def compare(runs: dict[str, dict[int, dict]], plot: str | None = None) -> dict:
    """runs: name -> records by step (load), the test run first, the baseline second and, optionally,
    the baseline's other seed third. The gap of the test run (and of the spread run) to the baseline
    over the steps all runs have, each run's median tokens/s, and the plot if asked for."""
    (test, baseline), spread = list(runs)[:2], list(runs)[2:]
    steps = sorted(set.intersection(*(set(run) for run in runs.values())))
    if not steps:
        raise SystemExit(f"No step is in every run's metrics ({', '.join(runs)}): nothing to compare.")
    relative, summary = gap(runs[test], runs[baseline], steps)
    gaps, result = {f"{test} - {baseline}": relative}, {"steps": len(steps), "last_step": steps[-1], **summary}
    if spread:
        gaps[f"{spread[0]} - {baseline}"], result["spread"] = gap(runs[spread[0]], runs[baseline], steps)
    result["tokens_per_s"] = [round(statistics.median(r["tokens_per_s"] for r in run.values())) for run in runs.values()]
    if plot:
        draw(plot, steps, runs, gaps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("test")
    parser.add_argument("baseline")
    parser.add_argument("--spread", help="the baseline run again with another seed")
    parser.add_argument("--plot", help="write the EMA losses and the gaps to this PNG")
    parser.add_argument("--names", default="test,baseline,spread", help="the runs' names in the plot")
    args = parser.parse_args()
    test, base, spread = args.names.split(",")
    runs = {test: load(args.test), base: load(args.baseline)}
    if args.spread:
        runs[spread] = load(args.spread)
    print(json.dumps(compare(runs, args.plot)))


if __name__ == "__main__":
    main()
