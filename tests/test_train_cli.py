import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from miro.train import cli
from miro.train import preflight as pf
from tests._train_helpers import tiny_overrides, write_tiny_shards

PUBLISHED_VARIANTS = {"miro-no-synthetic-captions"} | {
    f"miro-{kind}-{r}" for kind in ("no", "only")
    for r in ("clip", "aesthetic", "hpsv2", "image-reward", "pickscore", "sciscore", "vqa")}


def test_every_experiment_composes_and_maps_variants():
    names = cli.experiments()
    assert len(names) >= 24
    variants = {}
    for name in names:
        cfg = OmegaConf.to_container(cli.compose([f"experiment={name}", "data_dir=/d"]), resolve=True)
        assert cfg["experiment_name"] == name
        assert cfg["checkpoint_dir"].endswith(f"/miro/checkpoints/{name}")
        mc = pf.model_config(cfg)
        assert mc["coherence_keys"] == cfg["rewards"]["keys"] == mc["network"]["coherence_keys"]
        assert pf.per_rank_batch(cfg) * cfg["computer"]["devices"] * cfg["computer"]["num_nodes"] == \
            cfg["data"]["global_batch_size"]
        if cfg["variant_name"]:
            variants[cfg["variant_name"]] = name
    assert PUBLISHED_VARIANTS | {"miro"} == set(variants)
    # every DataConfig field is in the composed data group, so `data.<field>=v` needs no `+`
    import dataclasses

    from miro.data.datamodule import DataConfig

    for name in names:
        data = OmegaConf.to_container(cli.compose([f"experiment={name}", "data_dir=/d"]))["data"]
        # (the rest comes from data_dir, rewards.*, seed and the batch split: miro/train/cli.build)
        from_elsewhere = {"data_dir", "reward_keys", "num_bins", "bin_ties", "bins_sample_size", "bins_path",
                          "bins_cache", "batch_size", "seed"}
        assert {f.name for f in dataclasses.fields(DataConfig)} - from_elsewhere <= set(data), name
    assert cli.compose(["experiment=shapes_miro", "data.max_corrupt_retries=5"]).data.max_corrupt_retries == 5
    rel = OmegaConf.to_container(cli.compose(["experiment=multi_cad_synth"]), resolve=True)
    assert len(rel["rewards"]["keys"]) == 7 and rel["data"]["synthetic_caption_rate"] == 0.5
    assert rel["data"]["global_batch_size"] == 1024 and rel["trainer"]["max_steps"] == 500_000
    assert (rel["computer"]["num_nodes"], rel["computer"]["devices"]) == (2, 8)
    assert rel["position_init"] == "published" and rel["ema_warmup"] is False  # the release recipe as published
    # the root config's recipe numbers (fact sheet: CAD cad_256 / lamb.yaml, FixNANinGrad; MIRO EMA and bins)
    assert rel["ema_decays"] == [0.9999] and rel["rewards"]["num_bins"] == 64
    assert rel["loss"]["self_cond_rate"] == 0.9 and rel["trainer"]["gradient_clip_val"] == 2.0
    assert rel["nonfinite"]["max_consecutive"] == 5
    assert (rel["optimizer"]["lr"], rel["optimizer"]["betas"], rel["optimizer"]["eps"]) == (1e-3, [0.9, 0.999], 1e-8)
    assert (rel["optimizer"]["weight_decay"], rel["optimizer"]["decouple"]) == (0.01, False)
    assert (rel["scheduler"]["warmup_steps"], rel["scheduler"]["total_steps"], rel["scheduler"]["rate"]) == \
        (50_000, 500_000, 0.8)
    for name in ("shapes_miro", "shapes_baseline", "shapes_only_counting"):
        shp = OmegaConf.to_container(cli.compose([f"experiment={name}"]), resolve=True)
        assert shp["position_init"] == "sincos" and shp["ema_warmup"] is True
    no_clip = OmegaConf.to_container(cli.compose(["experiment=no_clip"]), resolve=True)
    assert "clip_score" not in no_clip["rewards"]["keys"] and len(no_clip["rewards"]["keys"]) == 6
    assert OmegaConf.to_container(cli.compose(["experiment=multi_cad"]))["data"]["synthetic_caption_rate"] == 0.0
    # the paper's original-caption rows: the specialists and its "Baseline"
    for name in ("only_clip", "only_vqa", "baseline_cad"):
        c = OmegaConf.to_container(cli.compose([f"experiment={name}"]), resolve=True)
        assert c["data"]["synthetic_caption_rate"] == 0.0 and c["data"]["global_batch_size"] == 1024, name
    base = OmegaConf.to_container(cli.compose(["experiment=baseline_cad"]), resolve=True)
    assert base["rewards"]["uninformative"] is True and base["variant_name"] is None


@pytest.mark.parametrize("exp, computer, accum, per_rank", [
    ("multi_cad_synth", "slurm_2x8", 1, 64),   # the release: 16 GPUs x 64
    ("multi_cad_synth", "gpu8", 2, 64),        # the published fallback: 8 GPUs, accumulation 2
    ("multi_cad_synth", "gpu1", 16, 64),
    ("only_clip", "gpu8", 2, 64),
    ("shapes_miro", "gpu1", 1, 64),            # no micro-batch: the whole share in one forward
    ("shapes_miro", "gpu8", 1, 8),
])
def test_accumulation_follows_the_micro_batch(exp, computer, accum, per_rank):
    cfg = OmegaConf.to_container(cli.compose([f"experiment={exp}", f"computer={computer}"]), resolve=True)
    assert (pf.accumulation(cfg), pf.per_rank_batch(cfg)) == (accum, per_rank)
    ranks = cfg["computer"]["devices"] * cfg["computer"]["num_nodes"]
    assert accum * per_rank * ranks == cfg["data"]["global_batch_size"]


def test_explicit_accumulation_wins_and_a_bad_micro_batch_is_named():
    cfg = OmegaConf.to_container(cli.compose(["experiment=multi_cad_synth", "computer=gpu1",
                                              "trainer.accumulate_grad_batches=4"]), resolve=True)
    assert (pf.accumulation(cfg), pf.per_rank_batch(cfg)) == (4, 256)
    cfg = OmegaConf.to_container(cli.compose(["experiment=multi_cad_synth", "computer=gpu1",
                                              "trainer.micro_batch_size=48"]), resolve=True)
    with pytest.raises(ValueError, match=r"global_batch_size=1024 over 1 device\(s\) does not split into "
                                         r"micro-batches of trainer.micro_batch_size=48"):
        pf.accumulation(cfg)
    cfg["trainer"]["micro_batch_size"] = 0
    with pytest.raises(ValueError, match="trainer.micro_batch_size=0"):
        pf.accumulation(cfg)


def test_seed_keys_override_and_batch_check():
    cfg = OmegaConf.to_container(cli.compose([
        "experiment=multi_cad_synth", "computer=gpu8", "computer.devices=4", "computer.num_nodes=2",
        "computer.precision=bf16-mixed", "data_dir=/data", "experiment_name=x", "root_dir=/r"]), resolve=True)
    assert cfg["checkpoint_dir"] == "/r/miro/checkpoints/x" and cfg["data_dir"] == "/data"
    assert pf.accumulation(cfg) == 2 and pf.per_rank_batch(cfg) == 1024 // 8 // 2  # micro-batches of 64
    cfg["data"]["global_batch_size"] = 1001
    with pytest.raises(ValueError, match="not divisible"):
        pf.per_rank_batch(cfg)


def test_help_and_dotenv(tmp_path, capsys, monkeypatch):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "multi_cad_synth  [miro]" in out and "[miro-only-vqa]" in out
    assert cli.main(["experiment=nope"]) == 2
    assert "experiment=nope: no such config; choose from " in capsys.readouterr().err
    assert cli.main(["experiment=shapes_miro", f"data_dir={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    env = tmp_path / ".env"
    env.write_text("# site\nMIRO_TEST_A=1\nexport MIRO_TEST_B='two'\n")
    monkeypatch.delenv("MIRO_TEST_A", raising=False)
    monkeypatch.setenv("MIRO_TEST_B", "kept")
    from miro.io import load_dotenv  # `miro` reads .env once for every command (miro/cli.py)

    assert load_dotenv(env) == {"MIRO_TEST_A": "1"}
    import os

    assert os.environ["MIRO_TEST_B"] == "kept"
    monkeypatch.delenv("MIRO_TEST_A")


def _trained_overrides(data, root):
    return tiny_overrides(data, root, steps=2, every=2, extra=[
        "scheduler.warmup_steps=1", "image_logger.enabled=true", "image_logger.every_n_steps=2",
        "image_logger.num_steps=2", "image_logger.max_prompts=4", "image_logger.score_rewards=[shapes_alignment]",
        "logger=csv", "rewards.ties=spread"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    n = torch.get_num_threads()
    root = tmp_path_factory.mktemp("run")
    data = write_tiny_shards(root / "data")
    cfg = OmegaConf.to_container(cli.compose(_trained_overrides(data, root)), resolve=True)
    module, dm, trainer, _ = cli.build(cfg)
    trainer.fit(module, datamodule=dm)
    torch.set_num_threads(n)
    return root / "miro" / "checkpoints" / "shapes_miro", module


def test_a_resumed_run_takes_the_empty_prompt_embedding_from_its_checkpoint(trained, monkeypatch):
    # computing it would load the text encoder (FLAN-T5-XL at full scale) only to be overwritten
    ckpt_dir, module = trained
    root = ckpt_dir.parents[2]
    cfg = OmegaConf.to_container(cli.compose(_trained_overrides(root / "data", root)), resolve=True)

    def no_encoding(self):
        raise AssertionError("the text encoder was asked for the empty prompt on resume")

    from miro.encoders.text import HFTextEncoder, TextEncoder

    for cls in (TextEncoder, HFTextEncoder):
        monkeypatch.setattr(cls, "uncond_embedding", no_encoding)
    resumed, _, _, ckpt = cli.build(cfg, with_trainer=False)
    assert Path(ckpt) == ckpt_dir / "last.ckpt"
    torch.testing.assert_close(resumed.uncond_embedding, module.uncond_embedding, rtol=0, atol=0)
    assert resumed._text_encoder.model is None


def test_image_grid_written(trained):
    ckdir, _ = trained
    grids = sorted((ckdir / "images").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_00000002.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (2 * 8, 2 * 8)  # 4 prompts of 8x8 in a 2x2 grid
    import csv

    rows = list(csv.DictReader(open(next((ckdir / "logs").glob("version_*/metrics.csv")))))
    scored = [r for r in rows if r.get("testbed/shapes_alignment")]
    assert len(scored) == 1 and 0.0 <= float(scored[0]["testbed/shapes_alignment"]) <= 1.0


def test_tensorboard_logger_gets_the_loss_and_the_testbed_grid(tmp_path):
    # CSV takes numbers only: TensorBoard is where the image logger's grid reaches the logger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    n = torch.get_num_threads()
    data = write_tiny_shards(tmp_path / "data")
    overrides = [o if o != "logger=csv" else "logger=tensorboard" for o in _trained_overrides(data, tmp_path)]
    module, dm, trainer, _ = cli.build(OmegaConf.to_container(cli.compose(overrides), resolve=True))
    trainer.fit(module, datamodule=dm)
    torch.set_num_threads(n)
    ckdir = tmp_path / "miro" / "checkpoints" / "shapes_miro"
    acc = EventAccumulator(str(ckdir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Images("testbed")] == [2]
    shown = acc.Images("testbed")[0]
    from PIL import Image

    png = Image.open(io.BytesIO(shown.encoded_image_string))
    disk = Image.open(ckdir / "images" / "step_00000002.png")
    assert (shown.width, shown.height) == disk.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(disk.convert("RGB")))
    tags = acc.Tags()["scalars"]
    assert "testbed/shapes_alignment" in tags
    assert [e.step for e in acc.Scalars("testbed/shapes_alignment")] == [2]
    assert any(t.startswith("train/loss") for t in tags), tags


def test_convert_load_generate(trained, tmp_path, monkeypatch):
    from miro import MiroPipeline
    from miro.train.convert import convert, load_checkpoint, main

    ckdir, module = trained
    ck = load_checkpoint(ckdir / "last.ckpt")  # weights_only=True
    assert isinstance(ck["hyper_parameters"]["model_config"], dict)
    torch.manual_seed(7)
    out = convert(ckdir / "last.ckpt", tmp_path / "pipe", variant_name="miro-only-shapes")
    # building the model draws no random init (the weights replace it): the caller's RNG is untouched
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert out == tmp_path / "pipe" / "miro-only-shapes"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "uncond_embedding.npy",
                                                "reward_bins.json"}
    bins = json.loads((out / "reward_bins.json").read_text())
    assert bins["num_bins"] == 64 and len(bins["edges"]["shapes_alignment"]) == 65
    assert bins["ties"] == "spread"  # the run's tie rule travels with the edges
    pipe = MiroPipeline.from_pretrained(str(out))
    assert pipe.reward_bins.ties == "spread"
    ema = module.ema_model()
    for k, v in ema.state_dict().items():  # exported weights are the EMA weights
        torch.testing.assert_close(pipe.model.state_dict()[k], v, msg=k)
    assert not torch.equal(pipe.model.network.latents, module.model.network.latents)
    np.testing.assert_allclose(np.load(out / "uncond_embedding.npy"), module.uncond_embedding.numpy())
    img = pipe("a photo of a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 8, 8, 3) and img.dtype == np.uint8
    assert main([str(ckdir / "last.ckpt"), str(tmp_path / "raw"), "--raw"]) == 0
    raw = MiroPipeline.from_pretrained(str(tmp_path / "raw"))
    torch.testing.assert_close(raw.model.network.latents, module.model.network.latents)
    with pytest.raises(ValueError, match="does not exist"):
        convert(tmp_path / "nope.ckpt", tmp_path / "x")
    # --dtype float16: half the bytes, the EMA weights rounded to fp16 and read back as float32
    assert main([str(ckdir / "last.ckpt"), str(tmp_path / "half"), "--dtype", "float16"]) == 0
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    half = MiroPipeline.from_pretrained(str(tmp_path / "half")).model.state_dict()
    for k, v in ema.state_dict().items():
        got = half[k]
        assert got.dtype == v.dtype, k
        torch.testing.assert_close(got, v.half().float() if v.is_floating_point() else v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        pipe.save_pretrained(tmp_path / "bad", dtype="int8")
    # --push-to-hub uploads what --dtype stores (float32 was uploaded whatever --dtype said)
    pushed = []
    monkeypatch.setattr(MiroPipeline, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, kw)) or "url")
    assert main([str(ckdir / "last.ckpt"), str(tmp_path / "half2"), "--dtype", "float16", "--push-to-hub", "me/m"]) == 0
    assert pushed == [("me/m", {"variant": None, "dtype": "float16"})]


def test_testbeds_and_precompute(tmp_path):
    from miro.shapes.captions import parse_caption
    from miro.train.testbed import load_testbed, main, read_testbed

    real = read_testbed("real")
    assert len(real) == 80 and len({p for _, p in real}) == 80
    shapes = read_testbed("shapes")
    for _, p in shapes:
        parse_caption(p)  # every Shapes testbed prompt is in the Shapes grammar
    sub = tmp_path / "tb"
    sub.mkdir()
    (sub / "prompts.txt").write_text("a photo of a red circle\na photo of two blue squares\n")
    assert main(["precompute", "--testbed", str(sub), "--encoder", "minilm", "--out", str(tmp_path / "emb")]) == 0
    prompts, embs = load_testbed(sub, tmp_path / "emb", "minilm")
    assert prompts[1] == "a photo of two blue squares"
    assert embs[0].dtype == np.float16 and embs[0].shape[1] == 384 and embs[1].shape[0] > embs[0].shape[0] - 1
    assert (tmp_path / "emb" / "uncond.minilm_embeddings.npy").exists()
    with pytest.raises(ValueError, match="neither a built-in"):
        read_testbed("nope")


def test_release_recipe_path_with_latents_and_t5(tmp_path):
    """The full-scale path (SDXL-style latents sampled from mean/std, FLAN-T5 embeddings from the
    shards, LAMB, 7 rewards) with tiny random models saved in their real formats."""
    from PIL import Image

    from miro import REWARD_KEYS
    from miro.data import schema
    from miro.encoders.tiny import save_tiny_autoencoder_kl, save_tiny_t5
    from miro.train.convert import pipeline_from_checkpoint

    t5 = save_tiny_t5(tmp_path / "t5")
    vae = save_tiny_autoencoder_kl(tmp_path / "vae")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        meta = {"synthetic_caption": "two red circles"}
        for k in REWARD_KEYS:
            meta[k] = float(rng.normal())
            meta["synthetic_" + k] = float(rng.normal())
        samples.append({"__key__": f"s{i:03d}", "jpg": Image.new("RGB", (8, 8)), "txt": "a red circle", "json": meta,
                        "vae_embeddings_mean_256.npy": rng.standard_normal((4, 4, 4)).astype(np.float16),
                        "vae_embeddings_std_256.npy": np.full((4, 4, 4), 0.1, np.float16),
                        "flan_t5_xl_embeddings.npy": rng.standard_normal((3, 32)).astype(np.float16),
                        "synthetic_flan_t5_xl_embeddings.npy": rng.standard_normal((4, 32)).astype(np.float16)})
    schema.write_shard(tmp_path / "data" / "shard-0.tar", samples)
    net = ("{data_size: 4, data_dim: 32, num_latents: 8, latents_dim: 32, label_dim: 32, num_blocks: 1, "
           "num_processing_layers: 1, read_write_heads: 2, compute_heads: 2, num_text_registers: 2}")
    ov = ["experiment=multi_cad_synth", "computer=cpu", "computer.threads=1", f"data_dir={tmp_path / 'data'}",
          f"root_dir={tmp_path / 'run'}", "data.global_batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
          "scheduler.warmup_steps=1", "checkpoint.every_n_steps=2", "image_logger.enabled=false", "logger=none",
          "trainer.progress_bar=false",
          f"++model.overrides={{network: {net}, preconditioning: {{num_latents: 8, latents_dim: 32}}, "
          f"data_resolution: 4, text_encoder: '{t5}'}}"]
    n = torch.get_num_threads()
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    module, dm, trainer, _ = cli.build(cfg)
    assert module.model.vae_sample and dm.cfg.text_source == "precomputed"
    # the encoder made the empty prompt's embedding and is let go: nothing in training uses it
    assert module._text_encoder is None and module.uncond_embedding.shape[-1] == 32
    from miro.train.optim import Lamb

    assert isinstance(module.configure_optimizers()["optimizer"], Lamb)
    trainer.fit(module, datamodule=dm)
    torch.set_num_threads(n)
    assert trainer.global_step == 2
    ckpt = tmp_path / "run" / "miro" / "checkpoints" / "multi_cad_synth" / "last.ckpt"
    pipe = pipeline_from_checkpoint(ckpt, autoencoder=str(vae))
    assert pipe.checkpoint_meta["samples_seen_global"] == 2 * 4  # the training's metadata, read with the weights
    assert pipe.coherence_keys == tuple(REWARD_KEYS) and set(pipe.reward_bins.edges) == set(REWARD_KEYS)
    img = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 8, 8, 3)  # 4x4 latents decoded by the x2 tiny VAE


def test_gradient_clipping_and_nonfinite_guard_reach_the_trainer(tmp_path):
    """``trainer.gradient_clip_val`` (clipping by norm, the recipe's 2.0 by default) and
    ``nonfinite.max_consecutive`` (5) are the ones the Lightning trainer runs with."""
    from miro.train.callbacks import NonFiniteGuard

    data = write_tiny_shards(tmp_path / "data")
    for extra, clip, most in (((), 2.0, 5), (("trainer.gradient_clip_val=1.5", "nonfinite.max_consecutive=3"), 1.5, 3)):
        ov = tiny_overrides(data, tmp_path / "run", extra=list(extra))
        _, _, trainer, _ = cli.build(OmegaConf.to_container(cli.compose(ov), resolve=True))
        assert trainer.gradient_clip_val == clip and trainer.gradient_clip_algorithm in (None, "norm")  # None: norm
        assert [c.max_consecutive for c in trainer.callbacks if isinstance(c, NonFiniteGuard)] == [most]


def test_the_empty_prompt_embedding_comes_from_a_file_without_loading_the_encoder(tmp_path):
    """At full scale the training job should not hold FLAN-T5-XL: with precomputed text, the
    empty prompt's embedding is read from ``text_uncond`` (or the testbed's uncond file)."""
    data = write_tiny_shards(tmp_path / "data")
    uncond = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float16)
    np.save(tmp_path / "uncond.npy", uncond)
    ov = tiny_overrides(data, tmp_path / "run", extra=["data.text_source=precomputed",
                                                       f"text_uncond={tmp_path / 'uncond.npy'}"])
    module, dm, trainer, _ = cli.build(OmegaConf.to_container(cli.compose(ov), resolve=True))
    torch.testing.assert_close(module.uncond_embedding, torch.from_numpy(uncond).float(), rtol=0, atol=0)
    assert module._text_encoder is None  # never loaded, and not kept: precomputed text needs none
    # the testbed's precomputed folder is the fallback source
    from miro.train.testbed import main as testbed_main

    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "prompts.txt").write_text("a photo of a red circle\n")
    assert testbed_main(["precompute", "--testbed", str(tmp_path / "tb"), "--encoder", "minilm",
                         "--out", str(tmp_path / "emb")]) == 0
    cfg = OmegaConf.to_container(cli.compose(tiny_overrides(data, tmp_path / "run2", extra=[
        f"image_logger.embeddings_dir={tmp_path / 'emb'}"])), resolve=True)
    assert pf.uncond_source(cfg) == tmp_path / "emb" / "uncond.minilm_embeddings.npy"
    # a missing file, or one of another text width, is named
    with pytest.raises(ValueError, match=r"text_uncond=.*missing.npy is not a file"):
        pf.preflight(OmegaConf.to_container(cli.compose(tiny_overrides(data, tmp_path / "run3", extra=[
            f"text_uncond={tmp_path / 'missing.npy'}"])), resolve=True))
    np.save(tmp_path / "wide.npy", np.zeros((2, 512), np.float16))
    with pytest.raises(ValueError, match=r"wide.npy holds an array of shape \(2, 512\); .* \(tokens, 384\)"):
        pf.preflight(OmegaConf.to_container(cli.compose(tiny_overrides(data, tmp_path / "run4", extra=[
            f"text_uncond={tmp_path / 'wide.npy'}"])), resolve=True))


def test_write_sbatch_asks_slurm_for_the_computer_and_reruns_the_command(tmp_path, capsys, monkeypatch):
    import shlex
    import subprocess

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIRO_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("MIRO_SLURM_TIME", "20:00:00")
    monkeypatch.setenv("MIRO_SLURM_MEM", "0")
    monkeypatch.delenv("MIRO_SLURM_ACCOUNT", raising=False)
    ov = ["experiment=multi_cad_synth", f"root_dir={tmp_path / 'runs'}", f"data_dir={tmp_path}",
          "experiment_name=my run", "optimizer.lr=2e-4"]
    assert cli.main(ov + ["--write-sbatch", "train.sbatch"]) == 0
    assert "submit with: sbatch train.sbatch" in capsys.readouterr().out
    text = (tmp_path / "train.sbatch").read_text()
    lines = text.splitlines()
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=9",  # the release data's 8 loader workers and the rank
                 "#SBATCH --partition=gpu", "#SBATCH --time=20:00:00", "#SBATCH --mem=0", "#SBATCH --job-name=miro-my_run",
                 f"#SBATCH --output={tmp_path / 'runs'}/miro/logs/%x-%j.out"):
        assert want in lines, want
    assert not any(ln.startswith("#SBATCH --account") for ln in lines)
    assert any(ln.startswith("export SRUN_CPUS_PER_TASK=9 ") for ln in lines)  # srun: the same
    assert (tmp_path / "runs" / "miro" / "logs").is_dir()  # Slurm does not create it
    srun = shlex.split(lines[-1])
    assert srun[0] == "srun" and srun[2] == "train" and srun[3:] == ov + ["trainer.progress_bar=false"]
    assert subprocess.run(["bash", "-n", str(tmp_path / "train.sbatch")]).returncode == 0
    # a relative root_dir (the default '.') gives an absolute log path: Slurm resolves --output
    # against the folder sbatch runs in, not the one the job cd's to
    assert cli.main([ov[0], "root_dir=rel", *ov[2:], "--write-sbatch", "rel.sbatch"]) == 0
    out = [ln for ln in (tmp_path / "rel.sbatch").read_text().splitlines() if ln.startswith("#SBATCH --output=")]
    assert out == [f"#SBATCH --output={tmp_path.resolve() / 'rel'}/miro/logs/%x-%j.out"]
    assert (tmp_path / "rel" / "miro" / "logs").is_dir()
    # a value that would break out of its #SBATCH line is refused, and nothing is written
    monkeypatch.setenv("MIRO_SLURM_ACCOUNT", "acct\nrm -rf /")
    assert cli.main(ov + ["--write-sbatch", "bad.sbatch"]) == 2
    assert "MIRO_SLURM_ACCOUNT='acct\\nrm -rf /' is not a plain Slurm value" in capsys.readouterr().err
    assert not (tmp_path / "bad.sbatch").exists()


def test_sweeps_are_one_command_per_value(capsys):
    """Hydra's comma sweep and -m/--multirun: refused in one line that says how to sweep, since every
    job of a multirun would share one checkpoint folder (the second resuming the first)."""
    for argv in (["-m", "experiment=shapes_miro"], ["--multirun", "experiment=shapes_miro"]):
        assert cli.main(argv + ["--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("miro train: error: -m/--multirun is not supported") and "experiment_name=NAME" in err
    assert cli.main(["experiment=shapes_miro", "optimizer.lr=1e-4,2e-4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Ambiguous value" in err and "--multirun" not in err
    assert "one command per value, each with its own experiment_name=NAME" in err
