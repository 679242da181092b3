"""RIN backbone and MiroModel: published init, masks, rewards semantics, state dict and I/O."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from miro.models import MiroModel, NetworkConfig, get_config
from miro.models.layers import swiglu_hidden_dim
from miro.models.rin import RIN, sincos_2d_table


TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_checkpoint_keys.tsv"


def tiny(seed=0):
    return MiroModel.from_config(get_config("tiny"), generator=torch.Generator().manual_seed(seed)).eval()


def inputs(model, b=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *model.latent_shape, generator=g)
    emb = torch.randn(b, length, model.network.label_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 2:] = False
    return x, torch.tensor([0.1, 0.5, 0.9])[:b], emb, mask


def test_swiglu_width():
    assert swiglu_hidden_dim(1024, 4) == 2816
    assert swiglu_hidden_dim(512, 4) == 1536
    assert swiglu_hidden_dim(192, 2) == 256


def test_published_init():
    net = tiny().network
    assert torch.all(net.ln_previous_2.weight == 0) and torch.all(net.ln_previous_2.bias == 0)
    for blk in net.transformers_blocks:
        assert torch.all(blk.layer_scale_1 == 0.1) and torch.all(blk.layer_scale_2 == 0.1)
    for p in (net.latents, net.data_pos_embedding, net.text_registers, net.coherence_positional_embedding):
        assert p.abs().max() <= 0.04 and 0.01 < p.std() < 0.03
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            fan_in, fan_out = m.weight.shape[1], m.weight.shape[0]
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() <= bound
            if m.bias is not None:
                assert torch.all(m.bias == 0)
    bools = {k: v for k, v in net.state_dict().items() if v.dtype == torch.bool}
    assert "cond_mask" in bools and "registers_coherence_mask" in bools
    assert any(k.endswith("attention_mask_dummy") for k in bools)
    assert all(v.all() for v in bools.values())
    # same generator -> same weights
    a, b = tiny(3).state_dict(), tiny(3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sincos_position_table_closed_form():
    grid, dim = 3, 8  # two frequencies per half: 1 and 1/100
    t = sincos_2d_table(grid, dim)
    assert t.shape == (9, 8)
    for r in range(grid):
        for c in range(grid):
            row = t[r * grid + c]
            want = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
                    math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
            assert torch.allclose(row, torch.tensor(want), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table(2, 6)


def test_init_position_table_kinds():
    net = tiny().network
    others = {k: v.clone() for k, v in net.state_dict().items() if k != "data_pos_embedding"}
    net.init_position_table("sincos")
    grid = net.data_size // net.patch_size
    assert torch.equal(net.data_pos_embedding.data, sincos_2d_table(grid, net.data_pos_embedding.shape[1]))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in others.items())  # nothing else moves
    net.init_position_table("published", generator=torch.Generator().manual_seed(0))
    assert net.data_pos_embedding.abs().max() <= 0.04
    with pytest.raises(ValueError, match="'published' or 'sincos'.*'fourier'"):
        net.init_position_table("fourier")


def test_self_conditioning_zero_latents_noop_only_at_init():
    model = tiny()
    x, g, emb, mask = inputs(model)
    with torch.no_grad():
        f_zero, _ = model.network(x, g, emb, mask, None, torch.zeros(3, 8, 32))
        f_off, _ = model.network(x, g, emb, mask, None, None)
        assert torch.equal(f_zero, f_off)
        model.network.ln_previous_2.bias.add_(0.1)
        model.network.ln_previous_2.weight.add_(0.1)
        f_zero, _ = model.network(x, g, emb, mask, None, torch.zeros(3, 8, 32))
        f_off, _ = model.network(x, g, emb, mask, None, None)
    assert (f_zero - f_off).abs().max() > 1e-4


def test_reward_semantics_eval_and_train():
    model = tiny()
    x, g, emb, mask = inputs(model)
    net = model.network
    with torch.no_grad():
        base = net(x, g, emb, mask, {"clip_score": torch.tensor([0.2, 0.4, 0.6])})[0]
        nan = net(x, g, emb, mask, {"clip_score": torch.full((3,), float("nan"))})[0]
        missing = net(x, g, emb, mask, {})[0]
        zero = net(x, g, emb, mask, {"clip_score": torch.zeros(3)})[0]
        assert torch.equal(nan, missing)  # eval: NaN -> zero embedding, like a missing key
        assert (zero - missing).abs().max() > 1e-5  # value 0 is a real embedding
        assert (base - zero).abs().max() > 1e-5
        net.train()
        nan_t = net(x, g, emb, mask, {"clip_score": torch.full((3,), float("nan"))})[0]
        zero_t = net(x, g, emb, mask, {"clip_score": torch.zeros(3)})[0]
        assert torch.equal(nan_t, zero_t)  # training: NaN -> value 0
        net.eval()
    with pytest.raises(ValueError, match="unknown reward keys"):
        net(x, g, emb, mask, {"clip": torch.zeros(3)})


def test_padded_text_does_not_change_output():
    model = tiny()
    x, g, emb, mask = inputs(model)
    emb2 = emb.clone()
    emb2[0, 2:] = 1e3 * torch.randn_like(emb2[0, 2:])  # only masked positions change
    with torch.no_grad():
        torch.testing.assert_close(model(x, g, emb, mask)[0], model(x, g, emb2, mask)[0])


@pytest.mark.parametrize("strategy", ["binomial", "uniform", "none"])
def test_reward_dropout_rates(strategy):
    cfg = get_config("tiny")["network"]
    cfg.update(coherence_dropout=0.5, dropout_strategy=strategy)
    net = RIN(**cfg)
    k = len(cfg["coherence_keys"])
    mask = net.coherence_dropout_mask(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert mask.shape == (20000, k) and set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = mask.sum(1)
    if strategy == "none":
        assert torch.all(mask == 1)
    elif strategy == "binomial":
        assert kept.min() >= 1  # an all-dropped row gets a one-hot
        # P(keep) = 0.5 + P(all dropped) / K
        expected = 0.5 + 0.5**k / k
        assert abs(mask.mean().item() - expected) < 0.01
    else:
        dropped = k - kept
        counts = torch.bincount(dropped.long(), minlength=k).float() / 20000
        assert counts.shape[0] == k  # 0..K-1 dropped, at least one kept
        assert torch.all((counts - 1 / k).abs() < 0.015)
        # which rewards are dropped is uniform over positions
        assert torch.all((mask.mean(0) - mask.mean()).abs() < 0.02)
    again = net.coherence_dropout_mask(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("data_size", 9, "divisible by patch_size"),
        ("latents_dim", 40, "divisible by 16"),
        ("compute_heads", 5, "compute_heads"),
        ("dropout_strategy", "random", "dropout_strategy"),
        ("coherence_keys", [], "coherence_keys"),
        ("coherence_dropout", 1.0, "coherence_dropout"),
        ("num_blocks", 0, "num_blocks"),
        ("data_norm", "layer", "data_norm.*allowed: rms, none"),
        ("data_mixer", "attention", "data_mixer.*allowed: none, conv"),
        ("pixel_unet", 12, "pixel_unet=12; allowed: 0 .off. or a positive multiple of 8"),
        ("pixel_unet", -8, "pixel_unet=-8"),
    ],
)
def test_bad_network_config_raises(key, value, match):
    cfg = get_config("tiny")
    cfg["network"][key] = value
    if key == "latents_dim":
        cfg["preconditioning"][key] = value
    with pytest.raises(ValueError, match=match):
        MiroModel.from_config(cfg)


def test_bad_config_sections_raise():
    cfg = get_config("tiny")
    cfg["network"]["num_heads"] = 3
    with pytest.raises(ValueError, match="unknown network keys"):
        MiroModel.from_config(cfg)
    cfg = get_config("tiny")
    cfg["preconditioning"]["num_latents"] = 9
    with pytest.raises(ValueError, match="must match the network"):
        MiroModel.from_config(cfg)
    cfg = get_config("tiny")
    cfg["postprocessing"] = {"model_type": "sd15"}
    with pytest.raises(ValueError, match="model_type"):
        MiroModel.from_config(cfg)
    with pytest.raises(ValueError, match="expected"):
        tiny()(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 2, 384), torch.ones(1, 2, dtype=torch.bool))


def test_network_config_fields_are_published_keys():
    header = next(l for l in TSV.read_text().splitlines() if l.startswith("# {"))
    published = ast.literal_eval(header[2:])
    fields = set(NetworkConfig.__dataclass_fields__)
    assert set(published) <= fields
    extra = fields - set(published)
    assert extra == {"compute_dropout", "rw_stochastic_depth", "compute_stochastic_depth", "num_text_registers",
                     "coherence_dropout", "dropout_strategy", "data_norm", "data_mixer", "pixel_unet"}
    rel = get_config("release")["network"]
    assert {k: rel[k] for k in published} == published


def test_data_norm_rms_discards_patch_scale_and_none_keeps_it():
    """Closed form: with a zero extractor bias, RMSNorm(W (c p)) = RMSNorm(W p) for c > 0, so the
    published net gives the same tokens, hence the same output, for x and 3 x. Without the norm
    the tokens are linear in the patch (minus the position table) and the output changes."""
    g = torch.Generator().manual_seed(0)
    side = get_config("tiny")["network"]["data_size"]
    x = torch.randn(2, 3, side, side, generator=g)
    for norm in ("rms", "none"):
        cfg = get_config("tiny")
        cfg["network"]["data_norm"] = norm
        net = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(1)).network.eval()
        assert (net.data_ln is None) == (norm == "none")
        assert ("data_ln.weight" in net.state_dict()) == (norm == "rms")
        with torch.no_grad():
            assert torch.all(net.patch_extractor.bias == 0)  # the published init
            emb, mask = torch.randn(2, 4, 384, generator=g), torch.ones(2, 4, dtype=torch.bool)
            outs = [net(c * x, torch.tensor([0.3, 0.7]), emb, mask, {})[0] for c in (1.0, 3.0)]
            feats = [net.patch_extractor(net.patchify(c * x)) for c in (1.0, 3.0)]
        if norm == "rms":
            torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(feats[1], 3 * feats[0])
            assert (outs[1] - outs[0]).abs().max() > 1e-2
    # config.json: a published-architecture network has no data_norm key; the extension round-trips
    rel = NetworkConfig.from_dict(get_config("tiny")["network"])
    assert "data_norm" not in rel.to_dict()
    ext = NetworkConfig.from_dict({**get_config("tiny")["network"], "data_norm": "none"})
    assert NetworkConfig.from_dict(ext.to_dict()).data_norm == "none"


def test_token_grid_mixer_closed_form_and_locality():
    """TokenGridMixer: out[r, c] = x[r, c] + b + sum_{dr, dc} w[dr, dc] * norm(x)[r + dr, c + dc]
    (zero padding) per channel, on the row-major token grid of ``patchify``; a pixel change inside
    one patch moves only that patch's token and its 8 neighbours."""
    from miro.models.rin import TokenGridMixer

    g = torch.Generator().manual_seed(0)
    grid, d = 4, 6
    mix = TokenGridMixer(d, grid)
    with torch.no_grad():
        mix.conv.weight.copy_(torch.randn(mix.conv.weight.shape, generator=g))
        mix.conv.bias.copy_(torch.randn(d, generator=g))
        mix.norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    x = torch.randn(2, grid * grid, d, generator=g)
    with torch.no_grad():
        out = mix(x)
        h = mix.norm(x).reshape(2, grid, grid, d)
    w, b = mix.conv.weight[:, 0], mix.conv.bias  # (d, 3, 3)
    for r, c in [(0, 0), (1, 2), (3, 3), (2, 0)]:
        ref = x[:, r * grid + c] + b
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if 0 <= r + dr < grid and 0 <= c + dc < grid:
                    ref = ref + w[:, dr + 1, dc + 1] * h[:, r + dr, c + dc]
        torch.testing.assert_close(out[:, r * grid + c], ref.detach())

    # Locality in image coordinates: perturb the pixels of patch (1, 2) of a tiny net's input.
    cfg = get_config("tiny")
    cfg["network"]["data_mixer"] = "conv"
    net = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(1)).network.eval()
    mixer, p, side = net.rin_blocks[0].data_mixer, net.patch_size, net.data_size
    with torch.no_grad():
        mixer.conv.weight.normal_(generator=g)
        y = torch.randn(1, 3, side, side, generator=g)
        y2 = y.clone()
        y2[:, :, 1 * p:2 * p, 2 * p:3 * p] += 1.0
        tok = [mixer(net.patch_extractor(net.patchify(t))) for t in (y, y2)]
    moved = ((tok[1] - tok[0]).abs().amax(-1) > 1e-6).reshape(mixer.grid, mixer.grid)
    expect = torch.zeros_like(moved)
    expect[0:3, 1:4] = True
    assert torch.equal(moved, expect)


def _published_and_extended(key, value, prefix):
    """The tiny network without and with the extension ``key=value``, from the same generator: the
    published tensors are equal, the extra ones all start with ``prefix``, and so are the outputs
    (bit for bit). Returns (base config, ext config, nets, args, ext output with its graph)."""
    base, ext = get_config("tiny"), get_config("tiny")
    ext["network"][key] = value
    nets = [MiroModel.from_config(c, generator=torch.Generator().manual_seed(3)).network for c in (base, ext)]
    sd0, sd1 = (n.state_dict() for n in nets)
    extra = set(sd1) - set(sd0)
    assert set(sd0) <= set(sd1) and extra and all(k.startswith(prefix) for k in extra)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    g = torch.Generator().manual_seed(0)
    side = base["network"]["data_size"]
    args = (torch.randn(2, 3, side, side, generator=g), torch.tensor([0.2, 0.8]),
            torch.randn(2, 4, 384, generator=g), torch.ones(2, 4, dtype=torch.bool), {})
    outs = [n.eval()(*args)[0] for n in nets]
    assert torch.equal(outs[0], outs[1])
    # config.json: the key is written only for the extension, and round-trips
    assert key not in NetworkConfig.from_dict(base["network"]).to_dict()
    assert getattr(NetworkConfig.from_dict(NetworkConfig.from_dict(ext["network"]).to_dict()), key) == value
    return nets, args, outs[1]


def test_data_mixer_starts_as_the_published_network_and_learns():
    """Zero-initialised, data_mixer=conv gives the published network's output bit for bit (same
    draws, extra tensors only under rin_blocks.*.data_mixer); its conv still gets a gradient."""
    nets, _, out = _published_and_extended("data_mixer", "conv", "rin_blocks.")
    assert all(".data_mixer." in k for k in set(nets[1].state_dict()) - set(nets[0].state_dict()))
    out.square().mean().backward()
    assert nets[1].rin_blocks[0].data_mixer.conv.weight.grad.abs().sum() > 0


def test_pixel_unet_starts_as_the_published_network_and_learns():
    """pixel_unet=C: the same generator draws the same published tensors, the extra tensors all
    sit under pixel_unet.*, and the output is the published network's bit for bit (zero token
    projection, zero last convs); one AdamW step on the extension's own tensors changes it."""
    nets, args, out = _published_and_extended("pixel_unet", 8, "pixel_unet.")
    out.square().mean().backward()
    unet = nets[1].pixel_unet
    assert unet.out.weight.grad.abs().sum() > 0 and unet.to_tokens.weight.grad.abs().sum() > 0
    torch.optim.AdamW(unet.parameters(), lr=1e-2).step()
    with torch.no_grad():
        assert not torch.allclose(nets[1](*args)[0], out)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixel_unet_feeds_each_token_its_own_patch(patch):
    """The encoder's token addend is in patchify's row-major token order. With every 3x3 kernel
    cut to its centre tap, a stride-2 level reads pixel (2i, 2j), so a bright patch at token (r, c)
    changes token r * grid + c and no other. The decoder returns the input's shape."""
    from miro.models.pixel_unet import PixelUNet

    unet = PixelUNet(8, 3, patch, data_dim=16, cond_dim=32)
    unet.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                centre = m.weight[:, :, 1, 1].clone()
                m.weight.zero_()
                m.weight[:, :, 1, 1] = centre
        torch.nn.init.normal_(unet.to_tokens.weight, generator=torch.Generator().manual_seed(2))
    side, cond = 8 * patch, torch.randn(1, 32)
    grid = side // patch
    for r, c in [(0, 0), (2, 5), (7, 3)]:
        y = torch.zeros(1, 3, side, side)
        y[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 5.0
        with torch.no_grad():
            add, skips = unet.encode(y, cond)
            base, _ = unet.encode(torch.zeros_like(y), cond)
            assert add.shape == (1, grid * grid, 16)
            moved = ((add - base)[0].abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
            assert moved == [r * grid + c]
            assert unet.decode(torch.randn(1, grid * grid, 16), skips, cond).shape == y.shape
    with pytest.raises(ValueError, match="power-of-two patch_size, got patch_size=3"):
        PixelUNet(8, 3, 3, data_dim=16, cond_dim=32)


def _tsv_state_dict():
    sd = {}
    dtypes = {"float32": torch.float32, "bool": torch.bool}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        sd[name] = torch.empty(ast.literal_eval(shape), dtype=dtypes[dtype], device="meta")
    return sd


def test_official_key_listing_loads_strict_on_meta():
    sd = _tsv_state_dict()
    assert len(sd) > 500
    with torch.device("meta"):
        model = MiroModel.from_config(get_config("release"))
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict_checked(sd, assign=True)
    assert sum(p.numel() for p in model.network.parameters()) == 360_413_712
    first = next(iter(sd))
    bad = dict(sd)
    del bad[first]
    with pytest.raises(ValueError, match=f"missing tensor '{first}'"):
        model.load_state_dict_checked(bad, assign=True)
    bad = dict(sd, **{"network.extra": torch.empty(1, device="meta")})
    with pytest.raises(ValueError, match="unexpected tensor 'network.extra'"):
        model.load_state_dict_checked(bad, assign=True)
    bad = dict(sd, **{"network.latents": torch.empty(255, 1024, device="meta")})
    with pytest.raises(ValueError, match="network.latents.*shape"):
        model.load_state_dict_checked(bad, assign=True)
    bad = dict(sd, **{"network.cond_mask": torch.empty(24, device="meta")})
    with pytest.raises(ValueError, match="cond_mask.*dtype"):
        model.load_state_dict_checked(bad, assign=True)


def test_safetensors_roundtrip_bit_identical(tmp_path):
    model = tiny(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["network.cond_mask"].dtype == torch.bool
    other = tiny(2)
    other.load_state_dict_checked(sd)
    x, g, emb, mask = inputs(model)
    coh = {"aesthetic_score": torch.tensor([0.1, 0.2, 0.3])}
    with torch.no_grad():
        a, za = model(x, g, emb, mask, coh)
        b, zb = other(x, g, emb, mask, coh)
    assert torch.equal(a, b) and torch.equal(za, zb)


def test_pre_and_post_processing_inverse():
    cfg = get_config("release")
    from miro.models.model import normalization_constants

    scale, bias = normalization_constants(cfg["data_preprocessing"], 4)
    torch.testing.assert_close(scale.flatten(), 0.5 / torch.tensor([7.8518, 5.8465, 6.8716, 5.3140]))
    s2, b2 = normalization_constants({"model_type": "sdxl", "channel_wise_normalisation": False}, 4)
    torch.testing.assert_close(s2.flatten(), torch.full((4,), 1 / 0.13025))
    model = tiny()
    model.data_preprocessing.scale.fill_(2.0)
    model.postprocessing.scale.fill_(2.0)
    model.data_preprocessing.bias.fill_(0.5)
    model.postprocessing.bias.fill_(0.5)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.preprocess(x), 2 * x + 0.5)
    torch.testing.assert_close(model.postprocess(model.preprocess(x)), x)


def test_text_padding_trim_is_exact_and_latents_only_matches():
    model = tiny(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, g, emb, mask = inputs(model, length=7)
    mask[:, 4:] = False  # trailing columns padded in every sample
    net = model.network
    with torch.no_grad():
        f_trim, z_trim = net(x, g, emb, mask, None, torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(0)))
        net.trim_text_padding = False
        f_full, z_full = net(x, g, emb, mask, None, torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(0)))
        net.trim_text_padding = True
        none, z_only = model(x, g, emb, mask, None, None, latents_only=True)
        _, z_ref = model(x, g, emb, mask, None, None)
    torch.testing.assert_close(f_trim, f_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_trim, z_full, rtol=1e-5, atol=1e-6)
    assert none is None and torch.equal(z_only, z_ref)


def test_rmsnorm_custom_backward():
    from miro.models.layers import _RMSNormFn

    x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(_RMSNormFn.apply(x, w, 1e-6), ref)


def test_rmsnorm_rounds_to_input_dtype_before_weight():
    from miro.models.layers import RMSNorm

    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        x = torch.randn(3, 8).bfloat16()
        xf = x.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
        out = norm(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_cpu_bf16_autocast_sampling_runs_close_to_fp32():
    from miro.models import euler_sample

    model = tiny()
    x, _, emb, mask = inputs(model, b=2)
    a = euler_sample(model, x, emb, mask, torch.zeros(1, 384), None, num_steps=2)
    b = euler_sample(model, x, emb, mask, torch.zeros(1, 384), None, num_steps=2, autocast=True)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_network_config_validates_and_rejects_unknown_keys():
    good = get_config("tiny")["network"]
    assert NetworkConfig.from_dict(good).to_dict() == good
    with pytest.raises(ValueError, match="patch_size"):
        NetworkConfig(**dict(good, patch_size=3))
    with pytest.raises(ValueError, match="unknown network keys"):
        NetworkConfig.from_dict(dict(good, heads=4))
    with pytest.raises(ValueError, match="bad network config"):
        NetworkConfig.from_dict({k: v for k, v in good.items() if k != "data_dim"})


def test_bf16_weights_sample_on_cpu():
    from miro.models import euler_sample

    model = tiny()
    x, _, emb, mask = inputs(model, b=2)
    ref = euler_sample(model, x, emb, mask, torch.zeros(1, 384), None, num_steps=2)
    out = euler_sample(model.to(torch.bfloat16), x, emb, mask, torch.zeros(1, 384), None, num_steps=2, autocast=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_conv_attn_mixer_warm_starts_a_conv_model_exactly_and_learns():
    """data_mixer=conv_attn adds a self-attention block over the data tokens whose layer scales
    start at 0: a conv model's weights plus the new block's fresh tensors give the conv model's
    output bit for bit, and the layer scales get a gradient (so the block can switch on)."""
    conv, attn = get_config("tiny"), get_config("tiny")
    conv["network"]["data_mixer"], attn["network"]["data_mixer"] = "conv", "conv_attn"
    src = MiroModel.from_config(conv, generator=torch.Generator().manual_seed(3)).network
    dst = MiroModel.from_config(attn, generator=torch.Generator().manual_seed(4)).network
    with torch.no_grad():  # trained-looking conv weights, so the mixer is not a no-op itself
        for blk in src.rin_blocks:
            blk.data_mixer.conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    new = set(dst.state_dict()) - set(src.state_dict())
    assert new and all(".data_mixer.attn." in k for k in new)
    dst.load_state_dict({**dst.state_dict(), **src.state_dict()})
    g = torch.Generator().manual_seed(0)
    side = conv["network"]["data_size"]
    args = (torch.randn(2, 3, side, side, generator=g), torch.tensor([0.2, 0.8]),
            torch.randn(2, 4, 384, generator=g), torch.ones(2, 4, dtype=torch.bool), {})
    outs = [n.eval()(*args)[0] for n in (src, dst)]
    assert torch.equal(outs[0], outs[1])
    outs[1].square().mean().backward()
    assert dst.rin_blocks[0].data_mixer.attn.layer_scale_1.grad.abs().sum() > 0
    assert NetworkConfig.from_dict(NetworkConfig.from_dict(attn["network"]).to_dict()).data_mixer == "conv_attn"
