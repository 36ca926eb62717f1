"""Loss curves of a run as a PNG: ``python -m dsv3.train.plot RUN_DIR [--out FILE]``.

Reads RUN_DIR/metrics.jsonl and draws the training losses (total, main, MTP; EMA-smoothed with
0.9, as DeepSeek-V3 plots them, over the raw values), the validation loss, and the learning rate.
Writes RUN_DIR/loss_curves.png unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled toward 0."""
    smoothed, current = [], 0.0
    for t, value in enumerate(values, start=1):
        current = decay * current + (1 - decay) * value
        smoothed.append(current / (1 - decay ** t))
    return smoothed


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file; is {run_dir} a run directory?")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics} holds no steps yet.")
    steps = [r["step"] for r in records]
    figure, (losses, lrs) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    for key, color in (("loss", "tab:blue"), ("main_loss", "tab:green"), ("mtp_loss", "tab:orange")):
        values = [r[key] for r in records]
        losses.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        losses.plot(steps, ema(values), color=color, label=key)
    evaluated = [r for r in records if r.get("val_loss") is not None]
    if evaluated:
        losses.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", color="tab:red",
                    label="val_loss")
    losses.set_ylabel("nats per token")
    losses.set_title(run_dir.resolve().name)
    losses.legend()
    losses.grid(alpha=0.3)
    lrs.plot(steps, [r["lr"] for r in records], color="tab:purple")
    lrs.set_ylabel("learning rate")
    lrs.set_xlabel("step")
    lrs.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "loss_curves.png")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
