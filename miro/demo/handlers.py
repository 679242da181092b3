"""Request logic of ``miro demo``, free of sockets: JSON in, ``(status, JSON body)`` out.

``POST /api/generate`` takes the pipeline's own argument names::

    {"prompt": "two red circles above a blue square",
     "reward_targets": {"shapes_alignment": 1.0, ...},          # missing keys: 1.0
     "negative_reward_targets": {"shapes_alignment": 0.0, ...}, # missing keys: 0.0
     "isolate": null,            # or a reward key (then no negative_reward_targets)
     "num_inference_steps": 50, "guidance_scale": 7.0,
     "reward_guidance_scale": null,  # or w_r >= 0: the reward direction's own scale, or {key: w_k}
     "reward_direction": "prompt",   # or "null" (MiroPipeline's two factorisations)
     "num_images_per_prompt": 4, "seed": 3407}                  # seed -1: a random one

and answers the PNGs as ``data:`` URLs with the generation time and the targets actually used.
Every field is checked with the pipeline's own checks (``check_inputs``,
``check_reward_targets``) plus the server's limits; a bad field gives HTTP 400 with
``{"error": <message naming the value and what is allowed>, "field": <name>}``.
"""

from __future__ import annotations

import base64
import io
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

# Published demo defaults (HF Space `nicolas-dufour/miro`, miro-t2i 0.1.4 `app.py`): 50 steps,
# CFG 7.0, seed 3407, four images; positive targets 1.0 and negative targets 0.0.
DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 50,
    "guidance_scale": 7.0,
    "reward_guidance_scale": None,  # None: the published single scale (w_r = w)
    "reward_direction": "prompt",
    "seed": 3407,
    "num_images_per_prompt": 4,
    "reward_target": 1.0,
    "negative_reward_target": 0.0,
}
# Sliders move in steps of 1/64: the published demo's step, matching the 64 quantile bins the
# rewards were discretised into for training (miro_facts §3, "B = 64").
SLIDER_BINS = 64
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts any signed 64-bit value
FIELDS = ("prompt", "reward_targets", "negative_reward_targets", "isolate",
          "num_inference_steps", "guidance_scale", "reward_guidance_scale", "reward_direction",
          "num_images_per_prompt", "seed")

# Short slider labels; an unknown key is shown as itself with spaces.
LABELS = {
    "clip_score": "CLIP", "aesthetic_score": "Aesthetic", "image_reward_score": "ImageReward",
    "pick_a_score_score": "PickScore", "hpsv2_score": "HPSv2", "vqa_score": "VQAScore",
    "sciscore_score": "SciScore", "shapes_alignment": "Alignment", "shapes_counting": "Counting",
    "shapes_position": "Position", "shapes_sharpness": "Sharpness", "shapes_contrast": "Contrast",
}
SHAPES_EXAMPLES = (
    "two red circles above a blue square",
    "a photo of three yellow stars",
    "a green triangle to the left of a purple circle",
    "one white square and two orange triangles",
)
PHOTO_EXAMPLES = (
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox sitting in fresh snow, telephoto photograph",
    "a bowl of ramen on a wooden table, studio lighting",
    "an isometric cutaway of a tiny bookshop, 3d render",
)

class QueueFull(RuntimeError):
    """The line of :class:`GenerationQueue` is full (its ``max_waiting`` callers wait)."""


class GenerationQueue:
    """One generation at a time, the waiting requests served first come, first served (a bare
    ``threading.Lock`` wakes waiters in no particular order), with at most ``max_waiting`` of them:
    beyond that a request is refused at once instead of holding a thread for minutes. Has the
    ``acquire(timeout)`` / ``release()`` / ``locked()`` of a lock."""

    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._next_ticket = 0  # the ticket the next arrival draws
        self._serving = 0  # the ticket whose turn it is
        self._busy = False
        self._abandoned: set[int] = set()  # tickets that timed out before their turn

    def waiting(self) -> int:
        with self._cond:
            return self._waiting()

    def _waiting(self) -> int:
        return self._next_ticket - self._serving - (1 if self._busy else 0) - len(self._abandoned)

    def locked(self) -> bool:
        return self._busy

    def acquire(self, timeout: float | None = None, max_waiting: int | None = None) -> bool:
        """True once it is this caller's turn; False after ``timeout`` seconds (its place is given
        up). :class:`QueueFull` at once when ``max_waiting`` (default: the queue's) callers already
        wait: counted and joined under one lock, so simultaneous arrivals cannot pass the cap together."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cap = self.max_waiting if max_waiting is None else max_waiting
        with self._cond:
            if cap is not None and self._waiting() >= cap:
                raise QueueFull(cap)
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._busy or self._serving != ticket:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._give_up(ticket)
                    return False
                self._cond.wait(left)
            self._busy = True
            return True

    def _give_up(self, ticket: int) -> None:
        # A ticket that leaves the line is served as an empty turn, so later ones still come up in order.
        self._abandoned.add(ticket)
        self._skip_abandoned()

    def _skip_abandoned(self) -> None:
        while not self._busy and self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._serving += 1
            self._skip_abandoned()


# One model per process, one generation at a time (the pipeline is not re-entrant and a second
# concurrent run would only halve the speed of both).
GENERATE_LOCK = GenerationQueue()


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on what one request may ask for (the server is meant for one local user)."""

    max_steps: int = 200  # num_inference_steps upper bound
    max_images: int = 8  # num_images_per_prompt upper bound
    max_prompt_chars: int = 2000  # longer prompts are refused (the encoder truncates anyway)
    max_body_bytes: int = 64 * 1024  # request body size bound (checked by the server)
    queue_timeout_s: float = 600.0  # wait for the running generation at most this long, then 503
    max_waiting: int = 8  # requests that may wait behind the running one; more get 503 at once
    max_connections: int = 64  # open connections (one thread each); more are answered 503 and closed
    # guidance_scale and reward_guidance_scale upper bound: far beyond it float32 overflows and a
    # request would get black images with a 200
    max_guidance: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_images", "max_prompt_chars", "max_body_bytes", "max_waiting", "max_connections"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DemoLimits.{name} must be an integer >= 1; got {v!r}")
        if not math.isfinite(self.max_guidance) or self.max_guidance <= 0:
            raise ValueError(f"DemoLimits.max_guidance must be finite and > 0; got {self.max_guidance!r}")
        if not math.isfinite(self.queue_timeout_s) or self.queue_timeout_s < 0:
            raise ValueError(f"DemoLimits.queue_timeout_s must be finite and >= 0; got {self.queue_timeout_s!r}")


class RequestError(ValueError):
    """A bad request field; ``field`` is its name (None for the request as a whole)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class GenerateRequest:
    """A checked ``/api/generate`` request, targets filled for every reward key."""

    prompt: str
    reward_targets: dict[str, float]
    negative_reward_targets: dict[str, float]
    isolate: str | None
    num_inference_steps: int
    guidance_scale: float
    num_images_per_prompt: int
    seed: int
    reward_guidance_scale: float | dict[str, float] | None = None
    reward_direction: str = "prompt"


def isolation_targets(reward_targets: Mapping[str, float], key: str) -> dict[str, float]:
    """Negative targets that isolate one reward: the positive targets, with ``key`` at 0.

    The project page's per-reward isolation uses s⁺ = all high and s⁻ = all high except one
    reward at 0, so the guidance direction differs between the two branches only in that reward
    (and the text). Copying the positive values generalises "all high" to any positive sliders.
    """
    if key not in reward_targets:
        raise ValueError(f"isolate = {key!r} is not a reward key; valid keys: {list(reward_targets)}")
    out = dict(reward_targets)
    out[key] = 0.0
    return out


def _check_one(pipe, field: str, prompt: Any = "x", steps: Any = 1, cfg: Any = 0.0, n: Any = 1,
               cfg_r: Any = None, direction: Any = "prompt") -> None:
    # The pipeline checks all arguments at once; passing known-good values for the others
    # tells which field a message is about.
    try:
        pipe.check_inputs(prompt, steps, cfg, n, "pil", None, cfg_r, direction)
    except ValueError as e:
        raise RequestError(field, str(e)) from None


def _check_server_limit(field: str, value: int, limit: int) -> None:
    # Only the upper bound: the pipeline's own check (run first) already rejects values below 1.
    if value > limit:
        raise RequestError(field, f"{field} = {value}; this server allows 1 to {limit}")


def parse_generate_request(pipe, payload: Any, limits: DemoLimits | None = None,
                           rng: Any = None) -> GenerateRequest:
    """Check a decoded JSON payload; raise :class:`RequestError` naming the first bad field.

    ``rng`` (anything with ``randbelow(n)``; default :mod:`secrets`) draws the seed for -1.
    """
    limits = limits or DemoLimits()
    if not isinstance(payload, Mapping):
        raise RequestError(None, f"the request body must be a JSON object with fields {list(FIELDS)}; "
                                 f"got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown request fields {unknown}; allowed: {list(FIELDS)}")

    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt must be a string; got {prompt!r}")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"prompt has {len(prompt)} characters; at most "
                                     f"{limits.max_prompt_chars} are allowed")
    _check_one(pipe, "prompt", prompt=prompt)

    steps = payload.get("num_inference_steps", DEFAULTS["num_inference_steps"])
    _check_one(pipe, "num_inference_steps", steps=steps)
    _check_server_limit("num_inference_steps", steps, limits.max_steps)
    cfg = payload.get("guidance_scale", DEFAULTS["guidance_scale"])
    _check_one(pipe, "guidance_scale", cfg=cfg)
    cfg_r = payload.get("reward_guidance_scale", DEFAULTS["reward_guidance_scale"])
    _check_one(pipe, "reward_guidance_scale", cfg_r=cfg_r)
    for field, value in (("guidance_scale", cfg), ("reward_guidance_scale", cfg_r)):
        for v in (value.values() if isinstance(value, dict) else [value]):
            if v is not None and v > limits.max_guidance:
                raise RequestError(field, f"{field} = {v:g}; this server allows at most {limits.max_guidance:g}")
    direction = payload.get("reward_direction", DEFAULTS["reward_direction"])
    _check_one(pipe, "reward_direction", direction=direction)
    n = payload.get("num_images_per_prompt", DEFAULTS["num_images_per_prompt"])
    _check_one(pipe, "num_images_per_prompt", n=n)
    _check_server_limit("num_images_per_prompt", n, limits.max_images)
    seed = payload.get("seed", DEFAULTS["seed"])
    if not isinstance(seed, int) or isinstance(seed, bool) or not -1 <= seed <= MAX_SEED:
        raise RequestError("seed", f"seed must be an integer in [0, 2**63 - 1], or -1 for a random "
                                   f"one; got {seed!r}")
    if seed == -1:
        seed = (rng or secrets).randbelow(2**31)  # a seed a person can retype

    try:
        pos = pipe.check_reward_targets(payload.get("reward_targets"), DEFAULTS["reward_target"],
                                        name="reward_targets")
    except ValueError as e:
        raise RequestError("reward_targets", str(e)) from None
    isolate = payload.get("isolate")
    if isolate is not None:
        if not isinstance(isolate, str) or isolate not in pos:
            raise RequestError("isolate", f"isolate = {isolate!r}; allowed: null or one of {list(pos)}")
        if payload.get("negative_reward_targets") is not None:
            raise RequestError("isolate", "pass either isolate or negative_reward_targets, not both "
                                          "(isolate sets the negative targets itself)")
        neg = isolation_targets(pos, isolate)
    else:
        try:
            neg = pipe.check_reward_targets(payload.get("negative_reward_targets"),
                                            DEFAULTS["negative_reward_target"],
                                            name="negative_reward_targets")
        except ValueError as e:
            raise RequestError("negative_reward_targets", str(e)) from None
    return GenerateRequest(prompt=prompt, reward_targets=pos, negative_reward_targets=neg,
                           isolate=isolate, num_inference_steps=int(steps),
                           guidance_scale=float(cfg), num_images_per_prompt=int(n), seed=int(seed),
                           reward_guidance_scale=(None if cfg_r is None else {k: float(v) for k, v in cfg_r.items()}
                                                  if isinstance(cfg_r, Mapping) else float(cfg_r)),
                           reward_direction=direction)


def png_data_url(image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL (PNG encoding is deterministic)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def run_generation(pipe, req: GenerateRequest) -> tuple[list, float]:
    """Generate for a checked request; returns the PIL images and the seconds it took."""
    import torch

    generator = torch.Generator(device=pipe.device).manual_seed(req.seed)
    t0 = time.perf_counter()
    images = pipe(req.prompt, reward_targets=req.reward_targets,
                  negative_reward_targets=req.negative_reward_targets,
                  num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                  reward_guidance_scale=req.reward_guidance_scale, reward_direction=req.reward_direction,
                  num_images_per_prompt=req.num_images_per_prompt, generator=generator,
                  output_type="pil")
    return images, time.perf_counter() - t0


def handle_generate(pipe, payload: Any, limits: DemoLimits | None = None,
                    lock: GenerationQueue | threading.Lock | None = None,
                    still_wanted: Callable[[], bool] | None = None) -> tuple[int, dict[str, Any]]:
    """``POST /api/generate``: 200 with the images, 400 for a bad field, 503 when
    ``limits.max_waiting`` requests already wait or the running generation did not finish within
    ``limits.queue_timeout_s``. ``still_wanted`` (the server: is the client still connected?) is
    asked when the request's turn comes; a request nobody waits for any more is not run (499)."""
    limits = limits or DemoLimits()
    try:
        req = parse_generate_request(pipe, payload, limits)
    except RequestError as e:
        return 400, e.body()
    lock = GENERATE_LOCK if lock is None else lock
    try:
        turn = (lock.acquire(timeout=limits.queue_timeout_s, max_waiting=limits.max_waiting)
                if isinstance(lock, GenerationQueue) else lock.acquire(timeout=limits.queue_timeout_s))
    except QueueFull:
        return 503, {"error": f"busy: {limits.max_waiting} requests are already waiting; try again later",
                     "field": None}
    if not turn:
        return 503, {"error": f"busy: another generation is still running after "
                              f"{limits.queue_timeout_s:g} s; try again", "field": None}
    try:
        if still_wanted is not None and not still_wanted():
            return 499, {"error": "the client closed the connection before its turn", "field": None}
        images, seconds = run_generation(pipe, req)
    finally:
        lock.release()
    body = asdict(req)
    body.update(images=[png_data_url(im) for im in images], width=images[0].size[0],
                height=images[0].size[1], seconds=round(seconds, 3))
    return 200, body


def output_resolution(pipe) -> int:
    """Side of the generated images in pixels: the model's resolution times the codec's
    downsampling factor (1 for pixel models, 8 for the SDXL VAE)."""
    cfg = pipe.config
    res = int(cfg.get("data_resolution", cfg["network"]["data_size"]))
    return res * int(getattr(pipe.autoencoder, "downsample", 1))


def _folder_name(name):
    """A local folder by its last component (its full path says who runs the server and how their
    disk is laid out); anything else, a hub id or a built-in name, as given."""
    if name and Path(str(name)).exists():
        return Path(str(name)).resolve().name
    return name


def handle_info(pipe, model_name: str, limits: DemoLimits | None = None,
                show_paths: bool = True) -> tuple[int, dict[str, Any]]:
    """``GET /api/info``: what the page needs to build its controls. ``show_paths=False`` (a server
    bound beyond loopback) names local folders without their path."""
    limits = limits or DemoLimits()
    source = getattr(pipe, "source", None)
    if not show_paths:
        model_name, source = _folder_name(model_name), _folder_name(source)
    keys = list(pipe.coherence_keys)
    shapes = all(k.startswith("shapes_") for k in keys)
    return 200, {
        "model": model_name,
        "source": source,
        "device": str(pipe.device),
        "coherence_keys": keys,
        "labels": {k: LABELS.get(k, k.replace("_", " ")) for k in keys},
        "resolution": output_resolution(pipe),
        "defaults": dict(DEFAULTS),
        "slider_step": 1.0 / SLIDER_BINS,
        "limits": {"max_steps": limits.max_steps, "max_images": limits.max_images,
                   "max_prompt_chars": limits.max_prompt_chars, "max_guidance": limits.max_guidance},
        "examples": list(SHAPES_EXAMPLES if shapes else PHOTO_EXAMPLES),
    }
