"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events,
a ``train.log`` text log, and a tqdm progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("softmask")


# The losses a log line shows (those an objective reports): pretraining's, then pretrain-vision's.
LOGGED_LOSSES = ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_objects", "loss_presence", "loss_position",
                 "loss_label")


class RunLogger:
    """Writes metrics on the main process; on other ranks every method does nothing."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, initial_step: int):
        self.enabled = enabled
        self.total = total_steps
        self.file_handler = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        if path.is_file():  # a resumed run: drop lines logged after the checkpoint it resumes from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= initial_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.metrics = open(path, "a")  # noqa: SIM115 (closed in close())
        self.file_handler = logging.FileHandler(output_dir / "train.log")
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self.file_handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if a user removed it
            log.warning("tensorboard is not installed: no TensorBoard events")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        disable=None)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def record(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        step = metrics["step"]
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        else:  # no terminal (a log file, CI): one line per logged step instead of the bar
            parts = " ".join(f"{k} {metrics[k]:.4g}" for k in LOGGED_LOSSES if k in metrics)
            log.info(f"step {step}/{self.total}: {parts}, {metrics['pairs_per_s']:.1f} pairs/s")

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.file_handler is not None:
            log.removeHandler(self.file_handler)
            self.file_handler.close()
