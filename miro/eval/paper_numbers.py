"""The MIRO paper's published numbers, for side-by-side reports.

Source: the MIRO project page's data tables (``data.js``: radars, reward scores, test-time
scaling, aesthetic sweep), collected in the project's reference notes. All are at 256 px, trained
on CC12M + LAION-Aesthetics >= 6 for 500k steps. GenEval numbers come from GenEval's mmdet
Mask2Former, so a GenEval-like run with another detector is comparable only in trend.
Reward numbers are on PartiPrompts, in the evaluation scorers' units (Pick and Jina-CLIP are
``exp(logit_scale)·cos / 100``; Aesthetic, HPSv2 and ImageReward raw).
"""

from __future__ import annotations

# GenEval categories as GenEval tags, in the paper's radar order.
GENEVAL_TAGS = ("two_object", "single_object", "color_attr", "counting", "colors", "position")

# Per-category GenEval accuracy in percent (radars). Keys: the paper's row names.
GENEVAL: dict[str, dict[str, float]] = {
    "Baseline": dict(zip(GENEVAL_TAGS, (55.30, 94.06, 28.5, 49.06, 68.09, 18.0))),
    "MIRO": dict(zip(GENEVAL_TAGS, (67.68, 92.19, 37.5, 55.31, 69.15, 19.0))),
    "Synthetic-caption baseline": dict(zip(GENEVAL_TAGS, (58.59, 92.5, 43.25, 44.06, 73.94, 29.5))),
    "Synthetic-caption MIRO": dict(zip(GENEVAL_TAGS, (72.98, 97.19, 52.0, 61.25, 76.60, 46.0))),
    "only-ImageReward": dict(zip(GENEVAL_TAGS, (58.84, 96.88, 32.75, 55.94, 76.33, 20.5))),
    "only-HPSv2": dict(zip(GENEVAL_TAGS, (63.38, 94.69, 30.75, 52.19, 77.93, 14.5))),
    "only-Aesthetic": dict(zip(GENEVAL_TAGS, (37.12, 73.75, 15.25, 24.06, 41.49, 6.0))),
    "only-SciScore": dict(zip(GENEVAL_TAGS, (61.87, 94.38, 35.0, 61.25, 72.34, 24.25))),
    "only-CLIP": dict(zip(GENEVAL_TAGS, (63.38, 96.56, 32.0, 56.56, 69.95, 24.25))),
    "only-VQA": dict(zip(GENEVAL_TAGS, (57.58, 97.19, 37.25, 56.56, 75.80, 19.5))),
    "only-Pick": dict(zip(GENEVAL_TAGS, (62.37, 93.13, 33.75, 58.13, 74.73, 17.0))),
}
# Overall GenEval printed beside the radars (percent; the unweighted mean of the six tags).
GENEVAL_OVERALL = {"Baseline": 52, "MIRO": 57, "Synthetic-caption baseline": 57, "Synthetic-caption MIRO": 68}

# Reward columns: paper column -> (our reward key, how our raw score maps to the paper's unit).
REWARD_COLUMNS: dict[str, tuple[str, str]] = {
    "Pick": ("pick_a_score_score", "raw/100"),
    "Aesthetic": ("aesthetic_score", "raw"),
    "HPSv2": ("hpsv2_score", "raw"),
    "Jina-CLIP": ("clip_score", "raw/100"),
    "ImageReward": ("image_reward_score", "raw"),
}
# PartiPrompts reward means (reward-score table). OpenAI-CLIP is kept for completeness.
REWARDS: dict[str, dict[str, float]] = {
    "Baseline": {"Pick": .2117, "Aesthetic": 5.177, "OpenAI-CLIP": .2650, "HPSv2": .2470, "Jina-CLIP": .1998, "ImageReward": 0.524},
    "MIRO": {"Pick": .2201, "Aesthetic": 6.278, "OpenAI-CLIP": .2651, "HPSv2": .2935, "Jina-CLIP": .2020, "ImageReward": 1.058},
    "only-ImageReward": {"Pick": .2143, "Aesthetic": 5.308, "OpenAI-CLIP": .2671, "HPSv2": .2725, "Jina-CLIP": .2017, "ImageReward": 1.042},
    "only-HPSv2": {"Pick": .2153, "Aesthetic": 5.472, "OpenAI-CLIP": .2596, "HPSv2": .2947, "Jina-CLIP": .1980, "ImageReward": 0.896},
    # ImageReward 0.0 is printed for only-Aesthetic; it may be clipped by the figure.
    "only-Aesthetic": {"Pick": .2089, "Aesthetic": 6.653, "OpenAI-CLIP": .2321, "HPSv2": .2552, "Jina-CLIP": .1691, "ImageReward": 0.0},
    "only-SciScore": {"Pick": .2093, "Aesthetic": 4.615, "OpenAI-CLIP": .2730, "HPSv2": .2437, "Jina-CLIP": .2021, "ImageReward": 0.556},
    "only-CLIP": {"Pick": .2139, "Aesthetic": 5.041, "OpenAI-CLIP": .2756, "HPSv2": .2524, "Jina-CLIP": .2105, "ImageReward": 0.730},
    "only-VQA": {"Pick": .2118, "Aesthetic": 4.884, "OpenAI-CLIP": .2675, "HPSv2": .2509, "Jina-CLIP": .2016, "ImageReward": 0.638},
    "only-Pick": {"Pick": .2164, "Aesthetic": 5.161, "OpenAI-CLIP": .2699, "HPSv2": .2639, "Jina-CLIP": .2026, "ImageReward": 0.757},
    "Synthetic-caption baseline": {"Pick": .2108, "Aesthetic": 4.956, "OpenAI-CLIP": .2685, "HPSv2": .2435, "Jina-CLIP": .2011, "ImageReward": 0.521},
    "Synthetic-caption MIRO": {"Pick": .2202, "Aesthetic": 6.278, "OpenAI-CLIP": .2671, "HPSv2": .2935, "Jina-CLIP": .2043, "ImageReward": 1.114},
}

# Best-of-N endpoints (test-time scaling figure): metric -> row -> {N: value}.
BEST_OF_N: dict[str, dict[str, dict[int, float]]] = {
    "Aesthetic": {"Baseline": {1: 5.360, 64: 5.870, 128: 5.870}, "MIRO": {1: 6.389, 64: 6.794, 128: 6.794}},
    "ImageReward": {"Baseline": {1: 0.522, 128: 1.405}, "MIRO": {1: 1.044, 128: 1.570}},
    "Pick": {"Baseline": {1: .2118, 128: .2235}, "MIRO": {1: .2194, 128: .2286}},
    "HPSv2": {"Baseline": {1: .2469, 128: .2858}, "MIRO": {1: .2907, 128: .3148}},
}

# Aesthetic-target sweep of synthetic-caption MIRO: target -> (GenEval %, Aesthetic or None).
AESTHETIC_SWEEP: dict[float, tuple[float, float | None]] = {
    0.0: (71.30, 3.69), 0.125: (72.16, None), 0.25: (71.61, None), 0.375: (71.45, None),
    0.5: (72.93, None), 0.625: (74.87, 5.24), 0.75: (71.11, None), 0.875: (68.69, None), 1.0: (67.67, 6.28),
}

# Published checkpoints -> paper row. The main release is trained 50/50 on original and
# synthetic captions; "miro-no-synthetic-captions" is the original-caption MIRO.
_VARIANT_ROWS = {
    None: "Synthetic-caption MIRO",
    "miro-no-synthetic-captions": "MIRO",
    "miro-only-aesthetic": "only-Aesthetic",
    "miro-only-clip": "only-CLIP",
    "miro-only-hpsv2": "only-HPSv2",
    "miro-only-image-reward": "only-ImageReward",
    "miro-only-pickscore": "only-Pick",
    "miro-only-sciscore": "only-SciScore",
    "miro-only-vqa": "only-VQA",
}
PUBLISHED_REPOS = ("nicolas-dufour/miro", "nicolas-dufour/miro-ablations")


def paper_row(model: str | None, variant: str | None = None) -> str | None:
    """The paper row a published checkpoint corresponds to, or None for any other model."""
    if model not in PUBLISHED_REPOS:
        return None
    if model == "nicolas-dufour/miro" and variant is None:
        return _VARIANT_ROWS[None]
    return _VARIANT_ROWS.get(variant) if variant else None


def to_paper_unit(column: str, raw: float) -> float:
    """Our raw score for ``column``'s reward in the paper's unit."""
    _, unit = REWARD_COLUMNS[column]
    return raw / 100.0 if unit == "raw/100" else raw


# The scorer version behind the paper's numbers, for rewards that come in versions whose scores
# are not comparable: MIRO's evaluation (eval/rewards/reward_models.py) scores HPS v2.0, while
# training, and our scorer by default, use v2.1 (rewards_and_geneval_facts.md, HPSv2).
PAPER_VERSIONS = {"hpsv2_score": "v2.0"}


def comparable(key: str, version: str | None) -> bool:
    """Whether our ``key`` scores, made with scorer ``version``, sit on the paper's scale."""
    need = PAPER_VERSIONS.get(key)
    return need is None or version == need


def version_note(key: str, version: str | None) -> str:
    """Why ``key`` is left out of a paper comparison, and how to score it comparably."""
    return (f"{key} was scored with version {version or '(not recorded)'}; the paper's numbers use "
            f"{PAPER_VERSIONS[key]}, on another scale, so they are not shown beside it (score with "
            f"--scorer-kwargs '{{\"{key}\": {{\"version\": \"{PAPER_VERSIONS[key]}\"}}}}' to compare).")


def best_of_n_reference(reward_keys, versions: dict[str, str] | None = None) -> dict[str, dict[str, dict[int, float]]]:
    """The paper's best-of-N endpoints for our reward keys, converted to our raw-score units;
    keys scored with another scorer version than the paper's (``versions``) are left out."""
    out = {}
    for col, (key, unit) in REWARD_COLUMNS.items():
        if key in reward_keys and col in BEST_OF_N and comparable(key, (versions or {}).get(key)):
            scale = 100.0 if unit == "raw/100" else 1.0
            out[key] = {row: {n: v * scale for n, v in pts.items()} for row, pts in BEST_OF_N[col].items()}
    return out
