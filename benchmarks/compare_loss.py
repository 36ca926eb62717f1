"""Relative difference of two runs' training loss, EMA-smoothed as DeepSeek-V3 compares FP8 with
BF16 (coefficient 0.9), and their median step throughput; prints one JSON line.

    python benchmarks/compare_loss.py runs/fp8/metrics.jsonl runs/bf16/metrics.jsonl
"""
import json
import statistics
import sys


def load(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "main_loss" in r}


def ema(values: list[float], coefficient: float = 0.9) -> list[float]:
    smoothed, current = [], values[0]
    for value in values:
        current = coefficient * current + (1 - coefficient) * value
        smoothed.append(current)
    return smoothed


def main(test_path: str, baseline_path: str) -> None:
    test, baseline = load(test_path), load(baseline_path)
    steps = sorted(set(test) & set(baseline))
    test_ema = ema([test[s]["main_loss"] for s in steps])
    base_ema = ema([baseline[s]["main_loss"] for s in steps])
    relative = [(t - b) / b for t, b in zip(test_ema, base_ema)]
    marks = sorted({steps[-1]} | {s for s in steps if s % 100 == 0})
    print(json.dumps({
        "steps": len(steps), "last_step": steps[-1],
        "relative_ema_loss_at": {s: round(100 * relative[steps.index(s)], 3) for s in marks},
        "mean_relative_last_100_pct": round(100 * statistics.mean(relative[-100:]), 3),
        "tokens_per_s": [round(statistics.median(r["tokens_per_s"] for r in run.values())) for run in (test, baseline)],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
