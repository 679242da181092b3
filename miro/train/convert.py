"""``miro convert CKPT OUT_DIR``: a Lightning training checkpoint -> a pipeline folder.

The folder is the published layout (``config.json``, ``model.safetensors`` with the
``network.`` / ``preconditioning.`` / ``data_preprocessing.`` / ``postprocessing.`` prefixes,
``uncond_embedding.npy``) plus ``reward_bins.json``, so ``MiroPipeline.from_pretrained(OUT_DIR)``
loads it. The exported weights are the EMA weights (the released checkpoints are the fp32 EMA,
miro_facts §6); ``--ema-index`` picks another decay, ``--raw`` the raw training weights.

The checkpoint is read with ``torch.load(weights_only=True)``: its hyper-parameters are plain
containers, so no code from the file is ever executed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint dict, loaded safely (tensors and plain containers only)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder; give the .ckpt file in it (e.g. {str(p / 'last.ckpt')!r})")
    if not p.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except PermissionError:  # the environment, not the file's content: stays an OSError (exit 1)
        raise
    except Exception as e:  # noqa: BLE001 - on foreign bytes the unpickler raises anything (KeyError, EOFError, ...)
        why = (str(e).strip().splitlines() or [""])[0][:200]  # the first line: the full text can be a page long
        raise ValueError(f"{str(path)!r} is not a readable Lightning checkpoint ({type(e).__name__}: {why})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict); was it written by `miro train`?")
    return ckpt


def _ema_prefixes(state: dict) -> list[str]:
    names = sorted({k.split(".")[1] for k in state if k.startswith("ema.ema_")})
    return names


def checkpoint_weights(path: str | os.PathLike, ema_index: int | None = 0) -> tuple[dict, dict, dict]:
    """``(model_config, weights, checkpoint)`` of a ``miro train`` checkpoint.

    ``ema_index``: which EMA decay (0 = the first configured, the exported default); None picks the
    raw training weights. ``weights`` are keyed like ``MiroModel.state_dict()``.
    """
    ckpt = load_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    extra = ckpt.get("miro") or {}
    config = dict(extra.get("model_config") or hp.get("model_config") or {})
    if "network" not in config:
        raise ValueError(f"{path}: no model_config in the checkpoint; was it written by `miro train`?")
    state = ckpt["state_dict"]
    if ema_index is None:
        prefix = "model."
    else:
        decays = extra.get("ema_decays") or hp.get("ema_decays") or []
        from miro.train.ema import _suffix

        names = [f"ema_{_suffix(float(d))}" for d in decays] or _ema_prefixes(state)
        if not 0 <= ema_index < len(names):
            raise ValueError(f"ema_index={ema_index} out of range: the checkpoint has EMA decays {decays}")
        prefix = f"ema.{names[ema_index]}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path}: no tensors under {prefix!r}")
    return config, weights, ckpt


def pipeline_from_checkpoint(path: str | os.PathLike, ema_index: int | None = 0, text_encoder=None,
                             autoencoder=None, device: str | torch.device = "cpu"):
    """Build a :class:`miro.pipeline.MiroPipeline` from a training checkpoint.

    ``ema_index``: which EMA decay (0 = the first configured, the exported default); None uses the
    raw training weights. ``text_encoder`` / ``autoencoder`` override the config's specs.
    """
    from miro.hub import model_from_state
    from miro.pipeline import MiroPipeline
    from miro.rewards.binning import RewardBins

    config, weights, ckpt = checkpoint_weights(path, ema_index)
    check_encoders_fit(config, text_encoder, autoencoder)
    state, extra = ckpt["state_dict"], ckpt.get("miro") or {}
    model = model_from_state(config, weights)  # leaves the caller's global RNG as it was
    uncond = state.get("uncond_embedding")
    if uncond is None:
        raise ValueError(f"{path}: the checkpoint has no uncond_embedding")
    bins = extra.get("reward_bins")
    if bins is None:
        dm = next((v for k, v in ckpt.items() if k.endswith("DataModule") and isinstance(v, dict)), None)
        bins = (dm or {}).get("bins")
    bins = RewardBins.from_dict(bins) if bins else None
    pipe = MiroPipeline(model, text_encoder if text_encoder is not None else config.get("text_encoder", "minilm"),
                        autoencoder if autoencoder is not None else config.get("autoencoder", "identity"),
                        config, uncond, reward_bins=bins)
    pipe.source = str(path)
    pipe.checkpoint_meta = dict(extra)  # samples_seen, reward bins...: callers need not read the file again
    return pipe.to(device)


def _known_width(spec, kind: str) -> int | None:
    """The text-embedding width (``kind="text"``) or latent channels (``"latents"``) of an encoder
    spec that names a known encoder or a local folder; None where only loading it would tell."""
    import json

    from miro.encoders.autoencoder import _IDENTITY_NAMES, _SDXL_NAMES
    from miro.encoders.text import _MINILM_NAMES, FLAN_T5_XL

    if not isinstance(spec, (str, os.PathLike)):
        return None
    name = str(spec)
    known = ({**{n.lower(): 384 for n in _MINILM_NAMES}, FLAN_T5_XL: 2048, "flan_t5_xl": 2048} if kind == "text"
             else {**{n.lower(): 3 for n in _IDENTITY_NAMES}, **{n.lower(): 4 for n in _SDXL_NAMES}})
    if name.lower() in known:
        return known[name.lower()]
    cfg = Path(name) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        return c.get("d_model", c.get("hidden_size")) if kind == "text" else c.get("latent_channels")
    return None


def check_encoders_fit(config: dict, text_encoder=None, autoencoder=None) -> None:
    """A text encoder or autoencoder given for a model must produce what it was trained on: its
    text width (``label_dim``) and its latent channels (``num_input_channels``)."""
    net = config.get("network", {})
    for spec, kind, key, what in ((text_encoder, "text", "label_dim", "-d text embeddings"),
                                  (autoencoder, "latents", "num_input_channels", "-channel latents")):
        width, want = _known_width(spec, kind), net.get(key)
        if spec is not None and width is not None and want is not None and int(width) != int(want):
            flag = "--text-encoder" if kind == "text" else "--autoencoder"
            raise ValueError(f"{flag} {str(spec)!r} gives {width}{what}; this model was trained on "
                             f"{want}{what} (network.{key})")


def convert(ckpt: str | os.PathLike, out_dir: str | os.PathLike, variant_name: str | None = None,
            ema_index: int | None = 0, push_to_hub: str | None = None, text_encoder=None,
            autoencoder=None, dtype: str = "float32") -> Path:
    """Write the pipeline folder (``out_dir/variant_name`` when given); optionally upload it.
    ``dtype``: how the weights are stored (float32 as published; float16 halves the file)."""
    pipe = pipeline_from_checkpoint(ckpt, ema_index, text_encoder, autoencoder)
    out = pipe.save_pretrained(out_dir, variant=variant_name, dtype=dtype)
    if push_to_hub:
        url = pipe.push_to_hub(push_to_hub, variant=variant_name, dtype=dtype)
        print(f"uploaded to {url}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="miro convert",
                                description="Convert a Lightning training checkpoint into a pipeline folder "
                                            "(EMA weights, config, uncond embedding, reward bins).")
    p.add_argument("ckpt", help="a .ckpt written by `miro train` (e.g. .../checkpoints/NAME/last.ckpt)")
    p.add_argument("out_dir", help="output folder (published pipeline layout)")
    p.add_argument("--variant-name", default=None,
                   help="write into OUT_DIR/NAME (a published variant name such as miro-no-clip)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this hub repo")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema-index", type=int, default=0, help="which EMA decay to export (0 = first configured)")
    g.add_argument("--raw", action="store_true", help="export the raw training weights instead of the EMA")
    p.add_argument("--text-encoder", default=None, help="override the text encoder spec in config.json")
    p.add_argument("--autoencoder", default=None, help="override the autoencoder spec in config.json")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="storage dtype of the weights (float32 as published; float16 halves the file, "
                        "as the shipped shapes model; loading always gives float32)")
    args = p.parse_args(argv)
    from miro.cli import report_errors

    # 2: a bad checkpoint, EMA index, encoder or autoencoder name; 1: unreadable files, an encoder
    # neither local nor reachable, a full disk
    return report_errors("miro convert", _run, args)


def _run(args: argparse.Namespace) -> int:
    variant = args.variant_name
    out = convert(args.ckpt, args.out_dir, variant, None if args.raw else args.ema_index, args.push_to_hub,
                  args.text_encoder, args.autoencoder, args.dtype)
    print(f"wrote {out}")
    if variant is None:
        trained_as = (load_checkpoint(args.ckpt).get("miro") or {}).get("variant_name")
        if trained_as and trained_as != "miro":
            print(f"note: this run reproduces the published variant {trained_as!r}; "
                  f"--variant-name {trained_as} writes it into OUT_DIR/{trained_as}/ as on the hub")
    return 0
