"""LoRA adapters (peft) for SRPO and FLUX fine-tuning, saved in the formats their loaders read.

- FLUX: adapters are added with diffusers' ``transformer.add_adapter`` and saved with
  ``FluxPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors``, ``transformer.``-prefixed
  peft keys), so ``FluxPipeline.load_lora_weights(dir)`` loads them.
- MIRO: adapters are injected with ``peft.inject_adapter_in_model`` into ``MiroModel`` and saved as
  ``adapter_model.safetensors`` + ``adapter_config.json`` (the peft layout); :func:`merge_lora_state_dict`
  folds them into a plain state dict with the published tensor names for ``save_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# diffusers examples/dreambooth/train_dreambooth_lora_flux.py default target modules.
FLUX_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
# Attention and MLP projections of the RIN blocks (names from miro/models/layers.py).
MIRO_TARGET_MODULES: tuple[str, ...] = ("q", "kv", "qkv", "out", "linear_1", "linear_2", "linear_packed", "linear_out")


FLUX_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name FluxPipeline.load_lora_weights(dir) reads


@dataclass
class LoraSettings:
    rank: int = 16  # LoRA rank r (the fork's FLUX LoRA run: 16)
    alpha: float | None = None  # lora_alpha; None = rank (scale 1). diffusers' FLUX DreamBooth default is 4
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: the model family's defaults above
    init: str = "gaussian"  # peft init_lora_weights (diffusers FLUX script: "gaussian")

    def peft_config(self, default_targets: tuple[str, ...]):
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")
        init = True if self.init in ("default", "kaiming", True) else self.init
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, init_lora_weights=init,
                          target_modules=list(self.target_modules or default_targets))


def add_flux_lora(transformer, settings: LoraSettings) -> None:
    """Freeze ``transformer`` and add a trainable LoRA adapter (diffusers ``add_adapter``)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(settings.peft_config(FLUX_TARGET_MODULES))


def save_flux_lora(transformer, out_dir: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``FluxPipeline.load_lora_weights`` reads."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from miro.io import atomic_path

    module = getattr(transformer, "module", transformer)
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
    path = Path(out_dir) / FLUX_LORA_FILE
    # The adapter metadata (rank, alpha, targets) travels in the safetensors header, so the loader
    # rebuilds the same scale alpha/r (diffusers' DreamBooth script does the same).
    meta = module.peft_config["default"].to_dict() if hasattr(module, "peft_config") else None
    with atomic_path(path) as tmp:  # diffusers writes under the name it is given: a temp name, then renamed
        FluxPipeline.save_lora_weights(tmp.parent, transformer_lora_layers=state, safe_serialization=True,
                                       weight_name=tmp.name, transformer_lora_adapter_metadata=meta)
    return path


def add_miro_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Freeze ``model`` (a ``MiroModel``) and inject a trainable LoRA adapter in place."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(settings.peft_config(MIRO_TARGET_MODULES), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def save_miro_lora(model: torch.nn.Module, out_dir: str | Path, settings: LoraSettings) -> Path:
    """``adapter_model.safetensors`` (peft keys) + ``adapter_config.json``, written atomically."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from miro.hub import atomic_write_json
    from miro.io import atomic_write_with

    module = getattr(model, "module", model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
    atomic_write_with(out / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    cfg = asdict(settings)
    cfg["target_modules"] = list(settings.target_modules or MIRO_TARGET_MODULES)
    atomic_write_json(out / "adapter_config.json", cfg)
    return out


def load_miro_lora(model: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
    """Inject the adapter saved by :func:`save_miro_lora` into ``model`` and load its weights."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    settings = LoraSettings(**cfg)
    add_miro_lora(model, settings)
    result = set_peft_model_state_dict(model, load_file(str(lora_dir / "adapter_model.safetensors")))
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"LoRA file {lora_dir} has tensors the model lacks: {bad[:5]}")
    return model


def merge_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA layer folded in (``W + scale·B·A``, float32 whatever
    the base dtype) and the peft wrapper names removed, i.e. the published tensor names of the
    base model."""
    from peft.tuners.lora import LoraLayer

    module = getattr(model, "module", model)
    merged: dict[str, torch.Tensor] = {}
    lora_prefixes = set()
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            lora_prefixes.add(name)
            # Summed and kept in float32, whatever the base dtype: in a bfloat16 base
            # (target.dtype=bfloat16) a trained update below half a bf16 step of the weight
            # rounds away (a quarter of the entries at lora_B std 1e-3), and the exported
            # pipeline stores float32 anyway.
            w = layer.get_base_layer().weight.detach().float().clone()
            for ad in layer.active_adapters:
                if ad in layer.lora_A:
                    w = w + layer.get_delta_weight(ad).float()
            merged[f"{name}.weight"] = w
    for k, v in module.state_dict().items():
        if "lora_" in k:
            continue
        clean = k.replace(".base_layer.", ".")
        if clean.endswith(".weight") and clean[: -len(".weight")] in lora_prefixes:
            continue
        merged[clean] = v.detach().clone()
    return merged
