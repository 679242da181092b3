"""Safe weight reading and strict, allocation-free loading (miro.rewards.weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miro.rewards.weights import build_and_load, load_state_dict, load_strict, resolve_dtype, resolve_file


def test_pickled_checkpoints_are_unwrapped_and_non_tensors_dropped(tmp_path):
    w = torch.randn(3, 2)
    torch.save({"state_dict": {"a.weight": w, "note": "x"}, "epoch": 4}, str(tmp_path / "ckpt.pt"))
    sd = load_state_dict(tmp_path / "ckpt.pt")
    assert set(sd) == {"a.weight"} and torch.equal(sd["a.weight"], w)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="is not a plain weights file and is not loaded: it pickles objects other than tensors"):
        load_state_dict(tmp_path / "evil.pt")


def test_safetensors_and_local_resolution(tmp_path):
    from safetensors.torch import save_file

    save_file({"b": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    assert resolve_file(tmp_path, "m.safetensors") == tmp_path / "m.safetensors"
    assert resolve_file(tmp_path / "m.safetensors") == tmp_path / "m.safetensors"
    assert torch.equal(load_state_dict(tmp_path / "m.safetensors")["b"], torch.ones(2))
    with pytest.raises(ValueError, match="'other.bin' not found"):
        resolve_file(tmp_path, "other.bin")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_file(str(tmp_path / "nope" / "x.pt"))


def test_build_and_load_assigns_weights_and_rebuilds_position_ids():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)
            self.register_buffer("position_ids", torch.arange(5).view(1, 5), persistent=False)

    sd = {"lin.weight": torch.randn(3, 2), "lin.bias": torch.randn(3)}
    m = build_and_load(M, sd, "toy")
    assert m.lin.weight.data_ptr() == sd["lin.weight"].data_ptr()  # assigned, not copied
    assert torch.equal(m.position_ids, torch.arange(5).view(1, 5))
    with pytest.raises(ValueError, match=r"toy: .*missing \(1\): lin.bias"):
        build_and_load(M, {"lin.weight": sd["lin.weight"]}, "toy")
    with pytest.raises(ValueError, match=r"wrong shape \(1\): weight"):
        load_strict(nn.Linear(2, 4), {"weight": torch.zeros(3, 2), "bias": torch.zeros(4)}, "toy")


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8")
