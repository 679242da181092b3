"""One-line errors of the generation commands (``miro generate``, ``miro eval``, ``miro shapes
eval-generate``, ``miro demo``): bad input is refused before a model loads or a file is written,
and a failed run does not block the corrected one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from miro import generate_cli
from miro.demo import server as demo_server
from miro.eval import cli as eval_cli
from miro.eval import generate as G
from miro.eval.prompts import PromptItem
from miro.shapes import cli as shapes_cli
from miro.shapes.eval import GroundTruthPipeline


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1] if err else ""


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (it must refuse the flags first)."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(generate_cli, "load_pipeline", boom)
    monkeypatch.setattr(G, "load_pipeline", boom)


def _eval_gen(outdir, *extra):
    return ["generate", "--model", "ground-truth", "--prompts", "shapes", "--limit", "1", "--n", "1",
            "--outdir", str(outdir), *extra]


# ------------------------------------------------------------------ 1. a failed run's record

def test_failed_run_writes_no_record_and_the_rerun_works(tmp_path, capsys):
    """A key the model was not trained on is refused before generation.json."""
    out = tmp_path / "se3"
    argv = ["eval-generate", "--model", "shapes", "--outdir", str(out), "--limit", "1", "--n-samples", "1",
            "--steps", "1"]
    assert shapes_cli.main(argv + ["--reward", "foo=0.5"]) == 2
    assert "not trained on: ['foo']" in _err(capsys)
    assert not (out / G.RUN_FILE).exists()
    assert shapes_cli.main(argv) == 0
    assert (out / "00000" / "samples" / "0000.png").is_file()


def test_bad_cfg_is_refused_before_the_folder_is_touched(tmp_path, capsys):
    out = tmp_path / "eg"
    assert eval_cli.main(_eval_gen(out, "--cfg", "-1")) == 2
    assert "cfg must be a finite number >= 0; got -1.0" in _err(capsys)
    assert not out.exists()
    assert eval_cli.main(_eval_gen(out)) == 0


def test_record_beside_no_image_does_not_block(tmp_path, capsys):
    """A run that failed after writing its record (and metadata) but before its first image."""
    out = tmp_path / "eg"

    class Failing(GroundTruthPipeline):
        def __call__(self, *a, **k):
            raise RuntimeError("out of memory")

    other = [PromptItem("a blue square", {"prompt": "a blue square"})]
    with pytest.raises(RuntimeError, match="out of memory"):
        G.generate_folder(Failing(), other, out, G.GenerateConfig(model="x", cfg=3.0, n_samples=1), progress=False)
    assert (out / G.RUN_FILE).is_file() and (out / "00000" / "metadata.jsonl").is_file()
    assert eval_cli.main(_eval_gen(out)) == 0
    assert json.loads((out / G.RUN_FILE).read_text())["config"]["model"] == "ground-truth"
    assert (out / "00000" / "samples" / "0000.png").is_file()


def test_record_beside_images_still_protects_them(tmp_path, capsys):
    out = tmp_path / "eg"
    assert eval_cli.main(_eval_gen(out)) == 0
    assert eval_cli.main(_eval_gen(out, "--seed", "1")) == 2
    assert "holds images made with other settings (seed: 0 -> 1)" in _err(capsys)


def test_sweep_target_folder_of_a_failed_run_does_not_block(tmp_path, capsys):
    out = tmp_path / "sw"
    stale = out / "target_0.0000"
    stale.mkdir(parents=True)
    (stale / G.RUN_FILE).write_text(json.dumps({"config": {"model": "ground-truth", "cfg": -1.0}}))
    argv = ["sweep", "--model", "ground-truth", "--prompts", "shapes", "--limit", "1", "--n", "1",
            "--reward-key", "shapes_contrast", "--targets", "0,1", "--scorers", "shapes_contrast", "--outdir", str(out)]
    assert eval_cli.main(argv) == 0, _err(capsys)
    assert (stale / "00000" / "samples" / "0000.png").is_file() and (out / "sweep.json").is_file()


# ------------------------------------------------------------------------------ 2. --device

@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "meta"])
def test_check_device_rejects_unknown_devices(name):
    with pytest.raises(ValueError, match=r"--device '.*'.*use cpu, cuda, cuda:N or mps"):
        generate_cli.check_device(name)


def test_check_device_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available.*use --device cpu"):
        generate_cli.check_device("cuda")
    assert generate_cli.check_device(None) == "cpu" and generate_cli.check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert generate_cli.check_device("cuda:1") == "cuda:1" and generate_cli.check_device(None) == "cuda"
    with pytest.raises(ValueError, match=r"--device 'cuda:2': only 2 CUDA device\(s\)"):
        generate_cli.check_device("cuda:2")


def test_bad_device_in_all_three_clis(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate_cli.main(["a red circle", "--device", "tpu", "--out", str(tmp_path / "g")]) == 2
    assert _err(capsys) == "miro generate: --device 'tpu' is not a device; use cpu, cuda, cuda:N or mps"
    assert generate_cli.main(["a red circle", "--device", "cuda", "--out", str(tmp_path / "g")]) == 2
    assert _err(capsys).startswith("miro generate: --device 'cuda': CUDA is not available")
    assert not (tmp_path / "g").exists()
    assert eval_cli.main(_eval_gen(tmp_path / "e", "--device", "tpu")) == 2
    assert _err(capsys) == "miro eval generate: --device 'tpu' is not a device; use cpu, cuda, cuda:N or mps"
    assert not (tmp_path / "e").exists()
    assert demo_server.main(["--device", "cuda:0", "--port", "0"]) == 2
    assert _err(capsys).startswith("miro demo: --device 'cuda:0': CUDA is not available")


# ----------------------------------------------------------------------------- 3. --out

def test_out_that_is_a_file_fails_before_sampling(tmp_path, capsys, no_model_load):
    f = tmp_path / "000.png"
    f.write_bytes(b"x")
    assert generate_cli.main(["x", "--steps", "1", "--n", "1", "--device", "cpu", "--out", str(f)]) == 1
    assert _err(capsys) == f"miro generate: cannot write images to --out {str(f)!r}: it is a file, not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_that_cannot_be_created(capsys, no_model_load):
    assert generate_cli.main(["x", "--steps", "1", "--n", "1", "--device", "cpu", "--out", "/proc/x"]) == 1
    assert _err(capsys).startswith("miro generate: cannot write images to --out '/proc/x': ")


def test_stale_numbered_images_of_a_larger_run_are_removed(tmp_path, capsys):
    out = tmp_path / "gen"
    base = ["x", "--model", "shapes", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert generate_cli.main(base + ["--n", "3"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "0007.png").write_bytes(b"not ours: 4 digits below 1000")
    capsys.readouterr()
    assert generate_cli.main(base + ["--n", "1"]) == 0
    assert "removed 2 image(s) left in" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "0007.png", "grid.png", "notes.txt"]
    assert generate_cli.remove_stale_samples(out, 1) == []


# ----------------------------------------------------------------------------- 4. --dtype

def test_demo_refuses_half_precision_on_cpu_at_startup(capsys, no_model_load):
    assert demo_server.main(["--device", "cpu", "--dtype", "bfloat16", "--port", "0"]) == 2
    assert _err(capsys) == "miro demo: --dtype bfloat16 needs --device cuda; on cpu use --dtype float32"


def test_generate_dtype_messages_speak_in_flags(tmp_path, capsys, no_model_load):
    argv = ["x", "--device", "cpu", "--out", str(tmp_path / "g")]
    assert generate_cli.main(argv + ["--dtype", "bfloat16"]) == 2
    assert _err(capsys) == "miro generate: --dtype bfloat16 needs --device cuda; on cpu use --dtype float32"
    assert generate_cli.main(argv + ["--dtype", "int8"]) == 2
    assert _err(capsys) == "miro generate: --dtype 'int8' is not supported; use float32, bfloat16 or float16"
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------- 5. --ns / --targets

def test_best_of_n_bad_ns_names_the_option(tmp_path, capsys):
    assert eval_cli.main(["best-of-n", str(tmp_path), "--select-by", "r", "--ns", "1,a"]) == 2
    assert _err(capsys) == ("miro eval best-of-n: --ns '1,a': 'a' is not an integer; expected comma-separated "
                            "N values, e.g. 1,2,4,8")


def test_sweep_bad_targets_name_the_option(tmp_path, capsys, no_model_load):
    argv = ["sweep", "--model", "ground-truth", "--reward-key", "shapes_contrast", "--outdir", str(tmp_path / "s")]
    assert eval_cli.main(argv + ["--targets", "a,b"]) == 2
    err = _err(capsys)
    assert err.startswith("miro eval sweep: --targets 'a,b': 'a' is not a number; expected comma-separated targets")
    assert "score, filled, trained" in err
    assert eval_cli.main(argv + ["--targets", "0,2"]) == 2  # range checked before loading too
    assert "in [0, 1]; got [0.0, 2.0]" in _err(capsys)
    assert eval_cli.main(argv + ["--targets", "0.1,0.10001,1"]) == 2  # one folder, target_0.1000, for two
    assert _err(capsys).endswith("sweep targets 0.1 and 0.10001 share the folder target_0.1000; "
                                 "targets must differ in their first 4 decimals")


# ----------------------------------------------------------------- 6. duplicate reward keys

def test_duplicate_reward_cfg_key_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="--reward-cfg 'shapes_alignment' is given twice"):
        G.parse_reward_cfg("shapes_alignment=1,shapes_alignment=2")
    assert G.parse_reward_cfg("shapes_alignment=1, shapes_counting=2") == {"shapes_alignment": 1.0,
                                                                           "shapes_counting": 2.0}


def test_duplicate_reward_key_is_refused(tmp_path, capsys, no_model_load):
    with pytest.raises(ValueError, match=r"--reward 'a' is given twice \(0.1 and 0.9\)"):
        G.parse_reward_args(["a=0.1", " a=0.9"])
    assert generate_cli.main(["x", "--device", "cpu", "--out", str(tmp_path / "g"),
                              "--negative-reward", "k=0", "--negative-reward", "k=0.5"]) == 2
    assert _err(capsys) == "miro generate: --negative-reward 'k' is given twice (0 and 0.5); give each reward once"
    assert eval_cli.main(_eval_gen(tmp_path / "e", "--reward", "k=0.1", "--reward", "k=0.2")) == 2
    assert "--reward 'k' is given twice" in _err(capsys)
    assert not (tmp_path / "e").exists()


def test_sweep_unknown_reward_key_is_named_before_the_scorers_load(tmp_path, capsys, monkeypatch):
    from miro.eval import cli

    monkeypatch.setattr(cli, "_load_scorers", lambda *a: pytest.fail("scorers loaded for a bad --reward-key"))
    assert cli.main(["sweep", "--model", "shapes", "--prompts", "shapes", "--limit", "1", "--n", "1", "--steps", "1",
                     "--reward-key", "shapes_aesthetic", "--outdir", str(tmp_path / "s")]) == 2
    assert "--reward-key 'shapes_aesthetic' is not one of the model's rewards" in capsys.readouterr().err
