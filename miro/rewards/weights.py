"""Finding and reading reward-model weights safely: local folders, hub ids, URLs.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)`` only, so a checkpoint
cannot run code when it is opened. A reference ``name`` is one of

* a local file (``/path/ImageReward.pt``), or a local folder holding ``filename``;
* an ``http(s)://`` URL (downloaded once into ``cache_dir``, atomically);
* a hub repository id (``THUDM/ImageReward``), fetched with ``huggingface_hub`` (which honours
  ``HF_HUB_OFFLINE`` and ``local_files_only``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from miro.io import atomic_write_with, cache_root, one_line

def is_url(name: str) -> bool:
    return bool(re.match(r"^https?://", str(name)))


def resolve_file(
    name: str | os.PathLike,
    filename: str | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local path of a weight file named by a file path, a folder + filename, a URL or a hub id."""
    name = str(name)
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None:
            raise ValueError(f"{name!r} is a folder; a filename inside it is needed")
        f = p / filename
        if not f.is_file():
            raise ValueError(f"{filename!r} not found in folder {name!r}")
        return f
    if is_url(name):
        return _download_url(name, cache_dir=cache_dir, local_files_only=local_files_only)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"local path {name!r} does not exist")
    if filename is None:
        raise ValueError(f"{name!r} is neither a local file nor a URL; give a filename to fetch from that hub repository")
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(repo_id=name, filename=filename, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    )


def _download_url(url: str, *, cache_dir=None, local_files_only: bool = False) -> Path:
    from urllib.parse import unquote, urlparse

    root = Path(cache_dir) if cache_dir else cache_root() / "rewards"
    target = root / unquote(Path(urlparse(url).path).name)
    if target.is_file():
        return target
    if local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{url} is not cached at {target} and downloads are disabled (local_files_only / HF_HUB_OFFLINE)")
    # atomic: a killed download never leaves a truncated file behind
    atomic_write_with(target, lambda tmp: torch.hub.download_url_to_file(url, tmp, progress=True))
    return target


def load_state_dict(path: str | os.PathLike, *, unwrap: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or pickled checkpoint, read without executing code.

    Pickled checkpoints go through ``torch.load(weights_only=True)``; a dict wrapping the weights
    under one of ``unwrap`` (``ckpt['state_dict']`` for HPS, ``ckpt['model']`` for BLIP) is
    unwrapped. Non-tensor entries (epoch counters, names) are dropped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import pickle

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: nothing of it ran
        # torch's message advises weights_only=False; keep only the line naming the refused object
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), one_line(e))
        raise ValueError(f"{path} is not a plain weights file and is not loaded: it pickles objects other than "
                         f"tensors ({why})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    for key in unwrap:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def snapshot_dir(
    name: str | os.PathLike,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder for a hub id (downloading ``allow_patterns``) or the folder itself."""
    p = Path(str(name)).expanduser()
    if p.is_dir():
        return p
    if str(name).startswith((".", "/", "~")):
        raise ValueError(f"local folder {str(name)!r} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(name), allow_patterns=allow_patterns, revision=revision, local_files_only=local_files_only))


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming the offending keys."""
    _report_mismatch(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def _report_mismatch(own: dict, state_dict: dict, what: str) -> None:
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or bad_shape:
        parts = [_key_list(label, keys) for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)) if keys]
        raise ValueError(f"{what}: checkpoint does not match the model; " + "; ".join(parts))


def _key_list(label: str, keys: list[str]) -> str:
    return f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"


def build_and_load(factory, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Construct ``factory()`` without allocating random weights, then load ``state_dict`` strictly.

    The module is built on the meta device and the checkpoint tensors are assigned in place, so
    a billion-parameter reward model is not first initialised at random. Non-persistent
    ``position_ids`` buffers (absent from checkpoints) are rebuilt as ``arange``.
    """
    with torch.device("meta"):
        module = factory()
    _report_mismatch(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True, assign=True)
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if not name.endswith("position_ids"):
                    raise ValueError(f"{what}: buffer {name!r} is not in the checkpoint and cannot be rebuilt")
                mod._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    return module


def from_pretrained_strict(cls, name, what: str, **kwargs):
    """``cls.from_pretrained(name, **kwargs)`` that refuses a checkpoint lacking some of the
    model's weights. transformers fills those with random values and only prints a table, so a
    damaged or mismatched folder would score at random instead of failing."""
    model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    if missing:
        raise ValueError(f"{what} ({name}): checkpoint does not match the model; {_key_list('missing', missing)}")
    return model


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from miro.hub import parse_device

    return parse_device(device)


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point dtype; expected float32, float16 or bfloat16")
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(names)} or a torch.dtype")
    return names[str(dtype)]
