"""Alignment data readers, the flux-lora data order and the exported weights (audit fixes)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from miro.align.datasets import read_items


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"caption": "a"}\n\n{"caption": "b",}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:3: not a JSON object \(Expecting property name"):
        read_items(path)
    path.write_text('{"caption": "a"}\n["b"]\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:2: a dataset item must be a JSON object; got list"):
        read_items(path)
    path.write_text('{"caption": "a"}\n{"caption": " "}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:2: dataset item has no caption"):
        read_items(path)


def test_a_caption_column_missing_from_a_jsonl_row_is_named(tmp_path):
    # the row's own caption was replaced by None and the error showed {'caption': None}
    path = tmp_path / "items.jsonl"
    path.write_text('{"prompt": "a red circle"}\n{"caption": "two squares", "text2": "b"}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:2: row has no column 'prompt'; columns are \['caption', 'text2'\]"):
        read_items(path, caption_column="prompt")
    path.write_text('{"prompt": "a red circle", "caption": "x"}\n')
    assert read_items(path, caption_column="prompt")[0]["caption"] == "a red circle"


def test_merged_lora_of_a_bfloat16_model_keeps_the_update_in_float32():
    # The merge summed in the base dtype: with target.dtype=bfloat16 a quarter of the entries lost
    # their update at lora_B std 1e-3 (below half a bf16 step of the weight). The merged weight is
    # float32 (the exported pipeline stores float32) and matches a float64 merge.
    from torch import nn

    from miro.align.lora import LoraSettings, add_miro_lora, merge_lora_state_dict
    from miro.align.precision import cast_trainable_params

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(64, 64)

    torch.manual_seed(0)
    m = M().to(torch.bfloat16)
    add_miro_lora(m, LoraSettings(rank=4, target_modules=["q"]))
    cast_trainable_params(m)
    with torch.no_grad():
        m.q.lora_B["default"].weight.normal_(0, 1e-3)
    lora = m.q
    base = lora.base_layer.weight.double()
    delta = (lora.lora_B["default"].weight.double() @ lora.lora_A["default"].weight.double()) * lora.scaling["default"]
    merged = merge_lora_state_dict(m)
    assert merged["q.weight"].dtype == torch.float32 and merged["q.bias"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["q.weight"].double(), base + delta, rtol=0, atol=1e-6)
    assert ((merged["q.weight"].double() - base).abs() > 0).float().mean() == 1.0  # no update rounded away


@pytest.mark.parametrize("n, bs, accum, world", [(5, 2, 1, 1), (7, 3, 2, 2), (4, 4, 1, 1), (3, 2, 3, 1)])
def test_flux_lora_sees_every_item_once_per_epoch(n, bs, accum, world):
    # The epoch came from a micro-batch's first sample while its later samples wrapped inside the
    # old permutation (5 items, batch 2, 5 steps: item 4 seen once, item 3 three times).
    from miro.align.flux_lora_train import FluxLoraTrainConfig, batch_indices

    cfg = FluxLoraTrainConfig(batch_size=bs, grad_accum=accum)
    drawn = [i for step in range(2 * n) for micro in range(accum) for rank in range(world)
             for i in batch_indices(cfg, step, micro, world, rank, n)]  # the run's sample order
    epochs = [drawn[k : k + n] for k in range(0, len(drawn) - n + 1, n)]
    assert len(epochs) >= 2 and all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] or n < 3  # a fresh permutation each epoch
    assert Counter(drawn[: n * len(epochs)]) == Counter({i: len(epochs) for i in range(n)})


def test_flux_embed_image_paths_read_back_from_the_json(tmp_path, monkeypatch):
    # The readers give image_path relative to the working directory; flux-embed wrote it so into
    # emb/prompts.json, whose reader resolves it against emb/: "no readable images" in offline
    # training whenever the source path was relative.
    from miro.align.datasets import OfflineImageDataset, read_fork_json
    from miro.align.flux_tools import precompute_embeddings

    class Encoder:
        def encode_prompt(self, captions, prompt_2=None, max_sequence_length=512):
            return torch.zeros(len(captions), 4, 8), torch.zeros(len(captions), 8), torch.zeros(4, 3)

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "img0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "img1.png")
    (tmp_path / "data" / "items.jsonl").write_text(
        json.dumps({"caption": "a", "image_path": "img0.png"}) + "\n"  # relative to the data file
        + json.dumps({"caption": "b", "image_path": str(tmp_path / "img1.png")}) + "\n")
    items = read_items("data/items.jsonl")
    assert items[0]["image_path"] == "data/img0.png"
    path = precompute_embeddings(Encoder(), items, "emb", progress=False)
    assert [r["image_path"] for r in json.loads(path.read_text())] == ["../data/img0.png", "../img1.png"]
    back = read_fork_json(path)
    assert [Path(b["image_path"]).resolve() for b in back] == [(tmp_path / "data" / "img0.png").resolve(),
                                                               (tmp_path / "img1.png").resolve()]
    assert len(OfflineImageDataset(back, 8).items) == 2
