"""Hub and file helpers shared by the pipeline and the encoders.

Offline handling: huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import time, so an
environment variable set later (a test fixture, a notebook cell) would be ignored and every
lookup would wait on network retries. :func:`hub_offline` reads the variable at call time, and
the loaders turn it into ``local_files_only=True``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

import miro.io as _io

_TRUE = {"1", "true", "yes", "on"}


def env_flag(var: str) -> bool:
    """Whether environment variable ``var`` is set to a true value, as the hub libraries read it."""
    return os.environ.get(var, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was at import."""
    if env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def clean_hub_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Drop ``None`` values and force ``local_files_only`` when offline."""
    out = {k: v for k, v in kwargs.items() if v is not None}
    if hub_offline():
        out["local_files_only"] = True
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and a rename."""
    _io.atomic_write_bytes(path, data, fsync=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    _io.atomic_write_json(path, obj, indent=2, fsync=True)


# ---------------------------------------------------------------------------------------------
# Pipeline folders
# ---------------------------------------------------------------------------------------------
# The published layout (miro-t2i `miro/pipeline.py`: _PIPELINE_FILES); `reward_bins.json` is ours
# and optional.
PIPELINE_FILES = ("config.json", "model.safetensors", "uncond_embedding.npy")
OPTIONAL_FILES = ("reward_bins.json",)
# A seeded-initialisation pipeline (the untrained demo) carries `init.json` ({"seed": s}) in place
# of `model.safetensors`: its weights are MiroModel.from_config(config, generator seeded s), so
# shipping megabytes of random numbers is unnecessary.
INIT_FILE = "init.json"
BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "pipelines"


class MissingFileError(ValueError, FileNotFoundError):
    """A pipeline folder lacks a required file (both a ValueError and a FileNotFoundError)."""


def builtin_pipelines() -> list[str]:
    """Names of the pipelines shipped as package data (``miro/assets/pipelines/<name>/``)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())


def list_variants(root: str | Path) -> list[str]:
    """Subfolders of ``root`` that hold a pipeline (a ``config.json``)."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def check_variant_name(variant: str | None) -> None:
    """A variant is one plain subfolder name (or None): never a path that leaves the folder."""
    if variant and (not isinstance(variant, str) or "/" in variant or "\\" in variant or variant in (".", "..")):
        raise ValueError(f"variant must be a plain subfolder name; got {variant!r}")


def parse_device(device) -> torch.device:
    """``torch.device(device)``, a bad name being a ValueError that names the argument (torch's own
    lists ~20 device types and names none)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; expected e.g. 'cpu', 'cuda' or 'cuda:1'") from None


def check_device_available(device) -> torch.device:
    """The device, or a ValueError when it is not one or its backend is missing here, before any
    weights move there (torch's own error comes after the load: an AssertionError on a CPU-only build)."""
    device = parse_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available here; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use 'cpu'")
    return device


def _select_variant(root: Path, variant: str | None, where: str) -> Path:
    if variant:
        check_variant_name(variant)
        base = root / variant
        if not (base / "config.json").is_file():
            raise ValueError(
                f"variant {variant!r} not found in {where}; available variants: "
                f"{list_variants(root) or 'none (it is a single pipeline; pass variant=None)'}"
            )
        return base
    if not (root / "config.json").is_file():
        variants = list_variants(root)
        if variants:
            raise ValueError(f"{where} holds several pipelines; pass variant= one of {variants}")
    return root


def check_pipeline_files(base: Path) -> dict[str, Path]:
    files = {}
    for name in PIPELINE_FILES:
        path = base / name
        if name == "model.safetensors" and not path.is_file() and (base / INIT_FILE).is_file():
            files[INIT_FILE] = base / INIT_FILE
            continue
        if not path.is_file():
            raise MissingFileError(f"pipeline folder {str(base)!r} is missing {name!r} (needs {list(PIPELINE_FILES)})")
        files[name] = path
    for name in OPTIONAL_FILES:
        if (base / name).is_file():
            files[name] = base / name
    return files


def resolve_pipeline_dir(
    name_or_path: str | os.PathLike,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> dict[str, Path]:
    """Locate a pipeline's files: a built-in name, a local folder, or a hub repo id.

    A local pipeline folder comes first, then a built-in name, both before any hub lookup. A hub repo is fetched with
    ``snapshot_download`` restricted to the chosen variant's files. Returns ``{filename: path}``.
    """
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name:
        raise ValueError(f"pipeline name or path must be a non-empty string; got {name_or_path!r}")
    path = Path(name).expanduser()
    builtin = "/" not in name and (BUILTIN_DIR / name / "config.json").is_file()
    # A local pipeline folder comes first, as in diffusers: `save_pretrained("shapes")` then
    # `from_pretrained("shapes")` loads what was saved. A folder that holds no pipeline (a dataset
    # folder that happens to be called `shapes`) does not hide the built-in.
    if path.is_dir() and (not builtin or (path / "config.json").is_file() or list_variants(path)):
        if builtin:
            warnings.warn(f"{name!r}: loading the local folder {str(path.resolve())!r}, not the built-in pipeline "
                          f"of that name (pass {str(BUILTIN_DIR / name)!r} for the built-in)", stacklevel=3)
        return check_pipeline_files(_select_variant(path, variant, f"folder {name!r}"))
    if builtin:
        return check_pipeline_files(_select_variant(BUILTIN_DIR / name, variant, f"built-in {name!r}"))
    if not looks_like_hub_id(name):
        raise ValueError(
            f"{name!r} is not a built-in pipeline ({builtin_pipelines()}), an existing folder, "
            "or a hub repo id of the form 'owner/name'"
        )
    return _download(name, variant, revision, cache_dir, local_files_only, token)


_FILE_SUFFIXES = {".ckpt", ".safetensors", ".json", ".pt", ".pth", ".bin", ".npy", ".yaml"}


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name``, found neither as a folder nor as a built-in, is taken for a hub repo id
    ('owner/name') rather than a missing local path."""
    # A dot is common in hub names ("owner/model-v1.5"); only a file suffix marks a missing local file.
    return (Path(name).suffix.lower() not in _FILE_SUFFIXES and not name.startswith((".", "/", "~"))
            and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None)


def check_local_pipeline(name: str, variant: str | None = None) -> None:
    """:func:`resolve_pipeline_dir`'s checks for a folder or built-in name, whose ValueError names
    what is allowed; a hub id is left alone (checking it would mean fetching it)."""
    if Path(name).expanduser().is_dir() or not looks_like_hub_id(name):
        resolve_pipeline_dir(name, variant)


def _download(repo_id, variant, revision, cache_dir, local_files_only, token) -> dict[str, Path]:
    from huggingface_hub import snapshot_download

    prefix = f"{variant}/" if variant else ""
    patterns = [prefix + f for f in PIPELINE_FILES + OPTIONAL_FILES]
    kw = clean_hub_kwargs(revision=revision, cache_dir=cache_dir, token=token,
                          local_files_only=local_files_only or None)
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns, **kw))
    except Exception as e:
        offline = kw.get("local_files_only", False)
        how = ("offline mode (HF_HUB_OFFLINE or local_files_only) and the files are not in the "
               "hub cache" if offline else "the hub could not be reached or the repo does not exist")
        raise OSError(
            f"could not fetch pipeline {repo_id!r}{f' variant {variant!r}' if variant else ''}: {how} "
            f"({type(e).__name__}: {_io.one_line(e)}). Pass a local pipeline folder or a built-in name "
            f"({builtin_pipelines()})."
        ) from e
    base = root / variant if variant else root
    if not (base / "config.json").is_file():
        if variant:
            raise ValueError(
                f"variant {variant!r} not found in {repo_id!r}; available variants: "
                f"{_remote_variants(repo_id, revision, token)}"
            )
        raise ValueError(
            f"{repo_id!r} has no config.json at its root; it may hold variants: "
            f"{_remote_variants(repo_id, revision, token)} (pass variant=)"
        )
    return check_pipeline_files(base)


def _remote_variants(repo_id, revision, token) -> list[str] | str:
    if hub_offline():
        return "unknown while offline"
    try:
        from huggingface_hub import HfApi

        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception as e:  # listing is a courtesy for the error message only
        return f"unknown ({type(e).__name__})"
    return sorted({f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/config.json")})


# ---------------------------------------------------------------------------------------------
# Model weights and dtypes
# ---------------------------------------------------------------------------------------------
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: Any) -> torch.dtype | None:
    """``torch.float32`` / ``"fp32"`` / ``"bfloat16"`` / ... -> a floating torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in set(_DTYPES.values()):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: {sorted(_DTYPES)} or the torch dtypes")

def np_save(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temp name
        np.save(f, arr, allow_pickle=False)


def read_pipeline_file(path: Path, read: Callable[[Path], Any], kind: str):
    """``read(path)``, a damaged file (truncated, not JSON, not a ``.npy``...) being one ValueError
    that names it; json, numpy and safetensors each raise their own types, without the path."""
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the file's name, whatever the reader raised
        from miro.io import one_line

        what = str(e) if type(e).__name__ in ("ValueError", "OSError") else f"{type(e).__name__}: {e}"
        if "pickled" in what:  # numpy's guess for any non-.npy file; the file is simply not one
            what = "not a .npy file"
        raise ValueError(f"{path} is not a readable {kind} ({one_line(what)})") from e


def init_model(config: Mapping[str, Any], init: Mapping[str, Any]):
    """A seeded fresh initialisation (``init.json`` = ``{"seed": s}``), for untrained demos."""
    from miro.models.model import MiroModel

    seed = init.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"init.json needs an integer 'seed'; got {seed!r}")
    model = MiroModel.from_config(dict(config), generator=torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def build_model(config: Mapping[str, Any], weights: Path):
    """``MiroModel.from_config`` + the safetensors file, checked tensor by tensor.

    The model is built by :func:`model_from_state` (no random init of weights about to be
    overwritten).
    """
    from safetensors.torch import load_file

    for key in ("network", "preconditioning", "data_preprocessing", "postprocessing"):
        if key not in config:
            raise ValueError(f"config.json has no {key!r} section (needs network, preconditioning, "
                             "data_preprocessing, postprocessing)")
    # Half-precision files (a smaller download or transfer) load as float32, the pipeline's default
    # dtype, as diffusers does without torch_dtype; from_pretrained(dtype=...) casts afterwards.
    # Always a copy: load_file's tensors sit at the file's byte offsets, not aligned as torch's own
    # allocations are, and on CPU misaligned weights take other (non-bitwise-equal) GEMM kernels, so a
    # float32 save -> load would not reproduce the saved pipeline's images exactly.
    state = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
             for k, v in read_pipeline_file(weights, lambda p: load_file(str(p)), "safetensors file").items()}
    try:
        model = model_from_state(config, state)
    except ValueError as e:
        raise ValueError(f"{weights} does not match its config.json: {e}") from None
    return model.eval().requires_grad_(False)


def model_from_state(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
    """``MiroModel.from_config(config)`` holding ``state`` (checked tensor by tensor), built on the
    meta device and the tensors assigned in; if anything were left on meta (a tensor ``state``
    does not carry), built normally and loaded again. The caller's global RNG is left as it was
    (a normal build draws the random init that the weights then replace)."""
    from miro.models.model import MiroModel

    try:
        with torch.device("meta"):
            model = MiroModel.from_config(dict(config))
    except (RuntimeError, NotImplementedError):  # a constructor step that needs real values
        model = None
    if model is not None:
        model.load_state_dict_checked(dict(state), assign=True)
    if model is None or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        with torch.random.fork_rng(devices=[]):
            model = MiroModel.from_config(dict(config))
        model.load_state_dict_checked(dict(state))
    return model
