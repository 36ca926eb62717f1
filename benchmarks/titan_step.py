"""One BF16 training step of dsv3 and of torchtitan 0.2.2, side by side on one GPU.

Device command (from the project root; first, here: `../shared/device/wheels.sh .whl`, then run
with carry [".whl"]; device_env.sh installs the wheels, torchtitan's included, and exposes `dsv3`):

    source benchmarks/device_env.sh && python3 benchmarks/titan_step.py

    python benchmarks/titan_step.py [--configs small,v2_lite_4l] [--systems ...] [--batch 4] [--seq-len 4096]
        [--steps 10] [--warmup 3] [--compile-backend inductor] [--dsv3-compile harness]
        [--kernels N] [--ops N]
    python benchmarks/titan_step.py --smoke   (dsv3 only, the tiny recipe on the CPU, seconds)

Both systems train the same model (same arguments, mapped by `titan_model_args`; parameter counts
are compared before anything runs), on the same synthetic batches (dsv3's Markov chain, default
4 x 4096 tokens), with BF16 autocast over FP32 master weights, fused AdamW (the recipe's lr, betas,
eps, weight decay), gradient clipping at 1.0, no activation checkpointing, no MTP. Each system
runs its own trainer's step: `dsv3.train.loop.Trainer.train_step()` and torchtitan's
`Trainer.train_step()`, through a TrainSpec copied from its `deepseek_v3` spec with one flavour
set to our shape and a synthetic dataloader, configured through its ConfigManager CLI. Compiled:
dsv3 with `block.compile()` on every layer applied here (`--dsv3-compile harness`; `trainer`
instead passes `train.compile=on`, the trainer's setting; eager runs pass `train.compile=off`), torchtitan with
`--compile.enable` (per-block torch.compile, routed experts left eager, loss compiled).
"dsv3 graphs" is the trainer with `train.compile=on train.cuda_graphs=true`: each compiled block
replays CUDA graphs (cudagraph trees), its kernels launched without the host launching each one.

Each (config, system) runs in its own subprocess, so memory peaks and compile caches stay apart.
Step time is the median over --steps steps (CUDA events) after --warmup steps; peak memory is
torch.cuda.max_memory_allocated over the timed steps, and reserved memory its
max_memory_reserved (CUDA graphs' replays allocate nothing: their memory, in pools set up while
they were recorded, counts only as reserved, so compare a graphs row by that); one more step is profiled for the GPU
operations it launches and their busy time, and one more runs under torch's sync debug mode to count
the host syncs it asks for (with --ops N, one more is profiled on host and GPU: the N operators
with the most time of their own on each, by input shape); MFU uses dsv3's FLOP count for both,
dsv3.model.count(cfg, seq_len).flop_per_token, against the GPU's dense BF16 peak. Each row is printed as
it is measured, the table at the end, and the results so far, as JSON, to $OUT/titan_step.json
when $OUT is set.

What the mapping cannot carry over (none changes a parameter count): dsv3's sequence-wise balance
loss (model.seq_aux_alpha; torchtitan has none), torchtitan's final RMSNorm eps (torch's default,
not norm_eps), initialisation (different, so the routing balance differs), and torchtitan's weight
decay on the norm gains.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dsv3.model import ModelConfig, Transformer, count
from dsv3.train.config import Config, compose
from dsv3.train.loop import Trainer, peak_flops
from model_step import median_ms, peak_gib  # benchmarks/ is on sys.path when run as a script

CONFIGS = {  # name: dsv3 recipe overrides
    "small": ["model=small", "model.mtp_depth=0"],
    "v2_lite_4l": ["model=v2_lite_16b", "model.n_layers=4", "model.mtp_depth=0"],
    "small_mtp": ["model=small"],  # MTP D=1, the recipe's
    "v2_lite_4l_fp8": ["model=v2_lite_16b", "model.n_layers=4", "model.mtp_depth=0", "precision=fp8"],
    "small_fp8": ["model=small", "model.mtp_depth=0", "precision=fp8"],
    # FP8 only where both widths are >= 384 (all but MLA's KV projections) or >= 512 (W_O, dense MLP)
    "small_fp8_w384": ["model=small", "model.mtp_depth=0", "precision=fp8", "fp8.min_width=384"],
    "small_fp8_w512": ["model=small", "model.mtp_depth=0", "precision=fp8", "fp8.min_width=512"],
    # FP8 for every GEMM the report lists but the routed experts
    "v2_lite_4l_fp8_dense": ["model=v2_lite_16b", "model.n_layers=4", "model.mtp_depth=0", "precision=fp8",
                             "fp8.routed_experts=false"],
}
DSV3_ONLY = {  # configs that only dsv3 runs, and why
    "small_mtp": "torchtitan has no multi-token prediction",
    "v2_lite_4l_fp8": "FP8 compares with dsv3's BF16 row",
    "small_fp8": "FP8 compares with dsv3's BF16 row",
    "small_fp8_w384": "FP8 compares with dsv3's BF16 row",
    "small_fp8_w512": "FP8 compares with dsv3's BF16 row",
    "v2_lite_4l_fp8_dense": "FP8 compares with dsv3's BF16 row",
}
SMOKE_CONFIGS = {"tiny": ["model=tiny", "model.mtp_depth=0"]}
SYSTEMS = ["dsv3 eager", "dsv3 compiled", "torchtitan eager", "torchtitan compiled"]  # and "dsv3 graphs"
FLAVOR = "dsv3"  # the one flavour of the TrainSpec registered with torchtitan for each config


# --- the model, in dsv3's terms and in torchtitan's --------------------------------------------

def dsv3_config(overrides: list[str], batch: int, seq_len: int, smoke: bool, run_dir: str) -> Config:
    trainer = ["data=synthetic", "train.wandb.mode=disabled", f"train.run_dir={run_dir}", "train.steps=1000",
               f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", "train.eval_every=0"]
    return OmegaConf.to_object(compose([*overrides, f"model.max_seq_len={seq_len}", *trainer,
                                        *(["train.device=cpu"] if smoke else [])]))


def titan_model_args(cfg: dict, bias_update_speed: float = 1e-3) -> dict:
    """torchtitan 0.2.2's DeepSeekV3ModelArgs fields (with `moe_args` as MoEArgs fields) for a dsv3
    ModelConfig given as a dict (dataclasses.asdict). Raises where torchtitan cannot build it."""
    if cfg["mtp_depth"]:
        raise ValueError("torchtitan's DeepSeek-V3 has no multi-token prediction: set model.mtp_depth=0.")
    grouped = cfg["n_expert_groups"] > 1
    if grouped and not cfg["expert_bias"]:
        raise ValueError("torchtitan scores an expert group by its top-2 sum; dsv3 without an expert bias uses "
                         "the group max.")
    same = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads", "norm_eps",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len",
            "original_seq_len", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale"]
    moe = {
        "num_experts": cfg["n_routed_experts"],
        "num_shared_experts": cfg["n_shared_experts"],
        "top_k": cfg["n_activated_experts"],
        "num_expert_groups": cfg["n_expert_groups"] if grouped else None,  # None: no node-limited routing
        "num_limited_groups": cfg["n_limited_groups"] if grouped else None,
        "score_func": cfg["score_func"],
        "route_norm": cfg["score_func"] == "sigmoid",  # dsv3 normalises the top-k sigmoid gates
        "route_scale": cfg["route_scale"],
        "score_before_experts": False,  # dsv3 weights the experts' outputs by the gates
        "gate_bias": False,
        "use_grouped_mm": True,
        # dsv3's bias balancing (expert_bias, gamma = bias_update_speed) is torchtitan's load_balance_coeff
        "load_balance_coeff": bias_update_speed if cfg["expert_bias"] else None,
    }
    return {**{name: cfg[name] for name in same}, "moe_args": moe, "attn_type": "sdpa", "attn_mask_type": "causal"}


def titan_cli(spec: str, batch: int, seq_len: int, cfg: Config, compiled: bool, backend: str,
              dump_folder: str) -> list[str]:
    """torchtitan's command line for one GPU: the same optimiser and batch as dsv3's trainer."""
    tc = cfg.train
    assert tc.adam_state_dtype == "float32", "torchtitan's AdamW keeps FP32 moments"
    cli = ["--model.name", spec, "--model.flavor", FLAVOR,
           "--training.local_batch_size", str(batch), "--training.seq_len", str(seq_len), "--training.steps", "1000",
           "--training.max_norm", str(tc.grad_clip), "--training.dtype", "float32",
           "--training.mixed_precision_param", "bfloat16",
           "--optimizer.name", "AdamW", "--optimizer.implementation", "fused", "--optimizer.lr", str(tc.schedule.lr),
           "--optimizer.beta1", str(tc.beta1), "--optimizer.beta2", str(tc.beta2), "--optimizer.eps", str(tc.eps),
           "--optimizer.weight_decay", str(tc.weight_decay),
           "--activation_checkpoint.mode", "none", "--metrics.log_freq", "1000000", "--job.dump_folder", dump_folder]
    return cli + (["--compile.enable", "--compile.backend", backend] if compiled else [])


def titan_installed() -> bool:
    try:
        import torchtitan.train  # noqa: F401
    except ImportError:
        return False
    return True


def titan_register(spec_name: str, cfg: Config, batch: int) -> None:
    """Registers torchtitan's deepseek_v3 TrainSpec as `spec_name`, with our shape as its one
    flavour, no tokenizer, no HF checkpoint adapter, and dsv3's synthetic batches as its dataloader."""
    import dataclasses

    import torchtitan.protocols.train_spec as train_spec
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs, get_train_spec
    from torchtitan.models.moe import MoEArgs

    from dsv3.data.synthetic import SyntheticLoader

    class Synthetic(BaseDataLoader):
        """(input, labels) pairs of dsv3's synthetic chain, the batches dsv3's trainer reads."""

        def __init__(self):
            self.loader = SyntheticLoader(cfg.model.vocab_size, cfg.data.synthetic_branching, cfg.data.seq_len,
                                          cfg.seed)

        def __iter__(self):
            while True:
                tokens = self.loader.next_batch(batch)
                yield {"input": tokens[:, :-1]}, tokens[:, 1:]

        def state_dict(self):
            return self.loader.state_dict()

        def load_state_dict(self, state):
            self.loader.load_state_dict(state)

    fields = titan_model_args(asdict(cfg.model), cfg.train.schedule.bias_update_speed)
    model_args = DeepSeekV3ModelArgs(**{**fields, "moe_args": MoEArgs(**fields["moe_args"])})
    spec = dataclasses.replace(get_train_spec(), model_args={FLAVOR: model_args}, build_tokenizer_fn=None,
                               build_dataloader_fn=lambda **kwargs: Synthetic(), state_dict_adapter=None)
    train_spec.register_train_spec(spec_name, spec)


def titan_job_config(cli: list[str]):
    from torchtitan.config import ConfigManager
    return ConfigManager().parse_args(cli)


def dsv3_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def titan_params(config: str, cfg: Config, batch: int) -> int:
    """Parameters of torchtitan's model as its Trainer builds it (meta device, nothing allocated)."""
    from torchtitan.protocols.train_spec import get_train_spec

    name = f"dsv3_{config}"
    titan_register(name, cfg, batch)
    job = titan_job_config(titan_cli(name, batch, cfg.data.seq_len, cfg, False, "inductor", "/tmp/titan_step"))
    spec = get_train_spec(name)
    model_args = spec.model_args[FLAVOR]
    model_args.update_from_config(job)
    with torch.device("meta"):
        return sum(p.numel() for p in spec.model_cls(model_args).parameters())


# --- one system's step, in its own process ------------------------------------------------------

def measure(step, device: torch.device, steps: int, warmup: int) -> dict:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = {"step_ms": median_ms(step, warmup=0, iters=steps, cuda=cuda), "peak_gib": peak_gib(device),
             "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None}
    return {**timed, **(count_one_step(step) if cuda else {}),
            **top_ops(step, int(os.environ.get("TITAN_STEP_OPS", "0")), cuda)}


def count_one_step(step) -> dict:
    """One more step, profiled: GPU operations launched (kernels, copies, memsets) and their busy time,
    then one more under torch's sync debug mode: the host syncs it asks for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    if os.environ.get("TITAN_STEP_TRACE"):  # a file name: the profiled step's timeline, for chrome://tracing
        prof.export_chrome_trace(os.environ["TITAN_STEP_TRACE"])
    gpu_ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = {}
    for e in gpu_ops:
        total, calls = kernels.get(e.name, (0.0, 0))
        kernels[e.name] = (total + e.time_range.elapsed_us() / 1e3, calls + 1)
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:int(os.environ.get("TITAN_STEP_KERNELS", "0"))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    return {"gpu_ops": len(gpu_ops), "gpu_busy_ms": sum(e.time_range.elapsed_us() for e in gpu_ops) / 1e3,
            "host_syncs": syncs, **({"top_kernels": [[name[:90], round(ms, 3), calls] for name, (ms, calls) in top]}
                                    if top else {})}


def top_ops(step, n: int, cuda: bool) -> dict:
    """One more step, profiled on host and GPU with input shapes: the n operators (aten ops, custom
    operators, Inductor's kernels) with the most GPU time of their own, and the n with the most host
    time of their own, each as [name, input shapes, GPU ms, host ms, calls]. Shapes tell the head's
    GEMM from the projections'; host time is what a host-bound step spends where (the profiler adds
    its own, about the same for every call)."""
    if not n:
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])],
                 record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows = [[e.key[:60], str(e.input_shapes)[:120], round(e.self_device_time_total / 1e3, 3),
             round(e.self_cpu_time_total / 1e3, 3), e.count] for e in prof.key_averages(group_by_input_shape=True)]
    return {"top_gpu_ops": sorted(rows, key=lambda row: -row[2])[:n],
            "top_host_ops": sorted(rows, key=lambda row: -row[3])[:n]}


def run_dsv3(cfg: Config, harness_compiles: bool, args) -> dict:
    trainer = Trainer(cfg)
    if harness_compiles:
        for block in trainer.model.layers.values():
            block.compile(backend=args.compile_backend)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"params": params, **measure(trainer.train_step, trainer.device, args.steps, args.warmup)}


def run_titan(cfg: Config, compiled: bool, args) -> dict:
    name = f"dsv3_{args.config}"
    import torch.distributed as dist
    from torchtitan.train import Trainer as TitanTrainer

    with socket.socket() as s:  # one rank of its own process group, as torchrun would start it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    titan_register(name, cfg, args.batch)
    cli = titan_cli(name, args.batch, args.seq_len, cfg, compiled, args.compile_backend, "/tmp/titan_step/torchtitan")
    trainer = TitanTrainer(titan_job_config(cli))
    batches = trainer.batch_generator(trainer.dataloader)

    def step():  # what Trainer.train() does per step, without checkpoints and validation
        trainer.step += 1
        trainer.gc_handler.run(trainer.step)
        trainer.train_step(batches)

    params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
    result = {"params": params, **measure(step, trainer.device, args.steps, args.warmup)}
    trainer.close()
    dist.destroy_process_group()
    return result


def worker(args) -> None:
    """One (config, system) measurement; prints one line `RESULT {json}`."""
    warnings.filterwarnings("ignore")
    overrides = {**CONFIGS, **SMOKE_CONFIGS}[args.config]
    system, mode = args.worker.split()
    if system == "dsv3":  # the trainer compiles on CUDA by default: eager must say so
        trainer_compiles = mode == "graphs" or (mode == "compiled" and args.dsv3_compile == "trainer")
        overrides = [*overrides, f"train.compile={'on' if trainer_compiles else 'off'}",
                     *(["train.cuda_graphs=true"] if mode == "graphs" else [])]
    cfg = dsv3_config(overrides, args.batch, args.seq_len, args.smoke, f"/tmp/titan_step/{args.config}")
    if system == "dsv3":
        result = run_dsv3(cfg, mode == "compiled" and args.dsv3_compile == "harness", args)
    else:
        result = run_titan(cfg, mode == "compiled", args)
    print("RESULT " + json.dumps(result), flush=True)


# --- the side-by-side table ---------------------------------------------------------------------

def launch(args, config: str, system: str) -> dict:
    command = [sys.executable, __file__, "--worker", system, "--config", config, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--compile-backend", args.compile_backend, "--dsv3-compile", args.dsv3_compile,
               *(["--smoke"] if args.smoke else [])]
    env = {**os.environ, "TITAN_STEP_KERNELS": str(args.kernels), "TITAN_STEP_OPS": str(args.ops)}
    if args.trace and os.environ.get("OUT"):
        env["TITAN_STEP_TRACE"] = str(Path(os.environ["OUT"]) / f"trace_{config}_{system.replace(' ', '_')}.json")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(f"--- {config}, {system} failed (exit {done.returncode}):\n" + done.stderr[-4000:])
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:100]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--dsv3-compile", choices=["harness", "trainer"], default="harness",
                        help="harness: block.compile() on each layer here; trainer: train.compile=on")
    parser.add_argument("--smoke", action="store_true", help="dsv3 only, the tiny recipe on the CPU, seconds")
    parser.add_argument("--trace", action="store_true", help="write each profiled step's timeline under $OUT")
    parser.add_argument("--kernels", type=int, default=0,
                        help="list the N GPU operations of the profiled step with the most time (in the JSON)")
    parser.add_argument("--ops", type=int, default=0,
                        help="list the N operators with the most GPU time, with input shapes and host time (JSON)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = CONFIGS
    if args.smoke:  # on the CPU inductor would spend a minute compiling; aot_eager traces the same graphs
        configs, args.batch, args.seq_len, args.steps, args.warmup = SMOKE_CONFIGS, 2, 128, 2, 1
        args.configs = ",".join(SMOKE_CONFIGS)
        args.compile_backend = "aot_eager" if args.compile_backend == "inductor" else args.compile_backend
    installed = titan_installed()
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, {args.batch} x {args.seq_len} tokens, "
          f"median of {args.steps} steps after {args.warmup}, compile backend {args.compile_backend}")
    peak = None if args.smoke else peak_flops(torch.device("cuda"), 0.0)  # the trainer's dense BF16 peaks
    rows = []
    for name in args.configs.split(","):
        cfg = dsv3_config(configs[name], args.batch, args.seq_len, args.smoke, f"/tmp/titan_step/{name}")
        only = DSV3_ONLY.get(name)
        counts = {"dsv3": dsv3_params(cfg.model)}
        mapping = ""
        if not only:
            mapped = titan_model_args(asdict(cfg.model), cfg.train.schedule.bias_update_speed)
            mapping = f"; torchtitan moe_args {mapped['moe_args']}"
            if installed:
                counts["torchtitan"] = titan_params(name, cfg, args.batch)
        print(f"# {name}: " + ", ".join(f"{system} {n:,} parameters" for system, n in counts.items()) + mapping)
        if len(set(counts.values())) > 1:
            sys.exit(f"Refusing to compare {name}: the two systems' models have different parameter counts.")
        counted = count(cfg.model, args.seq_len)
        flop_per_token = counted.flop_per_token + counted.mtp_flop_per_token  # the trainer's MFU basis
        for system in args.systems.split(","):
            if system.startswith("torchtitan") and only:
                result = {"error": f"not run: {only}"}
            elif system.startswith("torchtitan") and not installed:
                result = {"error": "not installed"}
            elif system.startswith("torchtitan") and args.smoke:
                result = {"error": "not run (the smoke run is dsv3 only)"}
            else:
                result = launch(args, name, system)
            if "step_ms" in result:
                result["tokens_per_s"] = args.batch * args.seq_len / (result["step_ms"] / 1e3)
                result["mfu"] = result["tokens_per_s"] * flop_per_token / peak if peak else None
            rows.append({"config": name, "system": system, "flop_per_token": flop_per_token, **result})
            print("# " + table_row(rows[-1]), flush=True)  # as it comes, for a run cut short
            save(device, rows)

    print(HEADER)
    for r in rows:
        print(table_row(r))


HEADER = (f"| {'config':<14} | {'system':<20} | {'tokens/s':>10} | {'MFU':>6} | {'peak GiB':>8} | {'reserved':>8} "
          f"| {'step ms':>8} | {'GPU ops':>7} | {'busy ms':>7} | {'syncs':>5} |\n"
          f"|{'-' * 16}|{'-' * 22}|{'-' * 12}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 7}|")


def table_row(r: dict) -> str:
    if "step_ms" not in r:
        return f"| {r['config']:<14} | {r['system']:<20} | {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
    counts = (f"{r['gpu_ops']:7d} | {r['gpu_busy_ms']:7.1f} | {r['host_syncs']:5d}" if "gpu_ops" in r
              else f"{'-':>7} | {'-':>7} | {'-':>5}")
    reserved = f"{r['reserved_gib']:8.1f}" if r.get("reserved_gib") is not None else f"{'-':>8}"
    return (f"| {r['config']:<14} | {r['system']:<20} | {r['tokens_per_s']:10,.0f} | {mfu} | "
            f"{r['peak_gib']:8.1f} | {reserved} | {r['step_ms']:8.1f} | {counts} |")


def save(device: str, rows: list[dict]) -> None:
    """Rewrites $OUT/titan_step.json with the rows so far: a run cut short keeps what it measured."""
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "titan_step.json"
        path.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
