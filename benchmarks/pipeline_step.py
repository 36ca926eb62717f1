"""Pipeline schedules side by side on one model, in one process group. Run under torchrun:

    torchrun --standalone --nproc-per-node 4 benchmarks/pipeline_step.py --pp 2 --ep 2 [--model small]
        [--micro-batches 8] [--micro-batch 1] [--steps 5] [--trace-dir DIR]

For each of 1f1b, zbv, dualpipev without overlap, dualpipev with overlap, dualpipe: forward and
backward of one step's micro-batches through the pipeline (plus the gradient sum of replicated
stages), timed over --steps steps after two warm-up steps; then one step under torch.profiler.
From the profile of every rank: the share of the step the GPU computes nothing (idle: pipeline
bubble plus waits for communication), and for the all-to-all stream (the NCCL stream with the
most kernels: the expert group's) its kernel time and the part of it that ran while compute
kernels ran on another stream (hidden). Rank 0 prints one JSON line per schedule; --trace-dir
keeps rank 0's chrome traces.

    torchrun --standalone --nproc-per-node 2 benchmarks/pipeline_step.py --smoke

--smoke runs every schedule the same way on CPU ranks over gloo (pp=2, ep=1, the `tiny` recipe
with 4 layers, 4 micro-batches, one timed step; seconds). The CPU profiles hold no kernels, so
idle and all-to-all figures are 0 there.
"""
import argparse
import faulthandler
import json
import time
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from dsv3.model import ModelConfig
from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.mesh import pipeline_lines
from dsv3.parallel.p2p import StageLinks
from dsv3.parallel.pipeline import Pipeline
from dsv3.parallel.pipeline_cut import Cut, split_layers
from dsv3.parallel.replicated import Replicas
from dsv3.parallel.runtime import start, stop
from dsv3.parallel.schedules import Costs, Placement, build, simulate
from dsv3.train.config import compose
from dsv3.train.build import build_model
from dsv3.train.engine import autocast

RUNS = [("1f1b", False), ("zbv", False), ("dualpipev", False), ("dualpipev", True), ("dualpipe", True)]


def union(intervals):
    merged = []
    for begin, end in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return merged


def overlap_with(intervals, covered):
    """Total length of `intervals` that lies inside the union `covered`."""
    total = 0.0
    for begin, end in sorted(intervals):
        for c_begin, c_end in covered:
            if c_end <= begin:
                continue
            if c_begin >= end:
                break
            total += min(end, c_end) - max(begin, c_begin)
    return total


def profile_stats(trace_path: Path) -> dict:
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not kernels:
        return {"window_ms": 0.0, "idle": 0.0, "a2a_ms": 0.0, "a2a_hidden_ms": 0.0}
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not e["name"].startswith("nccl")])
    by_stream = defaultdict(list)
    for e in kernels:
        if e["name"].startswith("nccl"):
            by_stream[e["args"].get("stream")].append((e["ts"], e["ts"] + e["dur"]))
    window = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy = sum(end - start for start, end in compute)
    a2a = max(by_stream.values(), key=len) if by_stream else []
    a2a_time = sum(end - start for start, end in a2a)
    return {"window_ms": window / 1e3, "idle": 1 - busy / window, "a2a_ms": a2a_time / 1e3,
            "a2a_hidden_ms": overlap_with(a2a, compute) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trace-dir", default="")
    parser.add_argument("--runs", default=",".join(f"{s}{'-overlap' if o else ''}" for s, o in RUNS),
                        help="comma-separated subset, e.g. dualpipev,dualpipev-overlap")
    parser.add_argument("--smoke", action="store_true", help="CPU ranks over gloo, the tiny recipe, seconds")
    parser.add_argument("overrides", nargs="*", help="recipe overrides of the model, e.g. model.n_layers=4")
    args = parser.parse_args()
    warmup = 2
    if args.smoke:  # dualpipev at pp=2 has 4 model stages: 4 layers
        args.model, args.pp, args.ep, args.micro_batches, args.micro_batch, args.steps, warmup = "tiny", 2, 1, 4, 1, 1, 1
        args.overrides = ["model.n_layers=4", *args.overrides]
    warnings.filterwarnings("ignore")
    cfg: ModelConfig = OmegaConf.to_object(compose([f"model={args.model}", *args.overrides]).model)
    device, runtime = start(ParallelConfig(pp=args.pp, ep=args.ep), cfg.n_routed_experts, "cpu" if args.smoke else "cuda")
    cuda = device.type == "cuda"  # (on CPU the script runs as a smoke test; the figures need GPUs)
    lines, line = pipeline_lines(runtime.mesh)
    generator = torch.Generator().manual_seed(runtime.data_rank)
    micro = [torch.randint(cfg.vocab_size, (args.micro_batch, cfg.max_seq_len + 1), generator=generator).to(device)
             for _ in range(args.micro_batches)]
    micro = [(t[:, :-1], t[:, 1:]) for t in micro]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = args.micro_batches * args.micro_batch * cfg.max_seq_len * runtime.layout.data_parallel
    chosen = args.runs.split(",")
    for schedule, overlap in RUNS:
        if f"{schedule}{'-overlap' if overlap else ''}" not in chosen:
            continue
        faulthandler.dump_traceback_later(150, exit=True)  # a hung collective shows where it hangs
        placement = Placement(schedule, args.pp)
        cut = Cut(placement, split_layers(cfg.n_layers, placement.n_model_stages, []), mtp=cfg.mtp_depth > 0)
        model = build_model(cfg, device, 0, runtime, cut)
        replicas = Replicas(model, cut, lines, line)
        pipe = Pipeline(model, cut, runtime.pp_rank, StageLinks(placement, lines, line, device), overlap,
                        partial(autocast, device))

        def step(pipe=pipe, replicas=replicas, model=model):
            losses = pipe.train_step(micro, 0.3)
            replicas.sum_gradients()
            model.zero_grad(set_to_none=True)
            return losses

        for _ in range(warmup):
            step()
        sync()
        dist.barrier()
        times = []
        for _ in range(args.steps):
            begin = time.perf_counter()
            step()
            sync()
            dist.barrier()
            times.append(time.perf_counter() - begin)
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            step()
            sync()
        name = f"{schedule}{'-overlap' if overlap else ''}"
        trace = Path(args.trace_dir or "/tmp") / f"{name}-rank{dist.get_rank()}.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        stats = profile_stats(trace)
        if not args.trace_dir or dist.get_rank() != 0:
            trace.unlink()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stats)
        orders = build(schedule, args.pp, args.micro_batches)
        costs = Costs(F=1, B=2, W=1, FB=3)
        ideal = simulate(placement, orders, costs)
        ideal_bubble = max(ideal.bubble(r, costs, orders) for r in range(args.pp)) / ideal.makespan
        times.sort()
        if dist.get_rank() == 0:
            print(json.dumps({
                "schedule": name, "pp": args.pp, "ep": args.ep, "micro_batches": args.micro_batches,
                "tokens_per_step": tokens, "step_ms": round(times[len(times) // 2] * 1e3, 1),
                "tokens_per_s": round(tokens / times[len(times) // 2]),
                "peak_gib": round(peak.item(), 1),
                "idle_per_rank": [round(s["idle"], 3) for s in gathered],
                "ideal_bubble_fraction": round(ideal_bubble, 3),
                "a2a_ms_per_rank": [round(s["a2a_ms"], 1) for s in gathered],
                "a2a_hidden_per_rank": [round(s["a2a_hidden_ms"] / max(s["a2a_ms"], 1e-9), 3) for s in gathered],
            }), flush=True)
        del pipe, replicas, model
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    stop()


if __name__ == "__main__":
    main()
