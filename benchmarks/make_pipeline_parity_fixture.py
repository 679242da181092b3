"""Generate the end-to-end pipeline parity fixture from the published ``miro-t2i`` 0.1.4 pipeline.

Run from the repository root, outside the package (the published package is loaded from a
renamed copy by ``make_parity_fixture.load_peer`` and is never imported by ``miro``)::

    python benchmarks/make_pipeline_parity_fixture.py --peer /tmp/peer/unpacked/miro \
        --scratch /tmp/miro_scratch --out tests/fixtures/pipeline

The published ``MiroPipeline`` is built directly from its parts — a small perturbed
``CADRINTextCond`` with all seven reward keys, ``FlowPrecond``, the channel-wise SDXL latent
normalisation, a tiny ``AutoencoderKL`` and a tiny T5 encoder + tokenizer standing in for
``stabilityai/sdxl-vae`` and ``google/flan-t5-xl`` — and called like a user would (prompt list,
``num_images_per_prompt``, positive and negative reward targets, CFG, a seeded generator,
``output_type="numpy"``). Stored under ``--out``:

- ``published/``: the pipeline folder in the published layout (``config.json``,
  ``model.safetensors``, ``uncond_embedding.npy``), plus ``t5/`` and ``vae/`` folders;
- ``cases.safetensors``: for each case, the sampler output (normalised latents), the VAE's
  float output and the uint8 images the published pipeline returned;
- ``cases.json``: the call arguments of each case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from _args import ArgumentParser, run_main  # beside this script

HERE = Path(__file__).resolve().parent
KEYS = ["clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score", "hpsv2_score",
        "vqa_score", "sciscore_score"]
NET = dict(
    data_size=8, data_dim=16, num_input_channels=4, num_latents=8, latents_dim=32, label_dim=32,
    num_processing_layers=1, num_blocks=2, patch_size=2, num_cond_tokens=0, read_write_heads=2,
    compute_heads=4, latent_mlp_multiplier=4, data_mlp_multiplier=4, use_cond_rin_block=True,
    concat_cond_token_to_latents=False, use_self_conditioning=True, num_text_registers=4,
    coherence_keys=KEYS, coherence_dropout=0.0, dropout_strategy="none",
)
PRE = dict(num_latents=8, latents_dim=32, do_normalization="noise_driven", sigma_data=0.5,
           do_gradnorm_reweighting=True, logvar_channels=16, logvar_mlp_layers=0)
NORM = {"channel_wise_normalisation": True, "model_type": "sdxl"}
CASES = {
    "cfg": dict(prompt=["two red circles above a blue square", "a green star"],
                reward_targets={"clip_score": 0.25, "vqa_score": 0.5},
                negative_reward_targets={"aesthetic_score": 0.75},
                num_inference_steps=4, guidance_scale=3.0, num_images_per_prompt=2, seed=11),
    "defaults_single_prompt": dict(prompt="one yellow triangle", num_inference_steps=3,
                                   guidance_scale=7.0, num_images_per_prompt=3, seed=3),
    "no_guidance": dict(prompt=["a blue square"], num_inference_steps=3, guidance_scale=0.0,
                        num_images_per_prompt=1, seed=5),
}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", type=Path, default=Path("/tmp/peer/unpacked/miro"))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/miro_scratch"))
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/pipeline"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from make_parity_fixture import load_peer, perturb

    CADRINTextCond, FlowPrecond, _, _, LinearScheduler = load_peer(args.peer, args.scratch)
    from miro_peer.models.postprocessing import VAEDecoderPostProcessing
    from miro_peer.models.preprocessing import PrecomputedSDLatentPreconditioning
    from miro_peer.pipeline import MiroPipeline as PeerPipeline

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, T5EncoderModel

    from miro.encoders.tiny import save_tiny_autoencoder_kl, save_tiny_t5

    out = args.out
    folder = out / "published"
    folder.mkdir(parents=True, exist_ok=True)
    t5_dir = save_tiny_t5(out / "t5", d_model=32)
    vae_dir = save_tiny_autoencoder_kl(out / "vae")

    torch.manual_seed(0)  # scratch script: the published constructors draw from the global RNG
    gen = torch.Generator().manual_seed(2024)
    net = CADRINTextCond(**NET)
    precond = FlowPrecond(**PRE)
    perturb(net, gen)
    perturb(precond, gen)
    pre = PrecomputedSDLatentPreconditioning(**NORM)
    post = VAEDecoderPostProcessing(vae=AutoencoderKL.from_pretrained(vae_dir), **NORM)
    tok = AutoTokenizer.from_pretrained(t5_dir)
    t5 = T5EncoderModel.from_pretrained(t5_dir).eval()
    with torch.no_grad():  # the empty prompt's encoding trimmed to its mask, like flan_t5_xl_uncond.npy
        t = tok([""], return_tensors="pt")
        uncond = t5(**t).last_hidden_state[0, : int(t["attention_mask"].sum())].float()
    config = {"network": NET, "preconditioning": PRE, "data_preprocessing": NORM, "postprocessing": NORM,
              "scheduler": {"start": 1, "end": 0, "clip_min": 1e-9}, "data_resolution": 8,
              "max_text_len": 6, "coherence_keys": KEYS}
    pipe = PeerPipeline(net, precond, pre, post, LinearScheduler(**config["scheduler"]), uncond, config,
                        text_encoder=t5, tokenizer=tok)

    # Record the sampler output (what post-processing receives) and the VAE's float output.
    seen = {}
    post_forward, vae_decode = post.forward, post.vae.decode

    def post_spy(x):
        seen["latents"] = x.detach().clone()
        return post_forward(x)

    def decode_spy(z):
        res = vae_decode(z)
        seen["decoded"] = res.sample.detach().clone()
        return res

    post.forward, post.vae.decode = post_spy, decode_spy
    tensors, meta = {}, {}
    for name, case in CASES.items():
        kw = {k: v for k, v in case.items() if k not in ("seed", "prompt")}
        images = pipe(case["prompt"], generator=torch.Generator().manual_seed(case["seed"]),
                      output_type="numpy", **kw)
        tensors[f"{name}.latents"] = seen["latents"]
        tensors[f"{name}.decoded"] = seen["decoded"]
        tensors[f"{name}.images"] = torch.from_numpy(np.ascontiguousarray(images))
        meta[name] = case
        print(f"{name}: images {images.shape} {images.dtype}")

    state = {f"network.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    state.update({f"preconditioning.{k}": v.detach().contiguous() for k, v in precond.state_dict().items()})
    state.update({f"data_preprocessing.{k}": v.detach().contiguous() for k, v in pre.state_dict().items()})
    state.update({f"postprocessing.{k}": v.detach().contiguous() for k, v in post.state_dict().items()
                  if not k.startswith("vae.")})
    save_file(state, str(folder / "model.safetensors"))
    np.save(folder / "uncond_embedding.npy", uncond.numpy())
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "cases.safetensors"))
    (out / "cases.json").write_text(json.dumps(meta, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
