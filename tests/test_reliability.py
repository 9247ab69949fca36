"""What a user's mistakes and interruptions get, through the command line: a wrong image folder stops
early with one line, Ctrl-C and SIGTERM stop cleanly and resume exactly, files that are not
checkpoints get one line, and results are not overwritten silently."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softmask.cli import main
from softmask.config import merge_overrides
from softmask.train.checkpoint import list_checkpoints, load_checkpoint

from helpers import TINY, make_world
from helpers import pretrain_overrides as base_overrides
from helpers import read_metrics as metrics

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = str(ROOT / "configs" / "finetune" / "retrieval_tiny.yaml")


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """The tiny pretraining's overrides, ``extra`` replacing any of the same key."""
    return merge_overrides(base_overrides(root, out), extra)


def softmask(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softmask", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **popen)


def one_line_error(err: str, *needles: str) -> None:
    """stderr is a single ``softmask: error:`` line (after any log lines) holding every needle."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("softmask: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_world(root, n=16)
    return root


# ------------------------------------------------------------------------------------------------
# Data that cannot be read
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_wrong_image_root_stops_before_any_step_with_one_line_and_a_bounded_log(world, tmp_path):
    out = tmp_path / "run"
    args = overrides(world, out, "train.batch_size=4", "train.max_steps=2", "data.image_root=/data/nope")
    done = softmask("pretrain", "--config", str(TINY), *args, timeout=600)
    assert done.returncode == 2
    # It stops at the first batch, before any step (not after an epoch of failed reads): no step logged.
    assert not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip()
    one_line_error(done.stderr, "could not be read", "/data/nope/images/", "data.image_root", "'/data/nope'")
    assert len(done.stderr) < 5000 and (out / "train.log").stat().st_size < 5000


@pytest.mark.slow
def test_a_wrong_image_root_in_a_task_and_with_on_bad_sample_raise(task_world, tmp_path):
    base = ["--config", RETRIEVAL, f"world={task_world}", "data.image_root=/data/nope", "data.num_workers=1"]
    done = softmask("finetune", "retrieval", *base, f"output_dir={tmp_path / 'a'}")
    assert done.returncode == 2
    one_line_error(done.stderr, "could not be read", "/data/nope/", "data.image_root")
    done = softmask("finetune", "retrieval", *base, f"output_dir={tmp_path / 'b'}", "data.on_bad_sample=raise")
    assert done.returncode == 2
    one_line_error(done.stderr, "/data/nope/", "file not found", "data.on_bad_sample")


@pytest.mark.slow
def test_bad_samples_among_good_ones_are_skipped_and_their_log_lines_bounded(tmp_path):
    root = tmp_path / "data"
    make_world(root, n=64)
    records = json.loads((root / "pretrain.json").read_text())
    for i in range(0, 64, 4):  # a quarter of the images missing
        records[i]["image"] = f"images/missing_{i}.png"
    (root / "pretrain.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--config", str(TINY),
                 *overrides(root, out, "train.batch_size=8", "train.max_steps=16", "data.bad_sample_window=32")]) == 0
    assert metrics(out)[-1]["skipped_samples"] == 32  # two epochs of 16 missing
    lines = [line for line in (out / "train.log").read_text().splitlines() if "bad sample" in line]
    assert sum("skipped bad sample:" in line for line in lines) == 10  # one by one, then summarised
    # The other 22 in summaries: one at the end, and one a minute into the run if it is that slow (under
    # load); either way they add up to 22 and the last one has seen all 32 bad samples.
    summaries = [re.search(r"skipped (\d+) more bad samples \((\d+) of (\d+) read", line) for line in lines]
    summaries = [m for m in summaries if m]
    assert summaries and sum(int(m[1]) for m in summaries) == 22, lines
    assert int(summaries[-1][2]) == 32 and 32 <= int(summaries[-1][3]) <= 128, lines
    # The same data with a stricter limit stops.
    code = main(["-q", "pretrain", "--config", str(TINY),
                 *overrides(root, tmp_path / "strict", "train.batch_size=8", "train.max_steps=16",
                            "data.bad_sample_window=32", "data.max_bad_share=0.2")])
    assert code == 2


# ------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ------------------------------------------------------------------------------------------------


def _run_until_signal(world: Path, out: Path, sig: int, steps: int, after_step: int,
                      group: bool = True) -> subprocess.CompletedProcess:
    """Start a tiny pretraining in its own process group; once ``after_step`` steps are logged send ``sig``
    to the whole group (as a terminal's Ctrl-C does: the DataLoader worker gets it too), or, with
    ``group=False``, to the training process alone (as a container runtime's SIGTERM)."""
    cmd = [sys.executable, "-m", "softmask", "pretrain", "--config", str(TINY),
           *overrides(world, out, "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=1000",
                      "data.num_workers=1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    deadline = time.monotonic() + 900  # only bounds the wait: on a loaded machine the steps come late
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= after_step:
            break
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_resume_auto_equals_an_uninterrupted_run(world, tmp_path):
    steps = 60
    full = tmp_path / "full"
    assert main(["-q", "pretrain", "--config", str(TINY),
                 *overrides(world, full, "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=1000",
                            "data.num_workers=1")]) == 0
    part = tmp_path / "part"
    stopped = _run_until_signal(world, part, signal.SIGINT, steps, after_step=3)
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    last = [line for line in stopped.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("softmask: stopped by Ctrl-C") and "resume=auto" in last and str(part) in last
    saved = list_checkpoints(part)
    assert len(saved) == 1
    step = load_checkpoint(saved[0])["state"]["step"]
    assert 3 <= step < steps and f"step_{step:08d}.pt" in last
    assert main(["-q", "pretrain", "--config", str(TINY),
                 *overrides(world, part, "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=1000",
                            "data.num_workers=1", "resume=auto")]) == 0
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]
    a, b = (load_checkpoint(list_checkpoints(run)[-1])["task"] for run in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_also_saves_and_says_how_to_resume(world, tmp_path):
    stopped = _run_until_signal(world, tmp_path / "run", signal.SIGTERM, 400, after_step=3, group=False)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stopped.stderr and "resume=auto" in stopped.stderr.splitlines()[-1]
    assert len(list_checkpoints(tmp_path / "run")) == 1


# ------------------------------------------------------------------------------------------------
# Files that are not checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "notes.pt"
    path.write_text("hello, these are my notes\n")
    return path


@pytest.fixture(scope="module")
def pretrained_run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    assert main(["-q", "pretrain", "--config", str(TINY),
                 *overrides(world, out, "train.batch_size=4", "train.max_steps=2", "train.save_every=1")]) == 0
    return out


def _slots(not_a_checkpoint: Path, world: Path, task_world: Path, tmp: Path) -> dict[str, list[str]]:
    text = str(not_a_checkpoint)
    pretrain = ["pretrain", "--config", str(TINY), *overrides(world, tmp / "p")]
    return {
        "resume": [*pretrain, f"resume={text}"],
        "model.init": [*pretrain, f"model.init={text}"],
        "model.vision.init": [*pretrain, f"model.vision.init={text}"],
        "model.text.init": [*pretrain, f"model.text.init={text}"],
        "finetune model.init": ["finetune", "retrieval", "--config", RETRIEVAL, f"world={task_world}",
                                f"output_dir={tmp / 'f'}", f"model.init={text}"],
        "evaluate": ["evaluate", "retrieval", "--config", RETRIEVAL, f"world={task_world}", "--checkpoint", text],
        "evaluate world": ["evaluate", "world", "--world", str(task_world), "--checkpoint", text],
        "gradcam": ["gradcam", "--checkpoint", text, "--image", str(world / "images" / "0.png"), "--text", "a red disc",
                    "--out", str(tmp / "g")],
    }


@pytest.mark.parametrize("slot", ["resume", "model.init", "model.vision.init", "model.text.init",
                                  "finetune model.init", "evaluate", "evaluate world", "gradcam"])
def test_a_text_file_in_any_checkpoint_slot_gets_one_line(slot, not_a_checkpoint, world, task_world, tmp_path,
                                                         capsys):
    args = _slots(not_a_checkpoint, world, task_world, tmp_path)[slot]
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err
    one_line_error(err, str(not_a_checkpoint), "not a checkpoint", "'hello, these are my notes'")
    assert "weights_only" not in err


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(world, pretrained_run, tmp_path,
                                                                          caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for ckpt in list_checkpoints(pretrained_run):
        (run / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short
    caplog.set_level(logging.INFO, logger="softmask")
    code = main(["pretrain", "--config", str(TINY),
                 *overrides(world, run, "train.batch_size=4", "train.max_steps=3", "resume=auto")])
    assert code == 0
    text = caplog.text
    assert f"{newest}: damaged or not a checkpoint" in text and "step_00000001.pt" in text
    assert "resumed from" in text and "step_00000001.pt at step 1" in text


def test_a_text_file_as_the_newest_checkpoint_with_nothing_before_it_is_one_line(world, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004.pt").write_text("not a checkpoint")
    assert main(["-q", "pretrain", "--config", str(TINY), *overrides(world, run, "resume=auto")]) == 2
    one_line_error(capsys.readouterr().err, "step_00000004.pt", "no readable checkpoint")


# ------------------------------------------------------------------------------------------------
# Results are not overwritten silently
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_writes_into_the_evaluated_models_folder_and_never_over_another_runs_results(
        pretrained_run, task_world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "runs" / "retrieval_tiny"  # the config's output_dir: the fine-tuned run's own results
    other.mkdir(parents=True)
    (other / "metrics_test.json").write_text('{"tr1": 99.0}')
    base = ["-q", "evaluate", "retrieval", "--config", RETRIEVAL, f"world={task_world}", "--split", "test",
            "--checkpoint", str(pretrained_run), "finetune.k_test=2"]
    assert main(base) == 0
    assert json.loads((other / "metrics_test.json").read_text()) == {"tr1": 99.0}
    own = pretrained_run / "eval" / "retrieval" / "metrics_test.json"
    assert "tr1" in json.loads(own.read_text()) and f"metrics in {own.parent}" in capsys.readouterr().out
    for explicit in (["--out", str(other)], [f"output_dir={other}"]):
        assert main([*base, *explicit]) == 2
        one_line_error(capsys.readouterr().err, str(other / "metrics_test.json"), "--overwrite")
    assert json.loads((other / "metrics_test.json").read_text()) == {"tr1": 99.0}
    assert main([*base, "--out", str(other), "--overwrite"]) == 0
    assert json.loads((other / "metrics_test.json").read_text()) != {"tr1": 99.0}


# ------------------------------------------------------------------------------------------------
# The demo: Ctrl-C, then the same command again
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_the_demo_stops_its_runs_with_checkpoints_and_a_rerun_resumes_them(tmp_path):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--images", "40", "--steps", "40", "--batch-size", "4",
            "--vision-images", "60", "--vision-steps", "2", "--vision-batch-size", "8", "itc.queue_size=8",
            "train.log_every=1"]
    # A terminal's foreground job: SIGINT at its default. (A job a non-interactive shell starts in the
    # background inherits SIGINT ignored, and Python then keeps ignoring it: a CI runner may start us so.)
    proc = subprocess.Popen([sys.executable, "-m", "softmask", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "albef" / "metrics.jsonl"
    deadline = time.monotonic() + 900  # only bounds the wait
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the demo and its children
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("softmask: the demo stopped") and "run the same command again: softmask -q demo" in last
    stopped_at = {}
    for method in ("albef", "softmask"):
        (ckpt,) = list_checkpoints(out / method)
        stopped_at[method] = load_checkpoint(ckpt)["state"]["step"]
        assert 1 <= stopped_at[method] < 40
    worlds = {name: (out / name / "world.json").stat().st_mtime_ns for name in ("world", "vision_world")}
    assert main(args) == 0
    assert {name: (out / name / "world.json").stat().st_mtime_ns for name in worlds} == worlds  # both reused
    for method in ("albef", "softmask"):
        steps = [row["step"] for row in metrics(out / method)]
        assert steps == list(range(1, 41)), (method, stopped_at[method], steps)
        assert f"resumed from {out / method / 'checkpoints'}" in (out / f"{method}.log").read_text()
    assert (out / "report.md").is_file()


# ------------------------------------------------------------------------------------------------
# The command line says what it did
# ------------------------------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_both_values(world, tmp_path, capsys):
    # What an unquoted data.train=shards/part-{0..2}.tar becomes in the shell: three words.
    words = [f"data.train=[{tmp_path}/part-{i}.tar]" for i in range(3)]
    assert main(["-q", "pretrain", "--config", str(TINY), *words]) == 2
    one_line_error(capsys.readouterr().err, "data.train is given twice", "part-0.tar", "part-1.tar", "quote")


def test_data_train_expands_globs_and_braces_and_names_a_pattern_that_matches_nothing(tmp_path):
    from softmask.config import ConfigError
    from softmask.data.dataset import expand_entries

    for name in ("b.tar", "a.tar", "c.json"):
        (tmp_path / name).write_text("")
    assert expand_entries([f"{tmp_path}/*.tar", f"{tmp_path}/c.json"]) == [
        f"{tmp_path}/a.tar", f"{tmp_path}/b.tar", f"{tmp_path}/c.json"]
    assert expand_entries([f"{tmp_path}/{{b,a}}.tar"]) == [f"{tmp_path}/b.tar", f"{tmp_path}/a.tar"]
    assert expand_entries(["https://host/x-{0..1}.tar"]) == ["https://host/x-0.tar", "https://host/x-1.tar"]
    with pytest.raises(ConfigError, match=r"data.train: the pattern '.*/\*.tgz' matches no file"):
        expand_entries([f"{tmp_path}/*.tgz"])


def test_pretraining_on_a_glob_of_shards_reads_every_shard(tmp_path):
    from softmask.config import load_config
    from softmask.data.annotations import load_annotations
    from softmask.data.shards import build_shard_loader, write_shards

    make_world(tmp_path, n=12)
    write_shards(load_annotations([str(tmp_path / "pretrain.json")], str(tmp_path)), str(tmp_path / "shards"), 4)
    cfg = load_config(TINY, [f"data.train=[{tmp_path}/shards/*.tar]", "train.batch_size=4", "data.num_workers=0"])
    indices = [i for batch in build_shard_loader(cfg, 0, 1, epoch=0) for i in batch["indices"].tolist()]
    assert len(indices) == 12 and len({i >> 32 for i in indices}) == 3  # 3 shards of 4


def test_a_damaged_shard_is_reported_as_a_sentence():
    from softmask.data.shards import describe_shard_error

    exc = OSError("unexpected end of data @ <_io.BufferedReader name='s/part-3.tar'>")
    exc.args = exc.args + (object(), "s/part-3.tar")  # what webdataset's tar reader appends
    assert describe_shard_error(exc) == "skipping the rest of damaged shard s/part-3.tar: unexpected end of data"


@pytest.mark.slow
def test_evaluate_world_refuses_k_0_and_a_missing_layer(task_world, pretrained_run, capsys):
    base = ["-q", "evaluate", "world", "--world", str(task_world), "--checkpoint", str(pretrained_run)]
    assert main([*base, "--k", "0"]) == 2
    one_line_error(capsys.readouterr().err, "--k", "at least 1, got 0")
    assert main([*base, "--grounding-captions", "0"]) == 2
    one_line_error(capsys.readouterr().err, "--grounding-captions", "at least 1, got 0")
    assert main([*base, "--layer", "9"]) == 2
    one_line_error(capsys.readouterr().err, "--layer", "9")


def test_finetune_without_annotation_files_names_the_key_and_world(tmp_path, capsys):
    assert main(["-q", "finetune", "retrieval", "--config", RETRIEVAL, f"output_dir={tmp_path / 'r'}"]) == 2
    one_line_error(capsys.readouterr().err, "finetune.train is empty", "finetune.train=[FILE.json,...]",
                   "world=DIR")


WORKER_SCRIPT = """
import multiprocessing, os, signal, sys, time
from softmask.data.workers import pool_worker_signals

def stop(signum, frame):  # the command line's SIGTERM handler, which forked workers inherit
    raise KeyboardInterrupt

def work(quiet, ready):
    if quiet:
        pool_worker_signals()
    ready.set()
    time.sleep(300)

signal.signal(signal.SIGTERM, stop)
context = multiprocessing.get_context("fork")
for quiet in (False, True):
    ready = context.Event()
    worker = context.Process(target=work, args=(quiet, ready))
    worker.start()
    ready.wait(300)  # the worker has its handlers (however loaded the machine is)
    os.kill(worker.pid, signal.SIGTERM)  # what Pool.terminate does at the end of a `with Pool()` block
    worker.join(300)
    print(quiet, worker.exitcode, flush=True)
"""


def test_world_drawing_workers_die_quietly_on_sigterm():
    result = subprocess.run([sys.executable, "-c", WORKER_SCRIPT], capture_output=True, text=True, timeout=900)
    lines = result.stdout.split()
    # Without the initializer the inherited handler raises in the worker (exit 1, a traceback on stderr);
    # with it the worker dies by the signal, silently.
    assert lines == ["False", "1", "True", str(-signal.SIGTERM)], result.stdout + result.stderr
    assert result.stderr.count("Traceback") == 1
