"""Captions <-> GenEval metadata, in both directions.

Every caption the Shapes world writes is generated from a metadata dict (GenEval's format:
``tag``, ``include`` clauses with ``class``, ``count``, optional ``color`` and
``position: [relation, target index]``, ``exclude`` clauses), and :func:`parse_caption` reads
any caption of the grammar back into the same dict, so rewards can score plain strings.

Grammar (lower case, punctuation ignored)::

    caption  := [prefix] (groups | group relation group [and groups]) [", on a ... background"]
    prefix   := "a photo of" | "a picture of" | "an image of" | "an image showing" | "there is" | ...
    group    := qty [colour] class  |  qty class ("that is" | "that are" | "in" | "colored") colour
    qty      := "a" | "an" | "one" | "two" | "three" | "four"
    relation := "left of" | "to the left of" | "right of" | "to the right of" | "above" | "below" | ...
    groups   := group {("and" | "," | "with" | "together with") group}

Canonical metadata (what :func:`canonical` returns and the parser produces): a class with a
clause of ``count >= 2`` gets an ``exclude`` clause with its total count + 1 (the prompt means exactly N, as in
GenEval's counting prompts); the tag follows from the structure (:func:`infer_tag`).
"""

from __future__ import annotations

import copy
import functools
import re

import numpy as np

from miro.eval.geneval_rules import validate_metadata
from miro.shapes import world as W

PREFIXES = ("a photo of", "a picture of", "an image of", "an image showing", "a drawing of", "a rendering of",
            "there is", "there are", "a photo with", "a picture with")
JOINERS = (" and ", " with ", " together with ")
# caption words for each relation; the first is GenEval's own
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
TEXTURE_WORDS = {"flat": "plain", "stripes": "striped", "checker": "checkered", "gradient": "shaded", "grain": "mottled"}
_WORD_TO_COUNT = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in W.COUNT_WORDS.items() if n > 1}}
_PLURAL_TO_CLASS = {p: c for c, p in W.PLURALS.items()}
_REL_PATTERN = re.compile(r"\b(" + "|".join(sorted((re.escape(w) for ws in RELATION_WORDS.values() for w in ws), key=len, reverse=True)) + r")\b")
_REL_OF_WORD = {w: rel for rel, ws in RELATION_WORDS.items() for w in ws}
_BG_PATTERN = re.compile(r"(,)?\s*on an? [a-z ]*background$")


def infer_tag(include: list[dict]) -> str:
    """The GenEval tag of a clause list (``multi_object`` for three or more groups)."""
    if any("position" in c for c in include):
        return "position"
    if len(include) == 1:
        c = include[0]
        return "counting" if c["count"] >= 2 else ("colors" if "color" in c else "single_object")
    if len(include) == 2:
        return "color_attr" if any("color" in c for c in include) else "two_object"
    return "multi_object"


def canonical(metadata: dict) -> dict:
    """Metadata with the tag inferred and ``exclude`` = exactly-N clauses for counts >= 2."""
    include = [dict(c) for c in metadata["include"]]
    out = {"tag": infer_tag(include), "include": include}
    totals: dict[str, int] = {}
    for c in include:
        totals[c["class"]] = totals.get(c["class"], 0) + c["count"]
    # exclude counts every object of the class, so it is one more than the class's total
    ex = [{"class": k, "count": totals[k] + 1} for k in totals if any(c["class"] == k and c["count"] >= 2 for c in include)]
    if ex:
        out["exclude"] = ex
    if "prompt" in metadata:
        out["prompt"] = metadata["prompt"]
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(clause: dict, postfix_color: bool = False) -> str:
    """``a red circle``, ``three blue squares``, ``a circle that is red``."""
    n, cls, color = clause["count"], clause["class"], clause.get("color")
    noun = cls if n == 1 else W.PLURALS[cls]
    if color and postfix_color:
        head = f"{_article(noun)} {noun}" if n == 1 else f"{W.COUNT_WORDS[n]} {noun}"
        return f"{head} {'that is' if n == 1 else 'that are'} {color}"
    words = f"{color} {noun}" if color else noun
    return f"{_article(words)} {words}" if n == 1 else f"{W.COUNT_WORDS[n]} {words}"


def _join(phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_from_metadata(metadata: dict, style: str = "geneval", rng: np.random.Generator | None = None) -> str:
    """Write a caption for metadata. ``style="geneval"``: GenEval's templates ("a photo of ...");
    ``"free"``: a random freer phrasing (prefix, relation wording, colour placement) from ``rng``."""
    validate_metadata(metadata)
    if style not in ("geneval", "free"):
        raise ValueError(f"caption style must be 'geneval' or 'free'; got {style!r}")
    if style == "free" and rng is None:
        raise ValueError("style='free' needs an rng")
    include = metadata["include"]

    def pick(options):
        return options[int(rng.integers(len(options)))] if style == "free" else options[0]

    postfix = style == "free" and bool(rng.integers(4) == 0)
    pos = [i for i, c in enumerate(include) if "position" in c]
    if pos:
        if len(pos) > 1:
            raise ValueError("captions support one position clause")
        a = pos[0]
        rel, t = include[a]["position"]
        rest = [noun_phrase(c, postfix) for i, c in enumerate(include) if i not in (a, t)]
        body = f"{noun_phrase(include[a], postfix)} {pick(RELATION_WORDS[rel])} {noun_phrase(include[t], postfix)}"
        if rest:
            if a != 1 or t != 0:
                raise ValueError("a position caption with more clauses needs the target first and the subject second")
            body += " and " + _join(rest)
        elif (a, t) != (1, 0):
            raise ValueError("a position caption needs include = [target, subject with position [rel, 0]]")
    else:
        body = _join([noun_phrase(c, postfix) for c in include])
    if style == "geneval":
        return f"a photo of {body}"
    prefix = pick(("", "", "a photo of", "a picture of", "an image of", "an image showing", "a drawing of"))
    return f"{prefix} {body}".strip()


def _parse_group(text: str) -> dict:
    words = text.split()
    if not words or words[0] not in _WORD_TO_COUNT:
        raise ValueError(f"expected a quantity ({', '.join(repr(w) for w in _WORD_TO_COUNT)}: the Shapes world holds "
                         f"at most {W.MAX_COUNT} of a kind, in words) before {text!r}")
    count = _WORD_TO_COUNT[words[0]]
    rest = words[1:]
    color = None
    if rest and rest[0] in W.COLORS:
        color, rest = rest[0], rest[1:]
    if not rest:
        raise ValueError(f"no shape class in {text!r}")
    noun, rest = rest[0], rest[1:]
    if noun in W.CLASSES:
        cls = noun
    elif noun in _PLURAL_TO_CLASS:
        cls = _PLURAL_TO_CLASS[noun]
    else:
        raise ValueError(f"unknown shape {noun!r} in {text!r}; known: {', '.join(W.CLASSES)}")
    if (count == 1) != (noun == cls):
        raise ValueError(f"count and number disagree in {text!r}")
    tail = " ".join(rest)
    m = re.fullmatch(r"(?:that is|that are|in|colored|coloured) (\w+)", tail) if tail else None
    if tail and (m is None or color is not None or m.group(1) not in W.COLORS):
        raise ValueError(f"cannot read {tail!r} after {noun!r} in {text!r}")
    if m:
        color = m.group(1)
    clause = {"class": cls, "count": count}
    if color:
        clause["color"] = color
    return clause


def _parse_groups(text: str) -> list[dict]:
    text = text.replace(",", " , ")
    for j in (" together with ", " with ", " , and ", " and ", " , "):
        text = text.replace(j, " | ")
    return [_parse_group(part.strip()) for part in text.split("|") if part.strip()]


@functools.lru_cache(maxsize=65536)
def _parse_cached(caption: str) -> str:
    import json

    text = re.sub(r"[.!;:]", " ", caption.lower())
    text = re.sub(r"\s+", " ", text.replace("-", " ")).strip()
    text = _BG_PATTERN.sub("", text).strip()
    for p in sorted(PREFIXES, key=len, reverse=True):
        if text.startswith(p + " "):
            text = text[len(p) + 1 :]
            break
    if text.startswith("exactly "):
        text = text[len("exactly ") :]
    rels = list(_REL_PATTERN.finditer(text))
    if len(rels) > 1:
        raise ValueError(f"caption {caption!r} states more than one relation")
    if rels:
        m = rels[0]
        subj = _parse_groups(text[: m.start()])
        objs = _parse_groups(text[m.end() :])
        if len(subj) != 1 or not objs:
            raise ValueError(f"caption {caption!r}: a relation needs one subject and a target")
        include = [objs[0], {**subj[0], "position": [_REL_OF_WORD[m.group(1)], 0]}] + objs[1:]
    else:
        include = _parse_groups(text)
    if not include:
        raise ValueError(f"caption {caption!r} names no object")
    md = canonical({"include": include, "prompt": caption})
    return json.dumps(md)


def parse_caption(caption: str) -> dict:
    """GenEval metadata of a caption of the Shapes grammar (ValueError if it is not one)."""
    import json

    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string; got {type(caption).__name__}")
    try:
        return json.loads(_parse_cached(caption))
    except ValueError as e:
        raise ValueError(f"cannot parse Shapes caption {caption!r}: {e}") from None


def describe_scene(scene, long: bool = True) -> dict:
    """Canonical metadata that describes a scene truthfully (with ``prompt``).

    Objects are grouped by (class, colour) in order of appearance. The long form adds the one
    unambiguous relation when the scene is exactly two single objects, and the background; the
    short form is the bare list of groups.
    """
    from miro.shapes.scene import relation_holds

    groups: dict[tuple[str, str], list] = {}
    for o in scene.objects:
        groups.setdefault((o.cls, o.color), []).append(o)
    include = [{"class": c, "count": min(len(objs), W.MAX_COUNT), "color": col} for (c, col), objs in groups.items()]
    if not include:
        raise ValueError("cannot describe an empty scene")
    if long and len(include) == 2 and all(c["count"] == 1 for c in include):
        (a,), (b,) = groups.values()
        for rel in W.RELATIONS:
            if relation_holds(b.box(), a.box(), rel):
                include[1]["position"] = [rel, 0]
                break
    md = canonical({"include": copy.deepcopy(include)})
    text = caption_from_metadata(md)
    if long:
        tex = TEXTURE_WORDS.get(scene.texture, "plain")
        text = f"{text}, on a {tex} {scene.background} background"
    else:
        text = text[len("a photo of ") :]
    md["prompt"] = text
    return md
