"""The command line: clear one-line errors, export, the demo."""

import json
import subprocess
import sys

import pytest

from softmask import from_pretrained
from softmask.cli import main

from helpers import TINY


def test_config_error_is_one_line_without_traceback(capsys):
    assert main(["info", "--config", TINY, "model.vision.widht=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softmask: error: ") and "model.vision.widht" in err and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    assert main(["info", "--config", TINY, f"model.init={tmp_path}/ALBEF.pth"]) == 2
    assert "model.init: checkpoint not found" in capsys.readouterr().err


def test_info_prints_config_and_sizes(capsys):
    assert main(["-q", "info", "--config", TINY]) == 0
    out = capsys.readouterr().out
    assert "fusion_layer: 2" in out and "parameters:" in out and "fusion_encoder" in out


def test_export_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["-q", "export", "--config", TINY, "--out", str(tmp_path / "m"), "model.embed_dim=32"]) == 0
    model = from_pretrained(tmp_path / "m")
    assert model.config.embed_dim == 32


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_budget(tmp_path):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--images", "40", "--steps", "2", "--batch-size", "4",
            "--vision-images", "60", "--vision-steps", "2", "--vision-batch-size", "8", "--eval-k", "3",
            "--grounding-captions", "2", "--mlm-captions", "3", "--shortcut-pairs", "3", "itc.queue_size=8",
            "data.augment.crop_scale=[0.9,1.0]"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "re-ranks ITC's top 3 of every query by ITM, grounding scores the first 2 captions" in report
    assert "Budget `default` (`--budget full` runs the recipe of the study" in report
    assert "changed: images 40, steps 2, batch_size 4, vision_images 60, vision_steps 2, vision_batch_size 8, " \
        "eval_k 3, grounding_captions 2, mlm_captions 3, shortcut_pairs 3;" in report
    assert "| metric (%) | albef | softmask |" in report and "minimal edits, ITM" in report
    assert "... colour edited" in report and "softmask pretrain --config" in report
    assert "softmask pretrain-vision --config" in report and "Image encoder, all held-out measures (%): shape" in report
    # The table per attribute: encoder, MLM own / shuffled image per model, edits by ITM and ITC per model.
    table = [line for line in report.splitlines() if line.startswith(("| colour (12.5, 12.5, 50) |",
                                                                        "| relation (25, 16.7, 50) |"))]
    assert len(table) == 2 and all(len(line.split("|")) == 2 + 1 + 1 + 2 * 3 for line in table), table
    assert "--held-out-pairs 0" in report  # the image encoder's world shows every colour-shape pair
    assert json.loads((out / "world" / "world.json").read_text())["heldout_pairs"]
    assert json.loads((out / "vision_world" / "world.json").read_text())["heldout_pairs"] == []
    assert (out / "vision" / "metrics_vl_world.json").is_file()  # the encoder scored on the first world's test split
    assert "ITM training loss (last logged steps) |" in report and "(prior 0.637)" in report
    # Its first lines say, per method, whether ITM left its prior (two steps: it did not).
    verdicts = [line for line in report.splitlines()[:6] if line.startswith("- **ITM ")]
    assert [v.split("(")[1].split(")")[0] for v in verdicts] == ["albef", "softmask"], report[:800]
    assert all("did not learn" in v and "against its prior" in v for v in verdicts)
    assert "on ordinary pairs" in verdicts[1] and "on the soft-masked pairs" in verdicts[1]
    assert all("hortcut**: itm_shortcut" in v for v in verdicts)
    assert (out / "vision" / "confusion.png").is_file()
    assert "'data.augment.crop_scale=[0.9,1.0]'" in report  # the commands are quoted for a shell
    assert (out / "losses.png").is_file() and (out / "retrieval.png").is_file()
    # One comparison per scene (3 of the 4 test images), each shown in the report; no per-word figures.
    figures = sorted((out / "gradcam").rglob("*.png"))
    assert [p.name for p in figures] == ["compare.png"] * 3
    assert all(f"![gradcam]({p.relative_to(out)})" in report for p in figures)
    assert json.loads((out / "vision" / "metrics_test.json").read_text())["images"] == 6  # its world's test split
    for method in ("albef", "softmask"):
        metrics = json.loads((out / method / "eval_world.json").read_text())
        assert 0 <= metrics["itm_all"] <= 100 and 0 <= metrics["tr1"] <= 100
        assert metrics["grounding_captions"] <= 2  # captions whose words the tokenizer splits differently are skipped
        examples = json.loads((out / method / "retrieval_examples.json").read_text())
        assert len(examples) == 4 and all(len(e["top"]) == 4 for e in examples)  # 4 test images in 40
        # the vision-language runs start from the image encoder the demo pretrained
        assert f"model.vision.init={out / 'vision' / 'model'}" in (out / f"{method}.log").read_text()
    # The report's `softmask explore` command serves the demo's models (what the README tells a user to run).
    command = f"softmask explore --checkpoint {out / 'softmask'} --compare {out / 'albef'} --images {out / 'world'}"
    assert command in report
    from softmask.explore.session import Explorer, load_models, open_gallery

    explorer = Explorer(load_models([str(out / "softmask"), str(out / "albef")]), open_gallery(out / "world"))
    seen = explorer.analyse(explorer.gallery.names[0], "a red circle left of a blue square")
    assert [len(r["overlays"]) for r in seen["results"]] == [8, 8]
    assert [len(r["top"]) for r in explorer.retrieve("a red circle")["results"]] == [4, 4]  # 4 test images
    # That a rerun reuses both worlds and resumes the runs: the Ctrl-C test in test_reliability.py.


def test_demo_rejects_a_bad_override_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--images", "40", "model.text_pooling=max"]) == 2
    assert "text_pooling" in capsys.readouterr().err
    assert not out.exists()  # no world generated, nothing trained


def test_demo_budgets_and_bad_settings_are_checked_before_any_work(tmp_path, capsys):
    from softmask.demo import BUDGETS, run_demo

    out = tmp_path / "demo"
    assert set(BUDGETS) == {"default", "full"} and set(BUDGETS["default"]) == set(BUDGETS["full"])
    # full: the recipe of the study in docs/results.md
    assert {k: BUDGETS["full"][k] for k in ("steps", "batch_size", "vision_steps", "eval_k", "grounding_captions")} \
        == {"steps": 600, "batch_size": 28, "vision_steps": 700, "eval_k": 16, "grounding_captions": 500}
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["-q", "demo", "--out", str(out), "--budget", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert main(["-q", "demo", "--out", str(out), "--eval-k", "0"]) == 2
    assert "--eval-k must be at least 1, got 0" in capsys.readouterr().err
    assert main(["-q", "demo", "--out", str(out), "--budget", "full", "--grounding-captions", "0"]) == 2
    assert "--grounding-captions must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unknown settings"):
        run_demo(out, steps_per_epoch=3)
    assert not out.exists()


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "softmask", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "export" in out.stdout


def test_demo_progress_reads_past_a_line_still_being_written(tmp_path, caplog):
    import logging

    from softmask.demo import _Progress

    run = tmp_path / "albef"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 50, "loss_itc": 6.0, "loss_itm": 0.63,
                                                   "pairs_per_s": 64.0}) + '\n{"step": 10')
    progress = _Progress({"albef": run, "softmask": tmp_path / "softmask"}, steps=100, batch_size=64,
                         keys={"loss_itc": "ITC", "loss_itm": "ITM"})
    with caplog.at_level(logging.INFO, logger="softmask"):
        progress()
        progress()  # nothing new logged since: no repeated line
    assert "albef: step 50/100 (ITC 6.000, ITM 0.630) | softmask: starting; about 1 min left" in caplog.text
    assert caplog.text.count("albef: step 50/100") == 1
    (run / "metrics.jsonl").write_text(json.dumps({"step": 60, "loss_itc": 5.0, "loss_itm": 0.6,
                                                   "pairs_per_s": 64.0}) + "\n")
    with caplog.at_level(logging.INFO, logger="softmask"):
        progress()
    assert "albef: step 60/100" in caplog.text


def test_itm_prior_is_the_entropy_of_the_share_of_positives():
    from softmask.demo import itm_prior

    assert itm_prior(0.0) == pytest.approx(0.6365, abs=1e-4)  # 1 positive, 2 negatives per image
    assert itm_prior(1.0) == pytest.approx(0.6931, abs=1e-4)  # + 1 soft-masked positive: half are positives
    assert itm_prior(1.0, "positives") == itm_prior(1.0)
    # + a masked positive and a masked negative: 2 of 5 are positives
    assert itm_prior(1.0, "negative_captions") == pytest.approx(0.6730, abs=1e-4)
    assert itm_prior(1.0, "all") == pytest.approx(itm_prior(0.0))  # every pair mirrored: still 1 in 3
    # masked_loss "added": the ordinary pairs' prior plus the soft-masked pairs' own
    assert itm_prior(1.0, "all", "added") == pytest.approx(2 * itm_prior(0.0))
    assert itm_prior(1.0, "positives", "added") == pytest.approx(itm_prior(0.0))  # all masked pairs match
    assert itm_prior(1.0, "negative_captions", "added") == pytest.approx(itm_prior(0.0) + 0.6931, abs=1e-4)
    assert itm_prior(0.0, "all", "added") == pytest.approx(itm_prior(0.0))  # no soft-masked pair


def test_the_report_gives_each_model_its_itm_verdict_test_loss_and_shortcut():
    from softmask.demo import _itm_verdicts

    finals = {"albef": {"loss_itm": 0.35, "prior": 0.637},
              "softmask": {"loss_itm": 0.40, "loss_itm_pairs": 0.48, "loss_itm_soft": 0.30, "prior": 0.66}}
    metrics = {"albef": {"itm_test_loss": 0.412, "itm_shortcut": -0.02, "itm_mismatched_masked": 0.01,
                         "itm_mismatched": 0.03},
               "softmask": {"itm_test_loss": 0.503, "itm_shortcut": 0.62, "itm_mismatched_masked": 0.65,
                            "itm_mismatched": 0.03}}
    albef, softmask = _itm_verdicts(finals, metrics)
    assert albef.startswith("- **ITM learned** (albef): training loss 0.350")
    assert "test split's ordinary pairs 0.412" in albef and "**No shortcut**: itm_shortcut -0.02" in albef
    assert "training loss on ordinary pairs 0.480" in softmask and "test split's ordinary pairs 0.503" in softmask
    assert "**Shortcut**: itm_shortcut +0.62" in softmask and "masking alone says match" in softmask


def test_the_itm_verdict_tells_a_head_that_learned_from_one_that_barely_left_its_prior():
    from softmask.demo import itm_verdict

    prior = 0.637
    assert itm_verdict(0.338, prior) == "learned"  # ALBEF, world recipe, 600 steps
    assert itm_verdict(0.616, prior) == "barely left its prior"  # SoftMask's default at 300 steps
    assert itm_verdict(0.63, prior) == "did not learn"
    assert itm_verdict(0.70, prior) == "did not learn"


def test_the_itm_panel_shows_softmask_ordinary_pairs_against_their_own_prior(tmp_path):
    from softmask.demo import itm_extra_lines, plot_losses

    albef = [{"step": s, "loss_itm": 0.6} for s in (25, 50)]
    softmask = [{"step": s, "loss_itm": 0.47, "soft_mask_share": 1.0, "loss_itm_pairs": p}
                for s, p in ((25, 0.64), (50, 0.63))]
    assert [line[0] for line in itm_extra_lines("albef", albef)] == ["albef: prior 0.637"]
    (prior, _, value, _), (label, steps, values, _) = itm_extra_lines("softmask", softmask)
    assert prior == "softmask: prior 0.693" and value == [pytest.approx(0.6931, abs=1e-4)]
    assert label == "softmask: ordinary pairs (prior 0.637)" and steps == [25, 50] and values == [0.64, 0.63]
    runs = {}
    for name, rows in (("albef", albef), ("softmask", softmask)):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        keys = {"loss": 1.0, "loss_itc": 2.0, "loss_mlm": 3.0}
        (runs[name] / "metrics.jsonl").write_text("".join(json.dumps({**keys, **r}) + "\n" for r in rows))
    assert plot_losses(runs, tmp_path / "losses.png").stat().st_size > 0
