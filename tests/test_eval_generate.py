"""GenEval folder layout, seeds, resume and batch-size invariance of `miro eval generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from miro.eval import generate as G
from miro.eval.prompts import PromptItem


class StandInPipeline:
    """Same call and noise interface as MiroPipeline; image = f(prompt, noise row, targets)."""

    coherence_keys = ("r",)

    def __init__(self):
        self.calls = []

    def prepare_noise(self, batch_size, generator):
        if isinstance(generator, list):  # MiroPipeline's rule: row k drawn as a batch of one
            return torch.cat([self.prepare_noise(1, g) for g in generator])
        return torch.randn((batch_size, 3, 8, 8), generator=generator)

    def __call__(self, prompt, reward_targets=None, negative_reward_targets=None, num_inference_steps=50,
                 guidance_scale=7.0, num_images_per_prompt=1, generator=None, output_type="pil"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(len(prompts))
        noise = self.prepare_noise(len(prompts) * num_images_per_prompt, generator)
        t = (reward_targets or {}).get("r", 1.0)
        out = []
        for p, z in zip(prompts, noise):
            base = (sum(p.encode()) % 97) / 97.0
            arr = ((0.5 * base + 0.3 * t + 0.1 * z).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
            out.append(Image.fromarray(arr))
        return out


def _items(n=3):
    return [PromptItem(f"prompt number {i}", {"tag": "t" if i % 2 else "u"}) for i in range(n)]


def _pixels(path):
    return np.asarray(Image.open(path))


def test_layout_seeds_and_metadata(tmp_path):
    items = _items(3)
    cfg = G.GenerateConfig(n_samples=2, steps=3, seed=7, batch_size=4)
    counts = G.generate_folder(StandInPipeline(), items, tmp_path, cfg, progress=False)
    assert counts == {"prompts": 3, "images": 6, "generated": 6, "skipped": 0}
    for i in range(3):
        meta = json.loads((tmp_path / f"{i:05d}" / "metadata.jsonl").read_text())
        assert meta == {"tag": items[i].metadata["tag"], "prompt": items[i].prompt}
        assert sorted(p.name for p in (tmp_path / f"{i:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    # sample j of prompt i is the image of seed + 1000 i + j alone
    ref = StandInPipeline()([items[2].prompt], generator=[torch.Generator().manual_seed(7 + 1000 * 2 + 1)])[0]
    assert np.array_equal(_pixels(tmp_path / "00002" / "samples" / "0001.png"), np.asarray(ref))
    assert not list(tmp_path.rglob("*.tmp"))
    run = json.loads((tmp_path / "generation.json").read_text())
    assert run["config"]["seed"] == 7 and "batch_size" not in run["config"]
    assert run["reward_keys"] == ["r"]


def test_resume_equals_uninterrupted_and_batch_size_is_irrelevant(tmp_path):
    items = _items(4)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    G.generate_folder(StandInPipeline(), items, full, G.GenerateConfig(n_samples=3, batch_size=5), progress=False)
    G.generate_folder(StandInPipeline(), items, resumed, G.GenerateConfig(n_samples=3, batch_size=2), progress=False)
    # simulate a kill: drop two samples and one whole prompt folder's samples
    (resumed / "00001" / "samples" / "0002.png").unlink()
    for p in (resumed / "00003" / "samples").iterdir():
        p.unlink()
    pipe = StandInPipeline()
    counts = G.generate_folder(pipe, items, resumed, G.GenerateConfig(n_samples=3, batch_size=3), progress=False)
    assert counts["generated"] == 4 and counts["skipped"] == 8 and sum(pipe.calls) == 4
    for p in sorted(full.rglob("*.png")):
        assert np.array_equal(_pixels(p), _pixels(resumed / p.relative_to(full))), p
    # a complete folder is skipped entirely
    pipe = StandInPipeline()
    assert G.generate_folder(pipe, items, resumed, G.GenerateConfig(n_samples=3), progress=False)["generated"] == 0
    assert pipe.calls == []


def test_empty_or_cut_pngs_are_generated_again_with_their_seeds(tmp_path):
    items = _items(2)
    full, damaged = tmp_path / "full", tmp_path / "damaged"
    for d in (full, damaged):
        G.generate_folder(StandInPipeline(), items, d, G.GenerateConfig(n_samples=2), progress=False)
    (damaged / "00000" / "samples" / "0001.png").write_bytes(b"")  # a copy that never started
    cut = damaged / "00001" / "samples" / "0000.png"
    cut.write_bytes(cut.read_bytes()[:-30])  # a copy stopped midway
    pipe = StandInPipeline()
    with pytest.warns(UserWarning, match="2 sample PNG\\(s\\) under .* are empty or cut"):
        counts = G.generate_folder(pipe, items, damaged, G.GenerateConfig(n_samples=2), progress=False)
    assert counts["generated"] == 2 and counts["skipped"] == 2 and sum(pipe.calls) == 2
    for p in sorted(full.rglob("*.png")):
        assert np.array_equal(_pixels(p), _pixels(damaged / p.relative_to(full))), p


def test_targets_reach_the_pipeline(tmp_path):
    pipe = StandInPipeline()
    cfg = G.GenerateConfig(n_samples=1, reward_targets={"r": 0.0})
    G.generate_folder(pipe, _items(1), tmp_path / "a", cfg, progress=False)
    G.generate_folder(pipe, _items(1), tmp_path / "b", G.GenerateConfig(n_samples=1), progress=False)
    a, b = _pixels(tmp_path / "a/00000/samples/0000.png"), _pixels(tmp_path / "b/00000/samples/0000.png")
    assert a.mean() < b.mean()


def test_refuses_to_mix_settings_or_prompts(tmp_path):
    G.generate_folder(StandInPipeline(), _items(2), tmp_path, G.GenerateConfig(n_samples=1, cfg=7.0), progress=False)
    with pytest.raises(ValueError, match="cfg: 7.0 -> 3.0"):
        G.generate_folder(StandInPipeline(), _items(2), tmp_path, G.GenerateConfig(n_samples=1, cfg=3.0), progress=False)
    other = [PromptItem("something else", {"tag": "u"}), *_items(2)[1:]]
    record = (tmp_path / "generation.json").read_bytes()
    with pytest.raises(ValueError, match="holds another prompt"):
        G.generate_folder(StandInPipeline(), other, tmp_path, G.GenerateConfig(n_samples=1), progress=False,
                          prompts_spec="other.txt")
    # a refused run leaves the run record as it was (it describes the images there, not the refused run)
    assert (tmp_path / "generation.json").read_bytes() == record
    more = [*_items(2), PromptItem("a third prompt", {"tag": "u"}), PromptItem("something else", {"tag": "u"})]
    more[1] = PromptItem("changed", {"tag": "t"})
    with pytest.raises(ValueError, match="holds another prompt"):
        G.generate_folder(StandInPipeline(), more, tmp_path, G.GenerateConfig(n_samples=1), progress=False)
    assert (tmp_path / "generation.json").read_bytes() == record and not (tmp_path / "00002").exists()


def test_reward_cfg_reaches_only_pipelines_that_are_asked(tmp_path):
    """reward_cfg=None calls the pipeline without the keyword (any diffusers-like pipeline works, and
    folders written before the option resume); set, it is passed on and recorded."""

    class TwoScale(StandInPipeline):
        def __call__(self, *a, reward_guidance_scale=None, reward_direction=None, **k):
            self.scales.append((reward_guidance_scale, reward_direction))
            return super().__call__(*a, **k)

    G.generate_folder(StandInPipeline(), _items(1), tmp_path / "a", G.GenerateConfig(n_samples=1), progress=False)
    run = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert "reward_cfg" not in run["config"]  # one scale: the folder's identity is as before the option
    (tmp_path / "a" / "00000" / "samples" / "0000.png").unlink()
    assert G.generate_folder(StandInPipeline(), _items(1), tmp_path / "a", G.GenerateConfig(n_samples=1),
                             progress=False)["generated"] == 1
    pipe = TwoScale()
    pipe.scales = []
    G.generate_folder(pipe, _items(2), tmp_path / "b", G.GenerateConfig(n_samples=1, reward_cfg=12.0), progress=False)
    assert pipe.scales == [(12.0, "prompt")]
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["config"]["reward_direction"] == "prompt"
    with pytest.raises(ValueError, match="reward_cfg: 12.0 -> None"):
        G.generate_folder(pipe, _items(2), tmp_path / "b", G.GenerateConfig(n_samples=1), progress=False)
    with pytest.raises(ValueError, match="reward_direction: 'prompt' -> 'null'"):
        G.generate_folder(pipe, _items(2), tmp_path / "b", G.GenerateConfig(n_samples=1, reward_cfg=12.0,
                                                                            reward_direction="null"), progress=False)
    with pytest.raises(ValueError, match="reward_direction must be 'prompt' or 'null'; got 'x'"):
        G.GenerateConfig(reward_direction="x")
    with pytest.raises(ValueError, match="reward_cfg must be a finite number >= 0 or None; got -1"):
        G.GenerateConfig(reward_cfg=-1.0)
    # one scale per reward: passed on as a mapping, recorded, and a changed mapping refused
    pipe.scales = []
    per = {"aesthetic_score": 9.0, "clip_score": 0.0}
    G.generate_folder(pipe, _items(2), tmp_path / "c", G.GenerateConfig(n_samples=1, reward_cfg=per), progress=False)
    assert pipe.scales == [(per, "prompt")]
    assert json.loads((tmp_path / "c" / "generation.json").read_text())["config"]["reward_cfg"] == per
    with pytest.raises(ValueError, match="reward_cfg: .*'clip_score': 0.0.* -> .*'clip_score': 1.0"):
        G.generate_folder(pipe, _items(2), tmp_path / "c",
                          G.GenerateConfig(n_samples=1, reward_cfg={**per, "clip_score": 1.0}), progress=False)
    with pytest.raises(ValueError, match=r"reward_cfg\['clip_score'\] must be a finite number >= 0 or None; got nan"):
        G.GenerateConfig(reward_cfg={"clip_score": float("nan")})


def test_parse_reward_cfg():
    import argparse

    assert G.parse_reward_cfg(" 7.5 ") == 7.5
    assert G.parse_reward_cfg("clip_score=15, aesthetic_score=0,") == {"clip_score": 15.0, "aesthetic_score": 0.0}
    with pytest.raises(argparse.ArgumentTypeError, match="'high': expected a number"):
        G.parse_reward_cfg("high")
    with pytest.raises(argparse.ArgumentTypeError, match="--reward-cfg 'clip_score=x': value 'x' is not a number"):
        G.parse_reward_cfg("clip_score=x")


def test_config_and_reward_argument_validation():
    assert G.parse_reward_args(["aesthetic_score=0.5", "clip_score=1"]) == {"aesthetic_score": 0.5, "clip_score": 1.0}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        G.parse_reward_args(["aesthetic_score"])
    with pytest.raises(ValueError, match="not a number"):
        G.parse_reward_args(["aesthetic_score=high"])
    with pytest.raises(ValueError, match="outside"):
        G.GenerateConfig(reward_targets={"a": 1.5})
    with pytest.raises(ValueError, match="n_samples"):
        G.GenerateConfig(n_samples=1001)
    assert G.sample_seed(3, 2, 5) == 2008


def test_real_tiny_pipeline_images_do_not_depend_on_batch_size(tmp_path):
    from miro.encoders.tiny import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "enc")
    items = [PromptItem("a red circle", {"tag": "t"}), PromptItem("a red circle", {"tag": "t"})]
    for bs in (1, 2):
        G.generate_folder(pipe, items, tmp_path / f"bs{bs}", G.GenerateConfig(n_samples=1, steps=1, batch_size=bs),
                          progress=False)
    for p in sorted((tmp_path / "bs1").rglob("*.png")):
        a, b = _pixels(p).astype(int), _pixels(tmp_path / "bs2" / p.relative_to(tmp_path / "bs1")).astype(int)
        assert np.abs(a - b).max() <= 1, p  # same noise; batched matmuls may round one level apart
    # same prompt, different seeds (1000 apart): different images
    assert not np.array_equal(_pixels(tmp_path / "bs1/00000/samples/0000.png"), _pixels(tmp_path / "bs1/00001/samples/0000.png"))
