"""The training step's speed levers, off vs on, measured in one run, alternating.

    python benchmarks/step_speedup.py --config configs/pretrain/world_mini.yaml [--methods albef,softmask]
        [--text-fill 0.5] [--rounds 3] [--steps 5] [--batch-size 32] [--threads N] [--json OUT] [key=value ...]

Each round measures every method with the levers off (``model.text.pack_tokens=false
train.fused_optimizer=false``: every padded position computed and PyTorch's default AdamW, as before
they existed), then on (the defaults), each in its own process (``softmask bench step``'s measurement:
the loop's step with the momentum update, on a synthetic batch whose captions are padded as real ones
are, ``--text-fill``). Reports per method the median step time of each side over the rounds and the
median of the per-round ratios off / on (the speed-up). The remaining change, the momentum update in
multi-tensor calls, cannot be switched off (it is bit-identical and small).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softmask.bench import bench_step  # noqa: E402

OFF = ["model.text.pack_tokens=false", "train.fused_optimizer=false"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", default="albef,softmask")
    parser.add_argument("--text-fill", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="", help="also write the result here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.threads:  # the measurements run in spawned processes, which read it from the environment
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    times: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in methods}
    details: dict[str, dict[str, list[dict]]] = {m: {"off": [], "on": []} for m in methods}
    for round_ in range(args.rounds):
        for side, extra in (("off", OFF), ("on", [])):
            result = bench_step(args.config, [*args.overrides, *extra], methods, args.batch_size, args.steps,
                                args.warmup, args.device, args.text_fill)
            for m in methods:
                times[m][side].append(result[m]["step_s"])
                details[m][side].append({k: result[m][k] for k in ("pairs_per_s", "peak_mem_mb", "mfu",
                                                                   "flops_per_step")})
            print(f"round {round_ + 1}/{args.rounds} levers {side}: "
                  + ", ".join(f"{m} {result[m]['step_s']:.3f} s" for m in methods), flush=True)
    summary = {}
    for m in methods:
        ratios = [off / on for off, on in zip(times[m]["off"], times[m]["on"], strict=True)]
        summary[m] = {"off_s": statistics.median(times[m]["off"]), "on_s": statistics.median(times[m]["on"]),
                      "speedup": statistics.median(ratios), "speedups": ratios, "times": times[m],
                      **{f"{key}_{side}": statistics.median(d[key] for d in details[m][side])
                         for side in ("off", "on") for key in ("pairs_per_s", "peak_mem_mb", "mfu")}}
    print(f"{args.config} {' '.join(args.overrides)} | batch {args.batch_size}, text fill {args.text_fill} | "
          f"{args.rounds} rounds x {args.steps} steps | torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':10s} {'off s':>8s} {'on s':>8s} {'speed-up':>9s} {'MFU off/on':>12s} {'peak MB off/on':>15s}"
          "  per round")
    for m, r in summary.items():
        print(f"{m:10s} {r['off_s']:8.3f} {r['on_s']:8.3f} {r['speedup']:8.2f}x {r['mfu_off']:5.1%}/{r['mfu_on']:5.1%} "
              f"{r['peak_mem_mb_off']:7.0f}/{r['peak_mem_mb_on']:<7.0f}  "
              + " ".join(f"{x:.2f}" for x in r["speedups"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), "methods": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
