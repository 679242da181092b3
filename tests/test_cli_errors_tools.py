"""Bad input to the tool commands (convert, testbed, train, align flux-*, shapes, eval report, the
dispatcher): one ``miro <command>: <message>`` line on stderr naming the bad value, exit 2 for bad
input and 1 for the environment, never a traceback. Every case stops before any real work."""

from __future__ import annotations

import pytest
import torch

from miro.encoders.tiny import tiny_pipeline


def _one_line(capsys, prefix: str) -> str:
    """stderr, asserted to be one line starting with ``prefix``; returned for further checks."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- miro convert

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint in the layout ``miro train`` writes: EMA weights under ``ema.ema_0_9999.``."""
    root = tmp_path_factory.mktemp("convert")
    pipe = tiny_pipeline(root / "enc", text="bert")
    state = {f"ema.ema_0_9999.{k}": v for k, v in pipe.model.state_dict().items()}
    state["uncond_embedding"] = pipe.uncond_embedding.clone()
    path = root / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": pipe.config, "ema_decays": [0.9999]}}, path)
    return path


@pytest.mark.parametrize("index", ["5", "-1"])
def test_convert_ema_index_out_of_range(tiny_ckpt, tmp_path, capsys, index):
    from miro.train.convert import main

    assert main([str(tiny_ckpt), str(tmp_path / "out"), "--ema-index", index]) == 2
    err = _one_line(capsys, "miro convert: ")
    assert f"ema_index={index} out of range" in err and "[0.9999]" in err
    assert not (tmp_path / "out").exists()


def test_convert_missing_checkpoint(tmp_path, capsys):
    from miro.train.convert import main

    assert main([str(tmp_path / "nosuch.ckpt"), str(tmp_path / "out")]) == 2
    assert "nosuch.ckpt' does not exist" in _one_line(capsys, "miro convert: ")


@pytest.mark.parametrize("content", [b"hello\n", b"", b"PK\x03\x04" + b"x" * 64])
def test_convert_file_that_is_not_a_checkpoint(tmp_path, capsys, content):
    from miro.train.convert import main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    assert main([str(bad), str(tmp_path / "out")]) == 2
    assert "bad.ckpt' is not a readable Lightning checkpoint (" in _one_line(capsys, "miro convert: ")


def test_load_checkpoint_refuses_a_pickle_without_state_dict(tmp_path):
    from miro.train.convert import load_checkpoint

    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"'.*list\.ckpt' is not a Lightning checkpoint \(no state_dict\)"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_convert_unknown_autoencoder(tiny_ckpt, tmp_path, capsys):
    from miro.train.convert import main

    assert main([str(tiny_ckpt), str(tmp_path / "out"), "--autoencoder", "nosuch"]) == 2
    assert "unknown autoencoder 'nosuch'" in _one_line(capsys, "miro convert: ")


def test_convert_unknown_text_encoder_is_an_environment_error(tiny_ckpt, tmp_path, capsys):
    from miro.train.convert import main

    # not a built-in, not a folder, and the hub is off: the encoder loader's OSError -> exit 1
    assert main([str(tiny_ckpt), str(tmp_path / "out"), "--text-encoder", "nosuch"]) == 1
    assert "text encoder 'nosuch'" in _one_line(capsys, "miro convert: ")


@pytest.mark.parametrize("flag, spec, message", [
    ("--text-encoder", "google/flan-t5-xl", "--text-encoder 'google/flan-t5-xl' gives 2048-d text embeddings; "
                                            "this model was trained on 24-d text embeddings (network.label_dim)"),
    ("--autoencoder", "sdxl_vae", "--autoencoder 'sdxl_vae' gives 4-channel latents; this model was trained on "
                                  "3-channel latents (network.num_input_channels)"),
])
def test_convert_refuses_an_encoder_that_does_not_fit_the_model(tiny_ckpt, tmp_path, capsys, flag, spec, message):
    from miro.train.convert import main

    assert main([str(tiny_ckpt), str(tmp_path / "out"), flag, spec]) == 2
    assert _one_line(capsys, "miro convert: ") == f"miro convert: {message}"
    assert not (tmp_path / "out").exists()


def test_convert_folder_as_checkpoint_and_file_as_output(tiny_ckpt, tmp_path, capsys):
    from miro.train.convert import main

    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is a folder; give the .ckpt file in it" in _one_line(capsys, "miro convert: ")
    (tmp_path / "afile").write_text("x")
    assert main([str(tiny_ckpt), str(tmp_path / "afile")]) == 2
    assert "afile is a file; the pipeline goes into a folder" in _one_line(capsys, "miro convert: ")


def test_generate_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    from miro import generate_cli

    bad = tmp_path / "bad.ckpt"
    bad.write_text("hello\n")
    assert generate_cli.main(["p", "--model", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.ckpt' is not a readable Lightning checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------- miro testbed

def test_testbed_without_subcommand_lists_them(capsys):
    from miro.train.testbed import main

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "the following arguments are required: {precompute,list}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--testbed", "nosuch"], "testbed 'nosuch' is neither a built-in (real, shapes)"),
    (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
    (["--max-length", "0"], "--max-length must be >= 1; got 0"),
])
def test_testbed_precompute_bad_arguments(tmp_path, capsys, argv, match):
    from miro.train.testbed import main

    assert main(["precompute", "--out", str(tmp_path / "tb"), *argv]) == 2
    assert match in _one_line(capsys, "miro testbed precompute: ")
    assert not (tmp_path / "tb").exists()


def test_testbed_precompute_unknown_encoder(tmp_path, capsys):
    from miro.train.testbed import main

    assert main(["precompute", "--out", str(tmp_path / "tb"), "--encoder", "nosuch"]) == 1
    assert "text encoder 'nosuch'" in _one_line(capsys, "miro testbed precompute: ")


@pytest.mark.parametrize("prompts, csv, match", [
    ("a\n", "file_name,text\nx.png,a red circle\nx.jpg,a blue square\n",
     "metadata.csv, line 3: file_name 'x.jpg' and 'x.png' share the name 'x'"),
    ("a\n", "file_name,text\nuncond.png,a red circle\n", "metadata.csv, line 2: file_name 'uncond.png' is reserved"),
    ("a\n", "file_name,text\na.png,a red circle\nb.png,\n", "metadata.csv, line 3: empty prompt"),
    ("a\n", "file_name,text\n", "metadata.csv holds no prompts"),
    ("\n  \n", None, "prompts.txt holds no prompts"),
])
def test_testbed_prompts_that_would_share_or_lose_an_embedding_are_refused(tmp_path, capsys, prompts, csv, match):
    # two names with one stem used to write one file; "uncond" was overwritten by the empty prompt
    from miro.train.testbed import main

    tb = tmp_path / "T"
    tb.mkdir()
    (tb / "prompts.txt").write_text(prompts)
    if csv is not None:
        (tb / "metadata.csv").write_text(csv)
    assert main(["precompute", "--testbed", str(tb), "--out", str(tmp_path / "O")]) == 2
    assert match in _one_line(capsys, "miro testbed precompute: ")
    assert not (tmp_path / "O").exists()


@pytest.mark.parametrize("out", ["", "file"])
def test_testbed_out_must_be_a_folder(tmp_path, capsys, monkeypatch, out):
    from miro.train.testbed import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    assert main(["precompute", "--testbed", "shapes", "--out", out]) == 2
    assert f"--out {out!r} must name a folder" in _one_line(capsys, "miro testbed precompute: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_precompute_api_refuses_batch_size_0(tmp_path):
    from miro.train.testbed import precompute

    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        precompute("shapes", "minilm", tmp_path, batch_size=0)


# ---------------------------------------------------------------------------- miro train

def test_train_warmup_longer_than_the_run_fails_before_training(tmp_path, capsys):
    from miro.train import cli

    # data_dir is empty: the schedule check comes before any data or model work
    for extra in ([], ["--dry-run"]):
        assert cli.main(["experiment=shapes_miro", f"data_dir={tmp_path}", f"root_dir={tmp_path}",
                         "trainer.max_steps=2", *extra]) == 2
        err = _one_line(capsys, "miro train: error: ")
        assert "scheduler.warmup_steps=1000 must be below trainer.max_steps=2" in err
        assert "set scheduler.warmup_steps=N with N < 2" in err


def test_train_max_steps_not_an_integer(tmp_path, capsys):
    from miro.train import cli

    assert cli.main(["experiment=shapes_miro", f"data_dir={tmp_path}", "trainer.max_steps=abc", "--dry-run"]) == 2
    assert "trainer.max_steps='abc' is not an integer" in _one_line(capsys, "miro train: error: ")


def test_check_schedule_names_the_schedule_length_that_is_set():
    from miro.train.preflight import check_schedule

    cfg = {"trainer": {"max_steps": 10}, "scheduler": {"warmup_steps": 5, "total_steps": 5}}
    with pytest.raises(ValueError, match=r"warmup_steps=5 must be below scheduler.total_steps=5 .* raise scheduler"):
        check_schedule(cfg)
    cfg["scheduler"]["warmup_steps"] = -1
    with pytest.raises(ValueError, match=r"scheduler.warmup_steps=-1 must be >= 0"):
        check_schedule(cfg)
    cfg["scheduler"] = {"warmup_steps": 0, "total_steps": 10}
    cfg["trainer"]["max_steps"] = 0
    with pytest.raises(ValueError, match=r"trainer.max_steps=0 must be >= 1"):
        check_schedule(cfg)
    cfg["trainer"]["max_steps"] = 1e1  # 1e1 on the command line is a float to Hydra
    check_schedule(cfg)


# ---------------------------------------------------------------------------- miro align flux-*

@pytest.fixture
def no_flux_model(monkeypatch, capsys):
    """Any FLUX model load fails the test: the input file must be checked first."""
    from miro.align import flux_tools

    def boom(*a, **k):
        raise AssertionError("a FLUX model was loaded before the input file was checked")

    monkeypatch.setattr(flux_tools, "load_flux_pipeline", boom)
    try:
        import diffusers

        monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", boom)
    except ImportError:  # without diffusers a load would fail anyway; the message check still holds
        pass
    capsys.readouterr()  # what the first import of the FLUX modules prints (transformers' notices) is not the test's


@pytest.mark.parametrize("cmd, flag", [("flux-embed", "--prompts"), ("flux-generate", "--items"),
                                       ("flux-lora", "--data")])
def test_flux_missing_input_file(tmp_path, capsys, no_flux_model, cmd, flag):
    from miro.align.flux_cli import main

    missing = tmp_path / "nosuch.jsonl"
    assert main([cmd, flag, str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"dataset path {missing} does not exist" in _one_line(capsys, f"miro align {cmd}: ")


def test_flux_lora_without_images_or_prodigy_fails_before_the_model(tmp_path, capsys, no_flux_model, monkeypatch):
    # both were found only after FluxPipeline.from_pretrained (tens of GB)
    from miro.align.flux_cli import main

    assert main(["flux-lora", "--data", '["a red cat"]', "--optimizer", "adamw", "--out", str(tmp_path / "o")]) == 2
    assert "needs items whose image_path is an image file" in _one_line(capsys, "miro align flux-lora: ")
    import importlib.util

    from miro import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(extras.MissingExtra, match="flux-lora --optimizer prodigy needs the optional package 'prodigyopt'"):
        main(["flux-lora", "--data", '["a red cat"]', "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_flux_inline_json_that_does_not_parse(tmp_path, capsys, no_flux_model):
    from miro.align.flux_cli import main

    assert main(["flux-generate", "--items", "[bad", "--out", str(tmp_path / "o")]) == 2
    assert "inline JSON '[bad' does not parse" in _one_line(capsys, "miro align flux-generate: ")


# ---------------------------------------------------------------------------- miro shapes

def test_shapes_detect_missing_file(tmp_path, capsys):
    from miro.shapes.cli import main

    assert main(["detect", str(tmp_path / "nosuch.png")]) == 2
    assert "nosuch.png" in _one_line(capsys, "miro shapes detect: ")


def test_shapes_detect_file_that_is_not_an_image(tmp_path, capsys):
    from miro.shapes.cli import main

    bad = tmp_path / "notanimage.ckpt"
    bad.write_text("hello\n")
    assert main(["detect", str(bad)]) == 2
    assert "cannot identify image file" in _one_line(capsys, "miro shapes detect: ")


def test_shapes_render_out_file_vs_folder(tmp_path, capsys):
    from miro.shapes.cli import main

    existing = tmp_path / "existing_file.png"
    existing.write_bytes(b"")
    assert main(["render", "two red circles", "--n", "2", "--out", str(existing)]) == 2
    assert "existing_file.png is a file; with --n 2 it names a folder" in _one_line(capsys, "miro shapes render: ")
    assert main(["render", "two red circles", "--out", str(tmp_path)]) == 2
    assert "is a folder; with --n 1 it names a PNG file" in _one_line(capsys, "miro shapes render: ")
    # bad values are named before any folder is made; --out with --n 1 is a .png (foo.jpg was a JPEG)
    for argv, msg in ((["--out", str(tmp_path / "a" / "x.png"), "--seed", "-1"], "--seed must be a non-negative integer; got -1"),
                      (["--out", str(tmp_path / "a" / "x.png"), "--resolution", "16"], "resolution must be an integer in [32, 64]"),
                      (["--out", str(tmp_path / "a" / "x.jpg")], "must be a .png file"),
                      (["--out", str(tmp_path / "a" / "x")], "must be a .png file")):
        assert main(["render", "two red circles", *argv]) == 2, argv
        assert msg in _one_line(capsys, "miro shapes render: "), argv
    assert not (tmp_path / "a").exists()
    # a caption the grammar takes but no scene fits says what to do
    assert main(["render", "four red circles and four blue squares and four green triangles", "--out",
                 str(tmp_path / "crowd.png")]) == 2
    assert "the scene is too crowded; ask for fewer objects" in _one_line(capsys, "miro shapes render: ")


def test_shapes_eval_options_and_seed_are_range_checked(tmp_path, capsys):
    # --options threshold=2 scored every image 0 and replaced the folder's results, silently
    from miro.shapes.cli import main

    for opt, msg in (("threshold=2", "threshold=2.0 must be a number in [0, 1]"),
                     ("position_threshold=nan", "position_threshold=nan must be a number in [0, 1]"),
                     ("max_objects=0", "max_objects=0 must be an integer >= 1")):
        assert main(["eval-score", str(tmp_path), "--options", opt]) == 2
        assert msg in _one_line(capsys, "miro shapes eval-score: ")
    for seed in ("-1", "99999999999999999999"):
        assert main(["eval-generate", "--model", "ground-truth", "--outdir", str(tmp_path / "g"), "--seed", seed]) == 2
        assert "seed must be an integer in [0, 2^62]" in _one_line(capsys, "miro shapes eval-generate: ")
    assert not (tmp_path / "g").exists()


def test_shapes_make_dataset_out_is_a_file(tmp_path, capsys):
    from miro.shapes.cli import main

    existing = tmp_path / "existing_file"
    existing.write_bytes(b"")
    assert main(["make-dataset", "--out", str(existing), "--num-samples", "2", "--no-progress"]) == 2
    assert "existing_file is a file; it names the dataset folder" in _one_line(capsys, "miro shapes make-dataset: ")


def test_shapes_eval_prompts_unwritable_out(tmp_path, capsys, monkeypatch):
    from miro.shapes import eval as shapes_eval
    from miro.shapes.cli import main

    assert main(["eval-prompts", "--out", str(tmp_path)]) == 2  # a folder, not a .jsonl file
    assert "Is a directory" in _one_line(capsys, "miro shapes eval-prompts: ")
    assert main(["eval-prompts", "--out", str(tmp_path / "no" / "such" / "x.jsonl")]) == 0  # folders made, as render does
    assert (tmp_path / "no" / "such" / "x.jsonl").read_text().count("\n") == 300
    capsys.readouterr()

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shapes_eval, "write_prompt_set", denied)  # root ignores chmod: simulate it
    assert main(["eval-prompts", "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "Permission denied" in _one_line(capsys, "miro shapes eval-prompts: ")


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_shapes_eval_generate_limit_must_be_positive(tmp_path, capsys, limit):
    from miro.shapes.cli import main

    assert main(["eval-generate", "--model", "ground-truth", "--outdir", str(tmp_path / "o"), "--limit", limit]) == 2
    assert f"limit must be >= 1; got {limit}" in _one_line(capsys, "miro shapes eval-generate: ")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- miro eval report

def test_eval_report_refuses_a_missing_or_empty_folder(tmp_path, capsys):
    from miro.eval.cli import main

    missing = tmp_path / "nosuchdir"
    assert main(["report", str(missing)]) == 2
    assert "nosuchdir' does not exist" in _one_line(capsys, "miro eval report: ")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "empty' holds no generated images" in _one_line(capsys, "miro eval report: ")
    assert list(empty.iterdir()) == []  # no report/ folder left behind


# ---------------------------------------------------------------------------- miro (dispatcher)

def test_top_level_help_lists_every_shapes_subcommand(capsys):
    import argparse

    from miro.cli import main
    from miro.shapes.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert main(["--help"]) == 0
    shapes_line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("shapes "))
    for name in sub.choices:
        assert name in shapes_line, (name, shapes_line)


def test_help_command_prints_the_command_help(capsys):
    from miro.cli import main

    with pytest.raises(SystemExit) as e:
        main(["help", "convert"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: miro convert")
    assert main(["help", "nosuch"]) == 2
    assert "unknown command 'nosuch'" in _one_line(capsys, "miro: ")


def test_shapes_without_subcommand_lists_them(capsys):
    from miro.shapes.cli import main

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "{make-dataset,render,detect," in capsys.readouterr().err


def test_shapes_eval_refuses_prompts_the_detector_cannot_see(tmp_path, capsys):
    import json

    from PIL import Image

    from miro.eval.cli import main as eval_main
    from miro.shapes.cli import main

    d = tmp_path / "coco" / "00000"  # a GenEval prompt: a COCO class the Shapes detector cannot see
    (d / "samples").mkdir(parents=True)
    (d / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                                                  "prompt": "a photo of a bench"}) + "\n")
    Image.new("RGB", (32, 32)).save(d / "samples" / "0000.png")
    assert main(["eval-score", str(tmp_path / "coco"), "--no-progress"]) == 2
    assert "['bench']" in capsys.readouterr().err
    assert eval_main(["geneval", str(tmp_path / "coco"), "--detector", "shapes"]) == 2
    assert "cannot see" in capsys.readouterr().err


def test_report_errors_puts_a_library_message_on_one_line(capsys):
    from miro.cli import report_errors

    def run():  # transformers' offline message, line break included
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection.")

    assert report_errors("miro eval geneval", run) == 1
    assert "load the files. Check your internet" in _one_line(capsys, "miro eval geneval: ")


# ---------------------------------------------------------------------------- reward models not cached

def _uncached_scorer():
    """A scorer whose weights are neither cached nor reachable, failing as the hub reports it."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    from miro.rewards.base import Scorer

    class Uncached(Scorer):
        keys = ("hpsv2_score",)

        def load(self):
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\nand we "
                                          "cannot find the requested files in the local cache.")

    return Uncached()


def test_eval_rewards_names_a_missing_reward_model(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import miro.rewards as R
    from miro.eval.cli import main

    (tmp_path / "00000" / "samples").mkdir(parents=True)
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"prompt": "a red circle", "tag": "single_object"}\n')
    Image.new("RGB", (32, 32)).save(tmp_path / "00000" / "samples" / "0000.png")
    R.available()  # the registry is filled before one entry is replaced
    monkeypatch.setitem(R.REGISTRY, "hpsv2_score", lambda **kw: _uncached_scorer())
    assert main(["rewards", str(tmp_path), "--scorers", "hpsv2_score"]) == 1  # the environment, not bad input
    err = _one_line(capsys, "miro eval rewards: could not load the model of reward 'hpsv2_score' (LocalEntryNotFoundError")
    assert "`miro download hpsv2_score`" in err
    assert not (tmp_path / "rewards.jsonl").exists() or not (tmp_path / "rewards.jsonl").read_text().strip()


def test_preprocess_names_a_missing_reward_model():
    from miro.data.preprocess import _load_now

    with pytest.raises(OSError, match="could not load the model of reward 'hpsv2_score'") as e:
        _load_now(_uncached_scorer())
    assert "\n" not in str(e.value) and not isinstance(e.value, FileNotFoundError)


# ---------------------------------------------------------------------------- miro eval best-of-n

def test_best_of_n_without_scores_names_the_missing_file(tmp_path, capsys):
    from miro.eval.cli import main

    assert main(["best-of-n", str(tmp_path / "bo16"), "--select-by", "image_reward_score", "--metrics", "hpsv2_score"]) == 2
    err = _one_line(capsys, "miro eval best-of-n: ")
    assert "rewards.jsonl: no such file" in err
    assert "miro eval rewards" in err and "--scorers image_reward_score,hpsv2_score" in err


@pytest.mark.parametrize("cmd", ["generate", "all"])
def test_eval_names_a_missing_model_before_choosing_prompts(tmp_path, capsys, monkeypatch, cmd):
    # Without --prompts the model decides the set; a path that does not exist used to fall back to
    # GenEval and report its download (offline) or fetch it first (online).
    import urllib.request

    from miro.eval.cli import main

    def no_network(*a, **k):
        raise AssertionError("nothing is downloaded for a model that does not exist")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    out = ["--outdir", str(tmp_path / "o")]
    assert main([cmd, "--model", str(tmp_path / "nosuch.ckpt"), *out]) == 2
    assert "nosuch.ckpt' does not exist" in _one_line(capsys, f"miro eval {cmd}: ")
    assert main([cmd, "--model", str(tmp_path / "nosuch"), *out]) == 2
    assert "nosuch' is not a built-in pipeline" in _one_line(capsys, f"miro eval {cmd}: ")
    (tmp_path / "empty").mkdir()
    assert main([cmd, "--model", str(tmp_path / "empty"), *out]) == 2
    assert "empty" in _one_line(capsys, f"miro eval {cmd}: ")
    assert not (tmp_path / "o").exists()
