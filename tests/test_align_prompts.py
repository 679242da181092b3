"""MIA prompts, control words, prompt priority and the dataset readers (fork JSON, CuRe CSVs)."""

from __future__ import annotations

import json

import pytest
import torch

from miro.align import mia_prompts
from miro.align.datasets import OfflineImageDataset, load_fork_embeddings, read_cure, read_fork_json, read_items
from miro.align.prompts import NEGATIVE_CONTROL_WORDS, POSITIVE_CONTROL_WORDS, PromptConfig, build_reward_prompts


def test_mia_prompts_forms():
    assert mia_prompts("An image of Banku", "Dumpling", "Ghana") == ("An image of Banku. Dumpling, Ghana", "An image of Banku")
    assert mia_prompts("An image of Banku", region="Ghana") == ("An image of Banku. Ghana", "An image of Banku")
    assert mia_prompts("x", "Rice_Dish", None) == ("x. Rice Dish", "x")
    assert mia_prompts("x", "Rice_Dish", None, humanize=False) == ("x. Rice_Dish", "x")
    assert mia_prompts("x") == ("x", "x")
    with pytest.raises(ValueError, match="caption"):
        mia_prompts("  ")


def test_mia_prompts_on_cure_rows(shared_data):
    items = read_cure(shared_data / "cure")
    assert len(items) == 300
    assert {it["supercategory"] for it in items} == {"architecture", "art", "celebrations", "fashion", "food", "people"}
    assert sum(it["global_north_south"] == "Global North" for it in items) == 123
    banku = next(it for it in items if it["item"] == "Panta Bhat")
    pos, neg = build_reward_prompts(banku, PromptConfig())
    assert (pos, neg) == ("An image of Panta Bhat. Rice Dish, Bangladesh", "An image of Panta Bhat")
    # every row yields a distinct positive and the plain caption as negative
    for it in items:
        p, n = build_reward_prompts(it, PromptConfig())
        assert n == it["caption"] and p.startswith(it["caption"] + ". ") and it["region"] in p


def test_prompt_priority_and_control_words():
    item = {"caption": "a cat", "category": "Pet", "region": None, "pos_prompt": None, "neg_prompt": None}
    assert build_reward_prompts(item, PromptConfig()) == ("a cat. Pet", "a cat")
    # item prompts beat MIA; a missing side falls back to the caption
    assert build_reward_prompts({**item, "pos_prompt": "good cat"}, PromptConfig()) == ("good cat", "a cat")
    # CLI overrides beat everything
    assert build_reward_prompts({**item, "pos_prompt": "good cat"}, PromptConfig(neg_prompt="bad")) == ("a cat", "bad")
    plain = {"caption": "a cat"}
    for step in range(6):
        p, n = build_reward_prompts(plain, PromptConfig(), step)
        assert p == f"{POSITIVE_CONTROL_WORDS[step % 4]}. a cat" and n == f"{NEGATIVE_CONTROL_WORDS[step % 5]}. a cat"
    assert build_reward_prompts(plain, PromptConfig(pos_prefix="Sharp")) == ("Sharp. a cat", "a cat")
    with pytest.raises(ValueError, match="no reward prompts"):
        build_reward_prompts(plain, PromptConfig(control_words=False))
    with pytest.raises(ValueError, match="caption"):
        build_reward_prompts({"caption": ""}, PromptConfig())


def test_fork_json_reader_and_embeddings(tmp_path):
    for sub in ("prompt_embed", "pooled_prompt_embeds", "text_ids"):
        (tmp_path / sub).mkdir()
    torch.save(torch.ones(5, 8), tmp_path / "prompt_embed" / "0.pt")
    torch.save(torch.ones(4), tmp_path / "pooled_prompt_embeds" / "0.pt")
    torch.save(torch.zeros(5, 3), tmp_path / "text_ids" / "0.pt")
    data = [
        {"caption": "An image of Banku", "prompt_embed_path": "0.pt", "pooled_prompt_embeds_path": "0.pt", "text_ids": "0.pt",
         "mia_category": "Dumpling", "region": "Ghana", "Item": "Banku", "image_path": "img/b.png"},
        {"caption": "plain"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(data))
    items = read_fork_json(tmp_path / "data.json")
    assert items[0]["category"] == "Dumpling" and items[0]["region"] == "Ghana" and items[0]["item"] == "Banku"
    assert items[0]["image_path"] == str(tmp_path / "img" / "b.png")
    pe, pooled, tids = load_fork_embeddings(items[0])
    assert pe.shape == (5, 8) and pooled.shape == (4,) and tids.shape == (5, 3)
    assert items[1]["category"] is None
    # an empty or null MIA alias falls back to the plain column (it used to hide it: no MIA prompts)
    from miro.align.datasets import normalize_item

    item = normalize_item({"caption": "c", "mia_category": None, "category": "Food", "mia_region": "", "region": "Ghana"})
    assert (item["category"], item["region"]) == ("Food", "Ghana")
    with pytest.raises(ValueError, match="prompt_embed_path"):
        load_fork_embeddings(items[1])
    (tmp_path / "bad.json").write_text(json.dumps([{"nope": 1}]))
    with pytest.raises(ValueError, match="caption"):
        read_fork_json(tmp_path / "bad.json")


def test_read_items_dispatch(tmp_path, shared_data):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert [i["caption"] for i in read_items(tmp_path / "p.txt")] == ["a", "b"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "mia_region": "Peru"}\n')
    assert read_items(tmp_path / "p.jsonl")[0]["region"] == "Peru"
    (tmp_path / "c.csv").write_text("Item,generated_caption\nBanku,a ball of dough\n")
    assert read_items(tmp_path / "c.csv", caption_column="generated_caption")[0]["caption"] == "a ball of dough"
    assert len(read_items(shared_data / "cure" / "food.csv")) == 50
    with pytest.raises(ValueError, match="no column"):
        read_items(tmp_path / "c.csv", caption_column="caption")
    with pytest.raises(ValueError, match="does not exist"):
        read_items(tmp_path / "missing.json")


def test_offline_dataset_skips_and_counts_corrupt_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items = [{"caption": "r", "image_path": str(tmp_path / "ok.png")}, {"caption": "b", "image_path": str(tmp_path / "bad.png")},
             {"caption": "m", "image_path": str(tmp_path / "missing.png")}]
    ds = OfflineImageDataset(items, 4)
    assert len(ds) == 1 and ds.skipped == 2
    img, it = ds[0]
    assert img.shape == (3, 4, 4) and it["caption"] == "r"
    torch.testing.assert_close(img[0], torch.ones(4, 4), atol=0.01, rtol=0)  # red in [-1, 1]
    with pytest.raises(ValueError, match="no readable images"):
        OfflineImageDataset(items[1:], 4)
