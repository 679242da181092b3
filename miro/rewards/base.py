"""The reward-scorer interface shared by real reward models and the Shapes world.

A scorer maps (images, prompts) to one raw score per image. ``normalize`` maps raw scores to the
value MIRO stores in a sample's JSON for training (before quantile binning, see ``binning.py``).

Images are either a list of PIL images or a float tensor (B, 3, H, W) in [0, 1]. When
``differentiable`` is True the tensor path keeps gradients (SRPO back-propagates through it).
Embedding models (CLIP-like) also expose ``embed_image``, ``embed_text`` and ``similarity``, which
SRPO's semantic relative reward needs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from miro.io import to_rgb

ImagesLike = "Sequence[PIL.Image.Image] | torch.Tensor"


def images_to_tensor(images, size: int | None = None) -> torch.Tensor:
    """Convert a list of PIL images (or a (B,3,H,W) tensor) to a float tensor in [0, 1].

    PIL images are converted to RGB; a tensor is returned as is (gradients kept). ``size``
    resizes PIL images to size×size with bicubic filtering before conversion.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must have shape (B, 3, H, W); got {tuple(images.shape)}")
        return images
    from PIL import Image

    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL image or the batch a (B,3,H,W) tensor; got {type(im).__name__}")
        im = to_rgb(im, f"images[{i}]")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 3, size or 1, size or 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int if it is a positive integer (not a bool or a float); else a ValueError."""
    import numbers

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    return int(batch_size)


def check_prompts(prompts, n: int, scorer: str | None = None) -> list[str]:
    """Validate prompts for a batch of n images (one prompt broadcast to all is allowed).

    ``prompts=None`` raises a ValueError naming ``scorer`` (the reward that needs them), so a
    prompt-dependent scorer called without prompts says so instead of failing on ``list(None)``.
    """
    if prompts is None:
        raise ValueError(f"{scorer or 'this scorer'} needs the prompts (one string per image, or one string for "
                         f"all of them); got prompts=None")
    if isinstance(prompts, str):
        prompts = [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string; got {type(p).__name__}")
    return prompts


class Scorer:
    """Base class of every reward scorer.

    Subclasses set ``keys`` (the reward key(s) they produce, e.g. ``("aesthetic_score",)``),
    ``differentiable`` and implement :meth:`score`.

    Prompts: a scorer whose score ignores the prompt (``aesthetic_score``, ``shapes_sharpness``,
    ``shapes_contrast``) takes ``score(images, prompts=None)`` and checks prompts only when given;
    a prompt-dependent one raises a ValueError naming itself on ``None`` (``check_prompts`` does).

    Factories: every registered factory accepts ``device``, ``dtype``, ``revision``,
    ``local_files_only`` and ``batch_size`` (docs/rewards.md), also where they do not apply, so
    generic code can build any scorer with the same arguments.
    """

    keys: tuple[str, ...] = ()
    differentiable: bool = False
    # Documented range of the raw score, (low, high); None where unbounded.
    score_range: tuple[float | None, float | None] = (None, None)

    @property
    def key(self) -> str:
        return self.keys[0]

    def score(self, images, prompts=None) -> torch.Tensor:
        """Raw scores, shape (B,), float32. ``prompts=None`` only for scorers that ignore them."""
        raise NotImplementedError

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """The value MIRO stores for training. Identity unless a reward documents otherwise."""
        return raw

    def __call__(self, images, prompts=None) -> torch.Tensor:
        return self.score(images, prompts)

    def load(self) -> "Scorer":
        """Load lazily loaded weights now; a scorer without weights (the Shapes rewards) has none."""
        return self

    # Embedding models override these three.
    def embed_image(self, images) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not an embedding model")

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not an embedding model")

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not an embedding model")

    def to(self, device=None, dtype=None) -> "Scorer":
        return self


def load_weights(scorer: Scorer, name: str | None = None) -> Scorer:
    """Load a scorer's lazily loaded weights now (``scorer.load()``, and its ``backbone``'s).

    A model neither in the hub cache nor reachable is an ``OSError`` of one line naming the reward
    (``name``, default its first key): the hub library's own message names neither the reward nor
    the model, and its ``LocalEntryNotFoundError`` is also a ``FileNotFoundError``, which the
    commands would report as bad input rather than as the environment."""
    from miro.io import one_line

    name = name or (scorer.keys[0] if getattr(scorer, "keys", ()) else type(scorer).__name__)
    try:
        load_parts(scorer)
    except OSError as e:
        from miro.download import WEIGHTS

        fetch = f"fetch it once with `miro download {name}` where a network exists, or " if name in WEIGHTS else ""
        raise OSError(f"could not load the model of reward {name!r} ({type(e).__name__}: {one_line(e)}); "
                      f"{fetch}pass a local folder as its model= argument") from e
    return scorer


def load_parts(model) -> None:
    """Call ``load()`` on ``model`` and on its ``backbone``, where they have one (lazily loaded weights)."""
    for obj in (model, getattr(model, "backbone", None)):
        if obj is not None and callable(getattr(obj, "load", None)):
            obj.load()


# name -> factory(**kwargs) -> Scorer. Filled by the modules that define scorers.
REGISTRY: dict[str, Callable[..., Scorer]] = {}


def forwards(target: Callable) -> Callable[[Callable], Callable]:
    """Decorator for a factory ``f(model=..., **kwargs)`` that passes ``kwargs`` on to ``target``:
    its signature (``help``, ``inspect`` and ``check_scorer_kwargs``) lists the target's keyword
    arguments instead of ``**kwargs``, so a misspelt one is refused by name before anything loads."""
    import inspect

    def deco(factory: Callable) -> Callable:
        sig = inspect.signature(factory)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(target).parameters.values()
                 if p.name not in taken and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        factory.__signature__ = sig.replace(parameters=own + extra)
        return factory

    return deco


def register(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a scorer factory under a reward key."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in REGISTRY and REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = factory
        return factory

    return deco
