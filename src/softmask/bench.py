"""``softmask bench step``: the training step's speed, memory and model-FLOP utilisation.

For each method, in a fresh subprocess (so that peak memory is its own): build the pretraining objective
from the config, feed it a synthetic batch (uint8 images, captions of ``data.max_tokens`` tokens),
run warm-up steps, then time ``steps`` full steps (forward, backward, optimiser) and report the
median. Model FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(matrix multiplies, convolutions and attention, forward and backward, momentum passes included).
MFU = FLOPs per step / median step time / the machine's matrix-multiply rate, measured in the same
run on square matmuls (fp32 on CPU, the run's precision on GPU).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch

from softmask.config import Config, load_config

MATMUL_N = 2048


def matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of an N x N matrix multiply (N = 2048) on ``device``."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    _sync(device)
    return 2 * MATMUL_N**3 * runs / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg: Config, batch_size: int, seed: int = 0, text_fill: float = 1.0) -> dict:
    """Images (B, 3, S, S) uint8 and captions padded to ``data.max_tokens`` tokens. ``text_fill`` is about
    the share of real tokens: 1 = no padding; below 1 the first caption has every token and the others
    lengths drawn uniformly in [a, T] (a set so the mean is ``text_fill`` of T, at least 3 tokens), as
    captions padded to the longest of their batch are (the world's: 0.50 at T = 27)."""
    if not 0.0 < text_fill <= 1.0:
        raise ValueError(f"text_fill must be in (0, 1], got {text_fill}")
    g = torch.Generator().manual_seed(seed)
    size, length = cfg.model.vision.image_size, cfg.data.max_tokens
    ids = torch.randint(1000, cfg.model.text.vocab_size, (batch_size, length), generator=g)
    lengths = torch.full((batch_size,), length)
    if text_fill < 1.0:
        shortest = max(3, min(length, round((2 * text_fill - 1) * length)))
        lengths = torch.randint(shortest, length + 1, (batch_size,), generator=g)
        lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS] ... [SEP] of the bert-base-uncased vocabulary, then [PAD] (0)
    ids[torch.arange(batch_size), lengths - 1] = 102
    ids = ids * mask
    return {"images": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask, "skipped": 0}


def _measure(cfg: Config, batch_size: int, steps: int, warmup: int, device: torch.device,
             text_fill: float = 1.0) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from softmask.models.vlp import create_model
    from softmask.tasks.pretrain import build_objective
    from softmask.train.loop import _autocast
    from softmask.train.schedule import make_optimizer

    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg, create_model(cfg), alpha_warmup_steps=1).to(device).train()
    optimizer = make_optimizer(objective, cfg.train)
    batch = synthetic_batch(cfg, batch_size, text_fill=text_fill)

    def step(i: int) -> None:  # what the training loop does per optimiser step
        with _autocast(cfg.train.precision, device):
            loss = objective(batch, i)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.momentum_update()

    for i in range(warmup):
        step(i)
    counter = FlopCounterMode(display=False)
    with counter:
        step(warmup)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        _sync(device)
        start = time.perf_counter()
        step(warmup + 1 + i)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the whole process's peak resident set (this subprocess measures one method only)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": median, "step_s_all": times, "pairs_per_s": batch_size / median,
            "peak_mem_mb": peak_mb, "flops_per_step": flops}


def _worker(args: tuple, queue) -> None:
    config, overrides, method, batch_size, steps, warmup, device, text_fill = args
    try:
        cfg = load_config(config, [*overrides, f"method={method}"])
        queue.put(_measure(cfg, batch_size, steps, warmup, torch.device(device), text_fill))
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def bench_step(config: str, overrides: list[str], methods: list[str], batch_size: int, steps: int,
               warmup: int, device: str | None = None, text_fill: float = 1.0) -> dict:
    """Measure every method (each in its own subprocess); returns the JSON-able result."""
    cfg = load_config(config, overrides)  # validate before any compute
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    if device == "cpu":
        dtype = torch.float32  # bf16 matmuls on this kind of CPU are not what training uses
    rate = matmul_flops(torch.device(device), dtype)
    ctx = mp.get_context("spawn")
    result: dict = {}
    for method in methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=((config, overrides, method, batch_size, steps, warmup, device,
                                                  text_fill), queue))
        proc.start()
        out = queue.get()
        proc.join()
        if "error" in out:
            raise RuntimeError(f"bench step failed for method {method}: {out['error']}")
        out["mfu"] = out["flops_per_step"] / out["step_s"] / rate
        result[method] = out
    if "albef" in result and len(result) > 1:
        base = result["albef"]
        result["ratios_to_albef"] = {m: {"step_s": r["step_s"] / base["step_s"],
                                         "peak_mem_mb": r["peak_mem_mb"] / base["peak_mem_mb"]}
                                     for m, r in result.items() if m != "albef"}
    result["matmul_flops"] = rate
    result["setup"] = {"config": config, "overrides": overrides, "batch_size": batch_size, "steps": steps,
                       "text_fill": text_fill,
                       "device": device, "precision": cfg.train.precision, "torch": torch.__version__,
                       "threads": torch.get_num_threads()}
    return result


def print_table(result: dict, file=sys.stdout) -> None:
    setup = result["setup"]
    print(f"config {setup['config']} {' '.join(setup['overrides'])} | batch {setup['batch_size']} "
          f"(text fill {setup.get('text_fill', 1.0):.2f}) | "
          f"{setup['device']} {setup['precision']} | matmul {result['matmul_flops'] / 1e9:.1f} GFLOP/s", file=file)
    print(f"{'method':10s} {'step_s':>8s} {'pairs/s':>8s} {'peak MB':>9s} {'GFLOP/step':>11s} {'MFU':>6s}", file=file)
    for method, r in result.items():
        if method in ("matmul_flops", "setup", "ratios_to_albef"):
            continue
        print(f"{method:10s} {r['step_s']:8.3f} {r['pairs_per_s']:8.1f} {r['peak_mem_mb']:9.0f} "
              f"{r['flops_per_step'] / 1e9:11.1f} {r['mfu']:6.1%}", file=file)
    for method, r in result.get("ratios_to_albef", {}).items():
        print(f"{method} / albef: step time x{r['step_s']:.3f}, peak memory x{r['peak_mem_mb']:.3f}", file=file)


def main_step(args) -> int:
    result = bench_step(args.config, args.overrides, args.methods.split(","), args.batch_size, args.steps,
                        args.warmup, args.device, args.text_fill)
    if args.json:
        with contextlib.suppress(KeyError):
            for method in args.methods.split(","):
                result[method].pop("step_s_all")
        print(json.dumps(result))
    else:
        print_table(result)
    return 0
