"""Reward-side prompts for SRPO: control words and MIA (Marginal Information Attribution) prompts.

Only the reward model reads these prompts; the generator is always conditioned on the base
caption (upstream precomputes the FLUX text embeddings from the plain caption).

Priority when building the (p+, p−) pair of one item (the "SRPO + MIA" recipe):

1. explicit overrides (CLI ``pos_prompt`` / ``neg_prompt``) win;
2. otherwise the item's own ``pos_prompt`` / ``neg_prompt`` (a missing one falls back to the caption);
3. otherwise, if the item has a MIA ``category`` or ``region``: ``p+ = "{caption}. {category}, {region}"``
   and ``p− = "{caption}"`` (:func:`mia_prompts`);
4. otherwise control words (upstream SRPO): ``p+ = "{pos_word}. {caption}"``,
   ``p− = "{neg_word}. {caption}"``, cycling through the word lists by step;
5. ``pos_prefix`` / ``neg_prefix`` replace the control words with a fixed ``"prefix. caption"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Upstream SRPO control words (fastvideo/SRPO.py), designed for HPSv2.1; the README warns they
# need redesigning for other reward models. "Painting" is noted as the strongest against the
# oily look.
POSITIVE_CONTROL_WORDS: tuple[str, ...] = ("Natural-lighting", "Detail", "Detailed", "Real")
NEGATIVE_CONTROL_WORDS: tuple[str, ...] = ("Concept art", "Painting", "Anime", "Flat", "Oil")


def _clean(text: str | None, humanize: bool) -> str | None:
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    # CuRe categories are written Rice_Dish; the upstream LoRA inference replaces underscores with
    # spaces before prompting, and text encoders tokenise "_" as a separate symbol.
    return text.replace("_", " ") if humanize else text


def mia_prompts(caption: str, category: str | None = None, region: str | None = None, *, humanize: bool = True) -> tuple[str, str]:
    """MIA reward prompts: ``("{caption}. {category}, {region}", "{caption}")``.

    Absent attributes are left out (``"{caption}. {region}"`` with no category); with neither,
    ``p+ == p−`` and the relative reward reduces to ``k·s(x, caption)``. ``humanize`` turns
    ``Rice_Dish`` into ``Rice Dish``.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty string; got {caption!r}")
    caption = caption.strip()
    attrs = [a for a in (_clean(category, humanize), _clean(region, humanize)) if a]
    pos = f"{caption}. {', '.join(attrs)}" if attrs else caption
    return pos, caption


@dataclass
class PromptConfig:
    pos_prompt: str | None = None  # fixed positive reward prompt for every item (overrides everything)
    neg_prompt: str | None = None  # fixed negative reward prompt for every item
    pos_prefix: str | None = None  # "prefix. caption" instead of control words
    neg_prefix: str | None = None
    use_mia: bool = True  # build MIA prompts from category/region when an item has them
    use_item_prompts: bool = True  # use an item's own pos_prompt/neg_prompt fields
    control_words: bool = True  # upstream control words when nothing else applies
    positive_words: list[str] = field(default_factory=lambda: list(POSITIVE_CONTROL_WORDS))
    negative_words: list[str] = field(default_factory=lambda: list(NEGATIVE_CONTROL_WORDS))
    humanize: bool = True  # replace "_" with " " in MIA attributes

    def __post_init__(self) -> None:
        from miro.align import checks as C

        for key in ("use_mia", "use_item_prompts", "control_words", "humanize"):
            C.boolean(f"prompts.{key}", getattr(self, key))
        for key in ("pos_prompt", "neg_prompt", "pos_prefix", "neg_prefix"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"prompts.{key} must be text or null; got {getattr(self, key)!r}")
        for key in ("positive_words", "negative_words"):
            words = getattr(self, key)
            if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"prompts.{key} must be a list of words; got {words!r}")


def build_reward_prompts(item: dict, config: PromptConfig, step: int = 0) -> tuple[str, str]:
    """(p+, p−) for one dataset item (a dict with ``caption`` and optional ``category``, ``region``,
    ``pos_prompt``, ``neg_prompt``) at training ``step``."""
    caption = item.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"item has no usable caption: {item!r}")
    caption = caption.strip()
    if config.pos_prompt is not None or config.neg_prompt is not None:
        return config.pos_prompt or caption, config.neg_prompt or caption
    if config.use_item_prompts and (item.get("pos_prompt") or item.get("neg_prompt")):
        return item.get("pos_prompt") or caption, item.get("neg_prompt") or caption
    if config.use_mia and (_clean(item.get("category"), False) or _clean(item.get("region"), False)):
        return mia_prompts(caption, item.get("category"), item.get("region"), humanize=config.humanize)
    if config.pos_prefix is not None or config.neg_prefix is not None:
        pos = f"{config.pos_prefix}. {caption}" if config.pos_prefix else caption
        neg = f"{config.neg_prefix}. {caption}" if config.neg_prefix else caption
        return pos, neg
    if config.control_words:
        if not config.positive_words or not config.negative_words:
            raise ValueError("control_words needs non-empty positive_words and negative_words")
        pw = config.positive_words[step % len(config.positive_words)]
        nw = config.negative_words[step % len(config.negative_words)]
        return f"{pw}. {caption}", f"{nw}. {caption}"
    raise ValueError(
        f"no reward prompts for item {item.get('caption')!r}: give pos_prompt/neg_prompt, MIA fields, prefixes or enable control_words"
    )
