"""Warm start across patch sizes (miro.models.patch_resize): closed forms of the resized tensors."""

import pytest
import torch
import torch.nn.functional as F

from miro.models import MiroModel, get_config
from miro.models.patch_resize import patch_size_of, resize_patch_tensors


def _model(patch: int, seed: int = 0) -> MiroModel:
    cfg = get_config("tiny")
    cfg["network"].update(patch_size=patch, data_size=8, num_blocks=1, num_text_registers=2)
    return MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(seed))


def _resized(coarse: MiroModel, patch: int) -> MiroModel:
    fine = _model(patch, seed=1)
    fine.load_state_dict_checked(resize_patch_tensors(coarse.state_dict(), patch, 3))
    return fine


def test_fine_tokens_are_the_coarse_tokens_of_the_upsampled_image():
    coarse = _model(4)
    fine = _resized(coarse, 2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # pixel repetition, 16 x 16
    t_fine = fine.network.patch_extractor(fine.network.patchify(x))
    t_coarse = coarse.network.patch_extractor(coarse.network.patchify(up))
    torch.testing.assert_close(t_fine, t_coarse, rtol=1e-5, atol=1e-5)


def test_fine_head_is_the_coarse_head_box_filtered():
    coarse = _model(4)
    fine = _resized(coarse, 2)
    tokens = torch.randn(2, 16, coarse.network.patch_extractor.out_features)
    out_fine = fine.network.unpatchify(fine.network.map_tokens_to_patches(tokens), 8, 8)  # 4x4 tokens of 2x2
    out_coarse = coarse.network.unpatchify(coarse.network.map_tokens_to_patches(tokens), 16, 16)  # of 4x4
    torch.testing.assert_close(out_fine, F.avg_pool2d(out_coarse, 2), rtol=1e-5, atol=1e-6)


def test_position_table_is_resampled_at_token_centres():
    coarse = _model(4)
    g, d = 2, coarse.network.data_pos_embedding.shape[1]
    rows = torch.arange(g, dtype=torch.float32)[:, None, None].expand(g, g, d)
    cols = torch.arange(g, dtype=torch.float32)[None, :, None].expand(g, g, d)
    state = dict(coarse.state_dict())
    state["network.data_pos_embedding"] = (3 * rows - 2 * cols).reshape(g * g, d)
    table = resize_patch_tensors(state, 2, 3)["network.data_pos_embedding"].reshape(4, 4, d)
    # fine token k has its centre at coarse coordinate (k + 0.5) / 2 - 0.5, clamped to the grid
    centre = ((torch.arange(4) + 0.5) / 2 - 0.5).clamp(0, g - 1)
    torch.testing.assert_close(table[..., 0], 3 * centre[:, None] - 2 * centre[None, :])


def test_same_patch_is_a_no_op_and_bad_sizes_are_refused():
    state = _model(4).state_dict()
    same = resize_patch_tensors(state, 4, 3)
    assert all(same[k] is state[k] for k in state)
    assert patch_size_of(state, 3) == 4
    with pytest.raises(ValueError, match="only to a divisor of it .*got 3"):
        resize_patch_tensors(state, 3, 3)
    with pytest.raises(ValueError, match="only to a divisor of it .*got 8"):
        resize_patch_tensors(state, 8, 3)
    with pytest.raises(ValueError, match="not p\\*p\\*4"):
        patch_size_of(state, 4)


def test_a_model_with_pixel_unet_is_refused_by_name():
    # the U-Net has one level per factor 2 of the patch, so a finer patch is another network, not
    # a resize (the shipped `shapes` model has one: init_from=shapes cannot change the patch)
    cfg = get_config("tiny")
    cfg["network"].update(patch_size=4, data_size=8, num_blocks=1, num_text_registers=2, pixel_unet=8)
    state = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(0)).state_dict()
    with pytest.raises(ValueError, match="cannot resize patch 4 to 2: the source has pixel_unet"):
        resize_patch_tensors(state, 2, 3)
    assert resize_patch_tensors(state, 4, 3).keys() == state.keys()  # the same patch is still a no-op
