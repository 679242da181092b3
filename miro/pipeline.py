"""``MiroPipeline``: text -> reward-steered flow sampling -> images.

Loads the published checkpoint layout (``config.json``, ``model.safetensors`` with the
``network.`` / ``preconditioning.`` / ``data_preprocessing.`` / ``postprocessing.`` prefixes,
``uncond_embedding.npy``; ``variant=`` is a subfolder, as in ``nicolas-dufour/miro-ablations``)
from a built-in name, a local folder or a hub repo, and generates in the published order of
operations (spec §5): encode text (padded to ``max_text_len``, mask kept, float32), repeat each
prompt's row ``num_images_per_prompt`` times (copies adjacent), build positive/negative reward
targets (defaults 1.0 / 0.0), draw the initial noise once from the user's generator, run the
Euler sampler with batched multi-reward CFG, undo the latent normalisation, decode, and convert
to uint8 by truncation.

Our pipelines add two ``config.json`` keys, ``text_encoder`` and ``autoencoder`` (defaults: the
published ``google/flan-t5-xl`` and ``stabilityai/sdxl-vae``), and may carry ``reward_bins.json``
(quantile edges per reward) so that raw reward scores can be turned into targets.

Example::

    >>> from miro import MiroPipeline
    >>> pipe = MiroPipeline.from_pretrained("shapes")
    >>> images = pipe("two red circles above a blue square", num_inference_steps=20,
    ...               reward_targets={"shapes_alignment": 1.0},
    ...               generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from miro import REWARD_KEYS
from miro.encoders.autoencoder import SDXL_VAE, load_autoencoder, to_uint8, to_unit
from miro.encoders.text import FLAN_T5_XL, load_text_encoder
from miro.hub import (
    _DTYPES,
    INIT_FILE,
    OPTIONAL_FILES,
    PIPELINE_FILES,
    atomic_write_json,
    build_model,
    init_model,
    np_save,
    check_device_available,
    check_variant_name,
    parse_dtype,
    read_pipeline_file,
    resolve_pipeline_dir,
)
from miro.io import atomic_write_with, one_line
from miro.models.sampler import is_real

OUTPUT_TYPES = ("pil", "np", "numpy", "pt", "latent")
DEFAULT_MAX_TEXT_LEN = 77  # published default of config["max_text_len"]
# safetensors header dtype -> torch dtype, for from_pretrained(torch_dtype="auto").
_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _as_scalar(v: Any) -> float | None:
    """``v`` as a float if it is one real number (Python/numpy number, or a 0-d / 1-element
    array or tensor, as ``score_to_target`` returns for one score); else None."""
    if is_real(v):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool and not v.is_complex():
        return float(v.reshape(()).item())
    if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "iuf":
        return float(v.reshape(()).item())
    return None


def _caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel (from the function calling this) of the first frame outside
    this module and torch's ``no_grad`` wrapper: the user's ``pipe(...)`` or ``encode_prompt`` line."""
    import sys

    wrapper = os.path.join("torch", "utils", "_contextlib.py")
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.endswith(wrapper)):
        frame, level = frame.f_back, level + 1
    return level


def _is_auto(dtype: Any) -> bool:
    return isinstance(dtype, str) and dtype.lower() == "auto"


class MiroPipelineOutput(list):
    """``output_type="pil"``: the list of images itself (``images[0]``, ``len``, iteration work as
    before) with diffusers' ``.images``. Unlike diffusers' ``ImagePipelineOutput``, ``out[0]`` is
    the first image (a list's meaning), not the images field."""

    @property
    def images(self) -> "MiroPipelineOutput":
        return self


class _ImageArray(np.ndarray):
    """``output_type="np"``: the uint8 array itself, plus ``.images`` (a plain ndarray view)."""

    @property
    def images(self) -> np.ndarray:
        return self.view(np.ndarray)

    def __reduce_ex__(self, protocol):  # pickles as a plain ndarray (no import of this class needed)
        return self.view(np.ndarray).__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return repr(self.images)


class _ImageTensor(torch.Tensor):
    """``output_type="pt"``/``"latent"``: the tensor itself, plus ``.images`` (a plain tensor)."""

    # As nn.Parameter does: results of operations are plain tensors, so the subclass does not spread.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def images(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol):
        # torch.save / pickle store a plain tensor, so torch.load(weights_only=True) reads it back.
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):  # torch's default needs new_empty() to keep the subclass
        return self.images.clone().as_subclass(_ImageTensor)

    def __repr__(self, *, tensor_contents=None) -> str:
        return repr(self.images)


def _with_images(images: Any) -> Any:
    """The call's result with an ``.images`` attribute, its type otherwise unchanged."""
    if isinstance(images, torch.Tensor):
        return images.as_subclass(_ImageTensor)
    if isinstance(images, np.ndarray):
        return images.view(_ImageArray)
    return MiroPipelineOutput(images)


def _stored_float_dtype(files: Mapping[str, Path]) -> torch.dtype:
    """The one floating dtype ``model.safetensors`` stores its weights in (read from the header
    only), or float32 if there is no file, the dtypes are mixed or not a pipeline dtype."""
    path = files.get("model.safetensors")
    if path is None:
        return torch.float32
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()} - {"BOOL"}
    return _STORED_DTYPES.get(stored.pop(), torch.float32) if len(stored) == 1 else torch.float32


def _scales(w_r):
    """``reward_guidance_scale`` as the sampler takes it: None, a float, or {key: float}."""
    if w_r is None:
        return None
    return {k: float(v) for k, v in w_r.items()} if isinstance(w_r, Mapping) else float(w_r)


def _holds_pipeline_config(folder: Path) -> bool:
    """Whether ``folder/config.json`` is a pipeline's (a JSON object with a ``network`` section)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "network" in cfg


class MiroPipeline(nn.Module):
    """A MIRO model with its text encoder, autoencoder and unconditional text embedding.

    Args:
        model: a ``MiroModel`` (submodules ``network``, ``preconditioning``,
            ``data_preprocessing``, ``postprocessing``; its ``state_dict`` is the published file).
        text_encoder: a ``TextEncoder`` (or a spec for ``load_text_encoder``).
        autoencoder: a ``Codec`` (or a spec for ``load_autoencoder``).
        config: the ``config.json`` dict.
        uncond_embedding: (L_u, E) or (E,) unconditional text embedding.
        reward_bins: optional ``RewardBins`` (quantile edges per reward) for ``score_to_target``.
    """

    def __init__(self, model, text_encoder, autoencoder, config: Mapping[str, Any],
                 uncond_embedding, reward_bins=None):
        super().__init__()
        self.config = copy.deepcopy(dict(config))
        self.model = model.eval()
        self.text_encoder = load_text_encoder(
            text_encoder, max_length=int(self.config.get("max_text_len", DEFAULT_MAX_TEXT_LEN))
        )
        self.autoencoder = load_autoencoder(autoencoder)
        uncond = torch.as_tensor(np.asarray(uncond_embedding, dtype=np.float32)
                                 if not isinstance(uncond_embedding, torch.Tensor)
                                 else uncond_embedding.float())
        if uncond.dim() == 1:  # published: a 1-D file is one token
            uncond = uncond[None]
        label_dim = self.config.get("network", {}).get("label_dim")
        if uncond.dim() != 2 or (label_dim is not None and uncond.shape[1] != int(label_dim)):
            raise ValueError(
                f"uncond_embedding must be (L_u, {label_dim}); got {tuple(uncond.shape)}"
            )
        self.register_buffer("uncond_embedding", uncond.contiguous(), persistent=False)
        from miro.models.flow import Scheduler

        Scheduler.from_config(self.config.get("scheduler"))  # a bad section fails at load, not at the first call
        self.reward_bins = reward_bins
        self.autocast: bool | None = None  # None: the sampler default (bf16 on CUDA, as published)
        self._progress_bar_config: dict[str, Any] = {}  # tqdm kwargs (set_progress_bar_config)
        self.source: str | None = None  # where the pipeline was loaded from
        self._device = torch.device("cpu")
        self._dtype = torch.float32

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        text_encoder: Any = None,
        vae: Any = None,
        token: str | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool | None = None,
    ) -> "MiroPipeline":
        """Load a pipeline from a built-in name (``shapes``, ``shapes-untrained``), a folder in
        the published layout, or a hub repo id (``snapshot_download`` of the variant's files
        only; ``local_files_only`` and ``HF_HUB_OFFLINE`` are honoured).

        ``variant`` selects a subfolder. ``dtype`` and ``torch_dtype`` are aliases. ``"auto"`` is
        the dtype the weights are stored in on a CUDA ``device`` and float32 otherwise (half
        precision generates on CUDA only). ``text_encoder`` and ``vae`` override the config's
        encoders (a name, a folder, a hub id or an object).

        ``use_safetensors`` and ``low_cpu_mem_usage`` are accepted for diffusers compatibility:
        weights are always ``model.safetensors`` (``use_safetensors=False`` is refused), and the
        model is always built on the meta device before its weights are assigned.
        """
        if use_safetensors is False:
            raise ValueError("use_safetensors=False: MIRO pipelines store their weights only as "
                             "model.safetensors; pass use_safetensors=True or leave it out")
        if device is not None:  # before the download and the load, not after
            check_device_available(device)
        # "auto" is resolved once the folder is known (it reads the stored dtype); explicit wins.
        dt = None if _is_auto(dtype) else parse_dtype(dtype)
        tdt = None if _is_auto(torch_dtype) else parse_dtype(torch_dtype)
        if dt is not None and tdt is not None and dt != tdt:
            raise ValueError(f"dtype={dt} and torch_dtype={tdt} disagree; pass one of them")
        dt = dt or tdt
        files = resolve_pipeline_dir(repo_id_or_dir, variant, revision, cache_dir,
                                     local_files_only, token)
        if dt is None and (_is_auto(dtype) or _is_auto(torch_dtype)):
            on_cuda = device is not None and torch.device(device).type == "cuda"
            dt = _stored_float_dtype(files) if on_cuda else torch.float32
        read_json = lambda p: json.loads(p.read_text(encoding="utf-8"))  # noqa: E731
        config = read_pipeline_file(files["config.json"], read_json, "JSON file")
        if "model.safetensors" in files:
            model = build_model(config, files["model.safetensors"])
        else:
            model = init_model(config, read_pipeline_file(files["init.json"], read_json, "JSON file"))
        uncond = read_pipeline_file(files["uncond_embedding.npy"], lambda p: np.load(p, allow_pickle=False),
                                    ".npy array")
        bins = None
        if "reward_bins.json" in files:
            from miro.rewards.binning import RewardBins

            bins = read_pipeline_file(files["reward_bins.json"], RewardBins.load, "reward bins file")
        hub = dict(cache_dir=cache_dir, local_files_only=local_files_only or None, token=token)
        max_len = int(config.get("max_text_len", DEFAULT_MAX_TEXT_LEN))
        text = load_text_encoder(
            text_encoder if text_encoder is not None else config.get("text_encoder", FLAN_T5_XL),
            max_length=max_len, **hub,
        )
        codec = load_autoencoder(vae if vae is not None else config.get("autoencoder", SDXL_VAE), **hub)
        chunk = (config.get("postprocessing") or {}).get("max_batch_size")
        if chunk is not None and hasattr(codec, "max_batch_size"):  # published VAEDecoderPostProcessing's
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"config.json postprocessing.max_batch_size must be an integer >= 1; got {chunk!r}")
            codec.max_batch_size = chunk
        pipe = cls(model, text, codec, config, uncond, reward_bins=bins)
        pipe.source = str(files["config.json"].parent)
        if device is not None or dt is not None:
            pipe.to(device=device, dtype=dt)
        return pipe

    # ------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None,
                        dtype: str | torch.dtype = torch.float32) -> Path:
        """Write the published layout (plus ``text_encoder``/``autoencoder`` config keys and
        ``reward_bins.json`` when bins exist) into ``save_directory[/variant]``, atomically per
        file. Floating tensors are stored in float32 and bool masks as bool, as published;
        ``dtype="float16"`` (or bfloat16) stores the weights at half the size instead, which
        ``from_pretrained`` reads back into float32 (the uncond embedding stays float32)."""
        from safetensors.torch import save_file

        store = parse_dtype(dtype)
        if store is None:
            raise ValueError("dtype=None: name the storage dtype, e.g. 'float32' or 'float16'")
        check_variant_name(variant)  # the name from_pretrained would take back: no "../x"
        out = Path(save_directory) / variant if variant else Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; the pipeline goes into a folder (new, empty, or an earlier pipeline's)")
        # Over an earlier pipeline the files are replaced; a folder of other files is not written into
        # (their config.json or reward_bins.json would be replaced or removed without a word).
        if out.is_dir() and not _holds_pipeline_config(out):
            # what a killed save leaves (pipeline files without config.json) may be saved over; a
            # config.json that is not a pipeline's is someone else's
            ours = set(PIPELINE_FILES + OPTIONAL_FILES + (INIT_FILE,)) - {"config.json"}
            others = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.name not in ours)
            if others:
                raise ValueError(f"{out} holds files but no pipeline ({', '.join(others[:4])}"
                                 f"{' ...' if len(others) > 4 else ''}); save into a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config["text_encoder"] = getattr(self.text_encoder, "spec", config.get("text_encoder", FLAN_T5_XL))
        config["autoencoder"] = getattr(self.autoencoder, "spec", config.get("autoencoder", SDXL_VAE))
        # The encoders are referenced, not copied (published layout): a local folder is written as
        # its path, which another machine (or the hub) will not have.
        local = [f"{k}={v!r}" for k in ("text_encoder", "autoencoder")
                 if isinstance(v := config[k], str) and os.path.isabs(os.path.expanduser(v))]
        if local:
            warnings.warn(f"{out}: config.json refers to local encoder folders ({', '.join(local)}); the folder "
                          "loads only where those paths exist (pass text_encoder=/vae= when loading elsewhere)",
                          UserWarning, stacklevel=2)
        state = {
            k: (v.detach().to(store) if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in self.model.state_dict().items()
        }
        # config.json marks a complete folder and is written last, so over another pipeline's folder
        # it goes first: a save killed midway then leaves a folder that refuses to load, not one
        # that loads the new weights with the old config, uncond embedding and reward bins.
        (out / "config.json").unlink(missing_ok=True)
        atomic_write_with(out / "model.safetensors",
                          lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        uncond = self.uncond_embedding.detach().float().cpu().numpy()
        atomic_write_with(out / "uncond_embedding.npy", lambda tmp: np_save(tmp, uncond))
        if self.reward_bins is not None:
            atomic_write_json(out / "reward_bins.json", self.reward_bins.to_dict())
        else:  # another model's bins would load beside these weights
            (out / "reward_bins.json").unlink(missing_ok=True)
        atomic_write_json(out / "config.json", config)  # last: a folder with a config is complete
        return out

    def push_to_hub(self, repo_id: str, variant: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload MIRO pipeline",
                    revision: str | None = None, dtype: str | torch.dtype = torch.float32) -> str:
        """Save to a temporary folder and upload it to ``repo_id`` (into ``variant/`` if given);
        ``dtype``: how the weights are stored, as in :meth:`save_pretrained`."""
        import tempfile

        from huggingface_hub import HfApi

        from miro.io import one_line

        check_variant_name(variant)  # as save_pretrained and from_pretrained: one plain subfolder name
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, dtype=dtype)
            # What this pipeline lacks but an earlier upload to the same place may hold (another
            # model's reward bins, an untrained pipeline's init.json) is deleted in the same commit,
            # as save_pretrained does locally. Exact names: relative to path_in_repo, so other
            # variants' files are never matched.
            stale = [f for f in OPTIONAL_FILES + (INIT_FILE,) if not (Path(tmp) / f).exists()]
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=variant or None,
                                         commit_message=commit_message, revision=revision,
                                         delete_patterns=stale or None)
            except Exception as e:  # no network, no token, no write access: the hub client's own types
                raise OSError(f"could not upload to the hub repo {repo_id!r} ({type(e).__name__}: {one_line(e)}); "
                              "check the network and the token (HF_TOKEN or `hf auth login`)") from e
        return str(getattr(info, "commit_url", info))

    # ------------------------------------------------------------------------ device, dtype
    def to(self, *args, **kwargs) -> "MiroPipeline":  # type: ignore[override]
        # A dtype may also be named ("float16", "bf16", as from_pretrained's torch_dtype takes it):
        # torch's parser reads a positional string as a device and refuses a string dtype=.
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = parse_dtype(kwargs["dtype"])
        args = tuple(parse_dtype(a) if isinstance(a, str) and a.lower().removeprefix("torch.") in _DTYPES else a
                     for a in args)
        try:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (RuntimeError, TypeError) as e:  # torch lists ~20 device types and names no argument
            raise ValueError(f"MiroPipeline.to: {one_line(e)}; expected a device such as 'cpu', 'cuda' or "
                             f"'cuda:1' and/or a dtype") from None
        dtype = parse_dtype(dtype)
        if device is not None:
            check_device_available(device)
        # float32 whatever the weights' dtype: upstream's .to(bf16) rounds it (spec §6), but it only
        # enters through the text mapping, which runs under bf16 autocast either way: same images
        uncond = self.uncond_embedding
        super().to(device=device, dtype=dtype)  # bool masks stay bool: nn.Module casts floats only
        self.uncond_embedding = uncond.to(device=device)
        if device is not None:
            self._device = torch.device(device)
            self.text_encoder.to(self._device)  # the text encoder stays float32 (spec §6)
        if dtype is not None:
            self._dtype = dtype
        if hasattr(self.autoencoder, "to"):
            self.autoencoder.to(device=device, dtype=dtype)
        return self

    # nn.Module's own versions cast the weights behind .to()'s back: the recorded device/dtype
    # would go stale and the autoencoder would keep the old dtype. All of them go through .to().
    def half(self) -> "MiroPipeline":  # type: ignore[override]
        return self.to(dtype=torch.float16)

    def bfloat16(self) -> "MiroPipeline":  # type: ignore[override]
        return self.to(dtype=torch.bfloat16)

    def float(self) -> "MiroPipeline":  # type: ignore[override]
        return self.to(dtype=torch.float32)

    def double(self) -> "MiroPipeline":  # type: ignore[override]
        return self.to(dtype=torch.float64)  # refused by .to() with the allowed dtypes named

    def cuda(self, device: int | str | torch.device | None = None) -> "MiroPipeline":  # type: ignore[override]
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> "MiroPipeline":  # type: ignore[override]
        return self.to("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Keyword arguments for the sampling progress bar (``tqdm``), as in diffusers, e.g.
        ``disable=True``, ``leave=True``, ``desc=...``, ``position=...``. Replaces earlier ones."""
        from tqdm.std import tqdm

        allowed = sorted(set(inspect.signature(tqdm.__init__).parameters)
                         - {"self", "iterable", "total", "kwargs"})  # total: the step count
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"set_progress_bar_config got {unknown}, which tqdm does not take; "
                             f"allowed: {allowed}")
        self._progress_bar_config = dict(kwargs)

    # ------------------------------------------------------------------------------ rewards
    @property
    def coherence_keys(self) -> tuple[str, ...]:
        """Reward keys this checkpoint was trained on, in config order."""
        keys = self.config.get("coherence_keys") or self.config.get("network", {}).get("coherence_keys")
        return tuple(keys) if keys else REWARD_KEYS

    def score_to_target(self, key: str, score):
        """Map a raw reward score to its training value in [0, 1] with ``reward_bins.json``
        (quantile bin index / (B - 1)). The type is kept: a float gives a float, an array an
        array, a tensor a float32 tensor on its device (each usable as a ``reward_targets`` value).
        A NaN score has no target and raises."""
        if self.reward_bins is None:
            raise ValueError("this pipeline has no reward_bins.json; score_to_target needs bin edges")
        if key not in self.reward_bins.edges:
            raise ValueError(f"unknown reward key {key!r}; binned rewards: {sorted(self.reward_bins.edges)}")
        raw = score.detach().cpu().double().numpy() if isinstance(score, torch.Tensor) else score
        try:
            nan = np.isnan(np.asarray(raw, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"score_to_target({key!r}, {score!r}): the score must be a number or an "
                             "array/tensor of numbers") from None
        if nan.any():
            where = "" if nan.ndim == 0 else f" at index {np.argwhere(nan)[0].tolist()}"
            raise ValueError(f"score_to_target({key!r}, ...): the score is NaN{where}; a missing score "
                             "has no target (pass None as the target to drop the reward instead)")
        value = self.reward_bins.value(key, raw)
        if isinstance(score, torch.Tensor):
            return torch.as_tensor(np.asarray(value), dtype=torch.float32).to(score.device)
        return value

    def check_reward_targets(self, targets: Mapping[str, Any] | None, default: float = 1.0,
                             name: str = "reward_targets") -> dict[str, float]:
        """Validate targets and fill every ``coherence_keys`` entry (missing -> ``default``).
        One number per key here; the pipeline call also takes None and per-image values."""
        return self._targets(targets, default, name)  # type: ignore[return-value]

    def _targets(self, targets: Mapping[str, Any] | None, default: float, name: str,
                 num_prompts: int | None = None, num_images_per_prompt: int = 1,
                 ) -> dict[str, float | torch.Tensor | None]:
        """Every ``coherence_keys`` entry: a float (fp32-rounded) for one number -- a Python or
        numpy number, or a 0-d / 1-element array or tensor.

        With ``num_prompts`` (the pipeline call) a value may also be None, dropping that reward
        (the sampler leaves the key out and the network embeds it as zeros, the way training
        embeds a missing reward), or a 1-D list/array/tensor with one value per image (prompts
        x num_images_per_prompt, copies of a prompt adjacent) or one per prompt, returned as a
        float32 CPU tensor of one value per image.
        """
        if targets is None:
            targets = {}
        if not isinstance(targets, Mapping):
            raise ValueError(f"{name} must be a dict of reward key -> value in [0, 1]; got {targets!r}")
        unknown = sorted(set(targets) - set(self.coherence_keys))
        if unknown:
            raise ValueError(
                f"{name} has keys this checkpoint was not trained on: {unknown}; valid keys: "
                f"{list(self.coherence_keys)}"
            )
        out: dict[str, float | torch.Tensor | None] = {}
        for key in self.coherence_keys:
            v = targets.get(key, default)
            x = _as_scalar(v)
            if x is not None:
                if not math.isfinite(x) or not 0.0 <= x <= 1.0:
                    raise ValueError(f"{name}[{key!r}] = {v!r}; targets must be finite numbers in [0, 1]")
                # Read back as a Python float from fp32, as published (spec §5.1).
                out[key] = float(torch.tensor(x, dtype=torch.float32))
            elif num_prompts is None:
                raise ValueError(f"{name}[{key!r}] = {v!r}; targets must be finite numbers in [0, 1] "
                                 "(None and per-image values are taken by the pipeline call only)")
            elif v is None:
                out[key] = None
            else:
                out[key] = self._per_image_target(v, f"{name}[{key!r}]", num_prompts, num_images_per_prompt)
        return out

    @staticmethod
    def _per_image_target(v: Any, where: str, num_prompts: int, per_prompt: int) -> torch.Tensor:
        total = num_prompts * per_prompt
        arr = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if arr.ndim != 1 or arr.dtype.kind not in "iuf":
            raise ValueError(f"{where} = {v!r}; a target is a number in [0, 1], None (drop the reward) "
                             f"or a 1-D list/array/tensor of numbers, one per image ({total}) or per "
                             f"prompt ({num_prompts})")
        if len(arr) not in (total, num_prompts):
            raise ValueError(f"{where} has {len(arr)} values; give one per image ({total} = "
                             f"{num_prompts} prompts x {per_prompt}) or one per prompt ({num_prompts})")
        bad = ~(np.isfinite(arr) & (arr >= 0.0) & (arr <= 1.0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{where}[{i}] = {float(arr[i])!r}; targets must be finite numbers in [0, 1]")
        t = torch.tensor(arr, dtype=torch.float32)
        # One per prompt -> one per image; when per_prompt == 1 the two readings coincide.
        return t.repeat_interleave(per_prompt) if len(arr) != total else t

    # ---------------------------------------------------------------------------- inference
    def check_inputs(self, prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                     output_type, generator, reward_guidance_scale=None, reward_direction="prompt") -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of strings; got {prompt!r}")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"every prompt must be a non-empty string; got {p!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
        if not is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        if isinstance(reward_guidance_scale, Mapping):
            from miro.models.sampler import reward_scale_groups

            reward_scale_groups(tuple(self.coherence_keys), reward_guidance_scale, 0.0)  # raises naming the value
        elif reward_guidance_scale is not None and (not is_real(reward_guidance_scale)
                                                    or not math.isfinite(reward_guidance_scale)
                                                    or reward_guidance_scale < 0):
            raise ValueError(f"reward_guidance_scale must be None or a finite number >= 0 (or a mapping "
                             f"{{reward key: scale}}); got {reward_guidance_scale!r}")
        if reward_direction not in ("prompt", "null"):
            raise ValueError(f"reward_direction must be 'prompt' or 'null'; got {reward_direction!r}")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or isinstance(num_images_per_prompt, bool) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}; got {output_type!r}")
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if not gens or any(g is not None and not isinstance(g, torch.Generator) for g in gens) \
                or (isinstance(generator, (list, tuple)) and None in gens):
            raise ValueError(f"generator must be a torch.Generator, a list of them (one per image) "
                             f"or None; got {generator!r}")
        if isinstance(generator, (list, tuple)) and len(generator) != len(prompts) * num_images_per_prompt:
            raise ValueError(f"got {len(generator)} generators for {len(prompts) * num_images_per_prompt} "
                             "images; pass one per image (prompts x num_images_per_prompt) or a single one")
        return list(prompts)

    @staticmethod
    def _negative_prompts(negative_prompt, n_prompts: int) -> list[str]:
        negs = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negs, (list, tuple)) or not all(isinstance(p, str) for p in negs):
            raise ValueError(f"negative_prompt must be None, a string or a list of strings; got {negative_prompt!r}")
        if len(negs) != n_prompts:
            raise ValueError(f"got {len(negs)} negative prompts for {n_prompts} prompts; pass one per prompt "
                             f"or a single string")
        return list(negs)

    def encode_prompt(self, prompts: Sequence[str], num_images_per_prompt: int = 1):
        """Text embeddings (B·n, L, E) float32 and mask (B·n, L) bool, copies adjacent. Prompts
        longer than ``max_text_len`` tokens are truncated, as published; one warning says so."""
        if isinstance(prompts, str):  # one prompt, not its characters
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        emb, mask = self.text_encoder.encode(prompts)
        self._warn_truncated(prompts)
        width = self.uncond_embedding.shape[1]
        if emb.shape[-1] != width:
            raise ValueError(f"text encoder {self.text_encoder!r} gives {emb.shape[-1]}-d embeddings; "
                             f"this model was trained on {width}-d text (label_dim)")
        emb, mask = emb.to(self._device, torch.float32), mask.to(self._device)
        if num_images_per_prompt > 1:
            emb = emb.repeat_interleave(num_images_per_prompt, dim=0)
            mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        return emb, mask

    def _warn_truncated(self, prompts: Sequence[str]) -> None:
        # Only Hugging Face encoders expose their tokenizer; re-tokenising without truncation is
        # cheap next to the encoder's forward. Other encoders are not checked.
        from miro.encoders.text import HFTextEncoder

        enc = self.text_encoder
        if not isinstance(enc, HFTextEncoder) or enc.tokenizer is None:
            return
        ids = enc.tokenizer(list(prompts), truncation=False, padding=False, verbose=False)["input_ids"]
        over = [(i, len(t) - enc.max_length) for i, t in enumerate(ids) if len(t) > enc.max_length]
        if not over:
            return
        shown = "; ".join(f"prompt {i} ({prompts[i][:40]!r}{'...' if len(prompts[i]) > 40 else ''}): "
                          f"{n} token{'s' if n > 1 else ''} dropped" for i, n in over[:3])
        more = f"; and {len(over) - 3} more" if len(over) > 3 else ""
        warnings.warn(f"{len(over)} of {len(prompts)} prompts are longer than the text encoder's "
                      f"{enc.max_length} tokens (max_text_len) and were truncated: {shown}{more}",
                      UserWarning, stacklevel=_caller_stacklevel())

    def _noise_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """(B, C, res, res): the shape of the initial noise (``latents=``) and of ``output_type="latent"``."""
        net = self.config["network"]
        res = int(self.config.get("data_resolution", net["data_size"]))
        return (batch_size, int(net["num_input_channels"]), res, res)

    def prepare_noise(self, batch_size: int, generator, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The single random draw of inference: fp32 (B, C, res, res) from ``generator``.

        With a list of generators (one per image), row k is drawn from ``generator[k]`` exactly
        as a batch of one, so an image depends on its own seed only (batching never changes it).
        Given ``latents`` (the user's own noise, in the model's normalised latent space), they are
        checked and used instead (moved to the pipeline's device as fp32); nothing is drawn.
        """
        shape = self._noise_shape(batch_size)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() \
                    or tuple(latents.shape) != shape:
                got = (f"{latents.dtype} tensor of shape {tuple(latents.shape)}"
                       if isinstance(latents, torch.Tensor) else type(latents).__name__)
                raise ValueError(f"latents must be a floating tensor of shape {shape} (prompts x "
                                 f"num_images_per_prompt, channels, resolution, resolution); got {got}")
            latents = latents.to(self._device, torch.float32)
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values")
            return latents
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image "
                                 f"or a single one")
            return torch.cat([self.prepare_noise(1, g) for g in generator])
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, a list of them or None; got {generator!r}")
        gen_device = generator.device if generator is not None else self._device
        # A CPU generator on a CUDA pipeline draws on the CPU and moves the noise (diffusers'
        # rule); a generator on the pipeline's device draws there, as published.
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        return noise.to(self._device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        reward_targets: Mapping[str, float] | None = None,
        negative_reward_targets: Mapping[str, float] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        batched_cfg: bool = True,
        reward_guidance_scale: float | Mapping[str, float] | None = None,
        reward_direction: str = "prompt",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
    ):
        """Generate images.

        Args:
            prompt: a prompt or a list of prompts (non-empty strings).
            reward_targets: reward key -> target in [0, 1] for the conditional branch; missing
                keys default to 1.0 (published). A value may be one number (also a 0-d or
                1-element array/tensor, as ``score_to_target`` gives), a 1-D list/array/tensor
                with one value per image or per prompt, or None: the reward is dropped (not
                conditioned on; the network's zero embedding), in the negative branch too unless
                ``negative_reward_targets`` names the key.
            negative_reward_targets: the same for the unconditional branch; default 0.0.
            num_inference_steps: Euler steps (>= 1). guidance_scale: w >= 0 in
                ``(1 + w)·cond - w·uncond``; 0 disables guidance.
            num_images_per_prompt: images per prompt; each prompt's images are adjacent.
            generator: the only source of randomness (one noise draw); or a list with one
                generator per image (row k of the noise drawn from generator k alone).
            output_type: ``"pil"`` (list of PIL images), ``"np"``/``"numpy"`` (uint8 NHWC, truncating
                cast as published), ``"pt"`` (float NCHW in [0, 1]) or ``"latent"`` (the sampler's
                fp32 x0 (B, C, res, res) in the model's normalised latent space, before
                ``decode_latents``).
            callback: ``callback(step, gamma_next, x)``, called by the sampler after every step.
            batched_cfg: one 2B forward per step (published) or two B forwards (less memory).
            reward_guidance_scale: w_r >= 0 for the reward direction alone, or None (default: w,
                the published single scale). Set, a third branch (prompt, negative targets)
                splits guidance into ``w_r·[v(prompt, r+) - v(prompt, r-)]`` and
                ``w·[v(prompt, r-) - v(null, r-)]`` (``miro.models.sampler.euler_sample``), so the
                rewards can be pushed harder or softer than the prompt; 3B per step.
            reward_direction: ``"prompt"`` (above) or ``"null"``: the third branch is
                (null text, r+), giving ``w·[v(prompt, r+) - v(null, r+)] + w_r·[v(null, r+) -
                v(null, r-)]``; w_r = 0 there is text-only guidance at the positive targets.
                A mapping ``{reward key: w_k}`` gives each reward its own scale (keys left out:
                w): the rewards are turned to their negative targets one step at a time, in the
                mapping's order, each step guided at its own scale (``euler_sample``); every
                scale = w is the published call.
            latents: the initial noise instead of a draw from ``generator`` (which is then not
                used): a float tensor (prompts x num_images_per_prompt, C, res, res) in the
                model's normalised latent space, as ``torch.randn`` gives.
            negative_prompt: the text of the unconditional branch instead of the stored empty
                prompt's embedding (None, the published guidance): one string for every prompt or
                one per prompt. It replaces the null text wherever guidance uses it (also the
                ``reward_direction="null"`` branches).
            return_dict: True (default): the images, with diffusers' ``.images`` attribute (for
                ``"pil"`` a list subclass, ``MiroPipelineOutput``; else the array or tensor
                itself). False: the 1-tuple ``(images,)`` of the plain list/array/tensor.
        """
        # 1. Check inputs.
        prompts = self.check_inputs(prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    output_type, generator, reward_guidance_scale, reward_direction)
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False; got {return_dict!r}")
        negatives = None if negative_prompt is None else self._negative_prompts(negative_prompt, len(prompts))
        if self._dtype != torch.float32 and self._device.type != "cuda":
            raise ValueError(
                f"generation in {self._dtype} needs a CUDA device (autocast keeps the norms in "
                f"float32 there); on {self._device.type} use dtype=torch.float32"
            )
        n = int(num_images_per_prompt)
        pos = self._targets(reward_targets, 1.0, "reward_targets", len(prompts), n)
        neg = self._targets(negative_reward_targets, 0.0, "negative_reward_targets", len(prompts), n)
        # A reward dropped from the positive targets is dropped from the negative ones as well
        # (unless named there): "not conditioned on" then holds in both branches.
        for key, value in pos.items():
            if value is None and key not in (negative_reward_targets or {}):
                neg[key] = None
        # 2. Encode text; copies of a prompt are adjacent (repeat_interleave).
        emb, mask = self.encode_prompt(prompts, n)
        batch = emb.shape[0]
        # 3. The one noise draw (or the caller's latents).
        noise = self.prepare_noise(batch, generator, latents)
        # 4. Unconditional text: the stored tokens, all valid; or the negative prompts' own.
        if negative_prompt is None:
            uncond = self.uncond_embedding.to(self._device)
            uncond_emb = uncond[None].expand(batch, -1, -1)
            uncond_mask = torch.ones(uncond_emb.shape[:2], dtype=torch.bool, device=self._device)
        else:
            uncond_emb, uncond_mask = self.encode_prompt(negatives, n)
        # 5. Sample in the model's normalised space.
        x0 = self._sample(noise, emb, mask, uncond_emb, uncond_mask, pos, neg,
                          int(num_inference_steps), float(guidance_scale), bool(batched_cfg), callback,
                          _scales(reward_guidance_scale),
                          reward_direction)
        if not torch.isfinite(x0).all():  # would decode to black images without a word
            raise ValueError(f"sampling diverged to NaN or infinite values (guidance_scale={guidance_scale}, "
                             f"reward_guidance_scale={reward_guidance_scale}); use smaller guidance scales")
        # 6.-7. Undo the latent normalisation, decode and convert (not for "latent").
        images = x0 if output_type == "latent" else self._decode(x0, output_type)
        return _with_images(images) if return_dict else (images,)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Images from ``output_type="latent"``'s x0: undo the latent normalisation, decode and
        convert exactly as a call does (``output_type`` "pil", "np"/"numpy" or "pt"; the result
        has ``.images`` as a call's does)."""
        if output_type not in OUTPUT_TYPES or output_type == "latent":
            raise ValueError(f"output_type must be one of {[t for t in OUTPUT_TYPES if t != 'latent']}; "
                             f"got {output_type!r}")
        want = self._noise_shape(1)[1:]
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != want:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, {', '.join(map(str, want))}) tensor; got {got}")
        if not torch.isfinite(latents).all():  # would decode to black (NaN -> 0 in the uint8 cast)
            raise ValueError("latents contain NaN or infinite values")
        return _with_images(self._decode(latents.to(self._device), output_type))

    def _decode(self, x0: torch.Tensor, output_type: str):
        # Undo the latent normalisation and decode, in the pipeline dtype.
        images = self.autoencoder.decode(self.model.postprocess(x0.to(self._dtype)))
        if not torch.isfinite(images).all():  # the uint8 cast would make them black without a word
            raise ValueError(f"the autoencoder decoded NaN or infinite pixels (pipeline dtype {self._dtype}); "
                             "load the pipeline in float32 or bfloat16")
        if output_type == "pt":
            return to_unit(images).float()
        arr = to_uint8(images)
        if output_type in ("np", "numpy"):
            return arr
        from PIL import Image

        return [Image.fromarray(a) for a in arr]

    def _sample(self, noise, emb, mask, uncond_emb, uncond_mask, pos, neg, steps, w, batched, callback, w_r=None,
                direction="prompt"):
        from miro.models.flow import Scheduler
        from miro.models.sampler import euler_sample

        scheduler = Scheduler.from_config(self.config.get("scheduler"))  # every key, as published
        # The pipeline draws the bar itself (the sampler's own takes no tqdm settings): a step
        # callback advances it, then calls the user's.
        bar = None
        if not self._progress_bar_config.get("disable", False):
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, **{"desc": "sampling", "leave": False, **self._progress_bar_config})

        def on_step(i: int, gamma_next: torch.Tensor, x: torch.Tensor) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i, gamma_next, x)

        try:
            return euler_sample(
                self.model, noise, emb, mask, uncond_emb, uncond_mask,
                reward_targets=pos, negative_reward_targets=neg, num_steps=steps,
                guidance_scale=w, batched_cfg=batched, scheduler=scheduler, autocast=self._autocast(),
                callback=on_step if bar is not None or callback is not None else None,
                reward_guidance_scale=w_r, reward_direction=direction,
            )
        finally:
            if bar is not None:
                bar.close()

    def _autocast(self):
        # None lets the sampler decide: bf16 autocast on CUDA (published), fp32 on CPU. Weights
        # cast to bf16/fp16 need autocast on any device so fp32 activations meet them.
        if self.autocast is not None:
            return self.autocast
        return True if self._dtype != torch.float32 else None
