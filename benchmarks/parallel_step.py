"""Training steps of a recipe on several GPUs, through the trainer itself. Run under torchrun:

    torchrun --standalone --nproc-per-node N benchmarks/parallel_step.py [--ep E] [--optimizer zero1|adamw|torch-zero]
        [--model small] [--micro-batch 4] [--steps 8]

Prints one line (JSON) from rank 0: the layout, median step time, global tokens/s, the largest
peak memory of any rank, and the share of a step's GPU time spent in all-to-all kernels (from
torch.profiler over two steps). --optimizer picks the data-parallel optimizer: ours (ZeRO-1,
moments sharded), plain AdamW after an all-reduce, or torch's ZeroRedundancyOptimizer.

    torchrun --standalone --nproc-per-node 2 benchmarks/parallel_step.py --smoke --ep 2

--smoke runs the same trainer steps on CPU processes over gloo with the `tiny` recipe (seconds):
peak memory is then the largest resident set and the all-to-all share comes from CPU profiles.
"""
import argparse
import json
import os
import time
import warnings

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.profiler import ProfilerActivity, profile

from dsv3.parallel.mesh import stage_group
from dsv3.train.config import compose
from dsv3.train.loop import Trainer
from model_step import peak_gib  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--optimizer", choices=["zero1", "adamw", "torch-zero"], default="zero1")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="the tiny recipe on CPU ranks over gloo, seconds")
    args = parser.parse_args()
    warmup = 2
    if args.smoke:
        args.model, args.micro_batch, args.steps, warmup = "tiny", 2, 2, 1
    warnings.filterwarnings("ignore")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [f"model={args.model}", "data=synthetic", "train.wandb.mode=disabled", "train.run_dir=/tmp/bench",
                 "train.steps=1000", f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch * world}", f"parallel.ep={args.ep}",
                 f"parallel.zero={str(args.optimizer == 'zero1').lower()}"]
    if args.smoke:
        overrides.append("train.device=cpu")
    trainer = Trainer(OmegaConf.to_object(compose(overrides)))
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.optimizer == "torch-zero":
        assert args.ep == 1, "ZeroRedundancyOptimizer shards over one group; compare it at ep=1"
        tc = trainer.cfg.train
        trainer.optimizer = ZeroRedundancyOptimizer(
            trainer.model.parameters(), optimizer_class=torch.optim.AdamW, process_group=stage_group(trainer.runtime.mesh),
            lr=tc.schedule.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=tc.weight_decay)

    first_loss = trainer.train_step()["loss"]  # the same on every layout, up to BF16 rounding
    for _ in range(warmup):  # warm-up: allocator, NCCL communicators, cuDNN plans
        trainer.train_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    peak = torch.tensor(peak_gib(trainer.device), device=trainer.device)

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            trainer.train_step()
        sync()
    # GPU kernels; on the CPU, the operators' own time (gloo's all-to-all included)
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if cuda else "CPU")]
    own_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total_us = sum(own_time(e) for e in events)
    a2a_us = sum(own_time(e) for e in events
                 if "all_to_all" in e.key.lower() or "alltoall" in e.key.lower() or "sendrecv" in e.key.lower())
    share = torch.tensor(a2a_us / max(total_us, 1.0), device=trainer.device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(share, op=dist.ReduceOp.MAX)

    tokens = args.micro_batch * world * trainer.cfg.data.seq_len
    if trainer.is_main:
        optimizer = args.optimizer if world > 1 else "adamw"  # one GPU has nothing to shard over
        print(json.dumps({"model": args.model, "gpus": world, "ep": args.ep, "optimizer": optimizer,
                          "loss_step1": round(first_loss, 4),
                          "step_ms": round(step_s * 1e3, 1), "tokens_per_s": round(tokens / step_s),
                          "peak_gib": round(peak.item(), 1), "all_to_all_share": round(share.item(), 3),
                          "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
