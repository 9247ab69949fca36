"""softmask.side_by_side: child processes, their logs, exit codes and the progress callback."""

from __future__ import annotations

import os
import sys

from softmask.side_by_side import run_side_by_side, softmask_command, threads_per_process


def test_exit_codes_come_back_in_order_and_each_log_holds_its_command_and_output(tmp_path):
    commands = [([sys.executable, "-c", f"import sys, time; time.sleep({delay}); print('out {i}'); sys.exit({i})"],
                 tmp_path / f"logs/{i}.log") for i, delay in enumerate((0.6, 0.0, 0.3))]
    polls = []
    codes = run_side_by_side(commands, parallel=2, poll=lambda: polls.append(1), poll_every_s=0.0)
    assert codes == [0, 1, 2]
    for i, (cmd, log_file) in enumerate(commands):
        first, *rest = log_file.read_text().splitlines()
        assert first == " ".join(cmd) and rest == [f"out {i}"]
    assert polls  # called while the children ran


def test_at_most_parallel_children_run_at_once(tmp_path):
    # Each child appends its start and end time; with parallel=1 no two intervals overlap.
    stamp = tmp_path / "stamps"
    code = (f"import time; s = time.time(); time.sleep(0.3); "
            f"open({str(stamp)!r}, 'a').write(f'{{s}} {{time.time()}}\\n')")
    commands = [([sys.executable, "-c", code], tmp_path / f"{i}.log") for i in range(3)]
    assert run_side_by_side(commands, parallel=1) == [0, 0, 0]
    spans = sorted(tuple(map(float, line.split())) for line in stamp.read_text().splitlines())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


def test_threads_are_shared_out_and_commands_use_this_interpreter():
    assert threads_per_process(1) == (os.cpu_count() or 1)
    assert threads_per_process(10 * (os.cpu_count() or 1)) == 1
    assert softmask_command("world", "--out", "w")[:4] == [sys.executable, "-m", "softmask", "-q"]
    assert softmask_command("demo", quiet=False)[3] == "demo"
