"""The three preprocessing stages of ``miro preprocess``, one shard at a time.

- :class:`ScoreStage` (``rewards`` and ``vqa``): score every usable sample with a set of
  :class:`~miro.rewards.Scorer` s, for the original caption and for the synthetic caption each
  reward uses, and merge the stored (``normalize``-d) values into ``{stem}_scores.csv``.
- :class:`~miro.data.encode_stage.EncodeStage` (``vae``, in its own module): latent moments at
  each resolution, text embeddings of both captions trimmed to the mask, scores merged into the
  JSON, written as an enriched tar.

Models are loaded once per stage by the caller and passed in, so the same code runs the real
models (SDXL VAE, FLAN-T5-XL, the published reward models) and the Shapes world (identity
codec, MiniLM, ``shapes_*`` rewards). Each stage knows whether a shard is already complete
(:meth:`is_complete`): a rerun skips those and resumes the others from their last within-shard
checkpoint (or their start).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miro.data import preprocess_io as pio
from miro.data.schema import synthetic_reward_key

# Which synthetic caption each published reward scores (rewards_and_geneval_facts.md §1,
# "Synthetic twins", from upstream `_compute_reward_scores` / `stage_vqa`): CLIP and VQA read the
# long caption; ImageReward, PickScore, HPSv2 and SciScore the short one (their text towers
# truncate at 35-77 tokens); the aesthetic score ignores text, so its value is copied.
SYNTHETIC_CAPTION = {
    "clip_score": "long",
    "vqa_score": "long",
    "image_reward_score": "short",
    "pick_a_score_score": "short",
    "hpsv2_score": "short",
    "sciscore_score": "short",
    "aesthetic_score": "copy",
    # Shapes world (miro/shapes/rewards.py): the image-only rewards, copied as the Shapes dataset
    # writer does; the text rewards (alignment, counting, position) read the long caption.
    "shapes_sharpness": "copy",
    "shapes_contrast": "copy",
}
CAPTION_KINDS = ("long", "short", "copy")
# Scorer factory arguments that permit or locate a download but do not change a score: left out
# of the stage config, so that adding them does not redo finished shards.
_NOT_SCORE_KWARGS = ("trust_remote_code", "local_files_only")


@dataclass
class StageOptions:
    """Options shared by every stage."""

    csv_dir: Path  # where score CSVs and per-shard logs live
    dest: Path | None = None  # where enriched tars go (stage vae)
    batch_size: int = 64  # samples per model call
    device: str = "cpu"  # torch device of the models
    precision: str = "fp32"  # autocast around model calls: fp32 (off), bf16, fp16
    synthetic: bool = True  # also score/encode the synthetic captions
    captions: dict[str, tuple[str, str]] | None = None  # TSV captions {key: (short, long)}; None: the JSON's
    num_workers: int = 0  # image-decoding threads (0: decode in the main thread)
    overwrite: bool = False  # redo shards even when complete
    checkpoint_seconds: float = 120.0  # save progress within a shard this often (0: after every batch)
    progress: bool = True  # tqdm bar per shard


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def synthetic_caption_kind(name: str, scorer: Any) -> str:
    """``long``, ``short`` or ``copy``: a scorer's own ``synthetic_caption`` attribute wins, then
    the published table; any other text-conditioned reward reads the long caption."""
    kind = getattr(scorer, "synthetic_caption", None) or SYNTHETIC_CAPTION.get(name, "long")
    if kind not in CAPTION_KINDS:
        raise ValueError(f"scorer {name!r} declares synthetic_caption={kind!r}; allowed: {CAPTION_KINDS}")
    return kind


class _Stage:
    name = ""

    def __init__(self, opts: StageOptions):
        self.opts = opts
        self._caption_ids: dict[tuple[str, str], str] = {}

    def settings(self) -> dict:
        """What decides this stage's output, the same for every shard."""
        raise NotImplementedError

    def config(self, shard: Path) -> dict:
        """:meth:`settings` and the captions of this shard's samples: a log or a checkpoint written
        under another config is not 'complete' (the shard is redone)."""
        return {**self.settings(), "captions": self._captions_id(shard)}

    def _captions_id(self, shard: Path) -> str:
        # A digest of the TSV entries of this shard's keys, not the file's name and size: another
        # shard's caption, or a line for no shard, leaves it alone; an edit of the same length does not.
        if self.opts.captions is None:
            return "json"
        ident = (str(shard), json.dumps(pio.fingerprint(shard), sort_keys=True))
        if ident not in self._caption_ids:
            self._caption_ids[ident] = "tsv:" + pio.captions_digest(self.opts.captions, pio.shard_keys(shard))
        return self._caption_ids[ident]

    def log_path(self, shard: Path) -> Path:
        return pio.log_path(self.opts.csv_dir, shard, self.name)

    def _log_ok(self, shard: Path) -> dict | None:
        log = pio.read_log(self.log_path(shard))
        if (log is None or log.get("status") != "complete" or log.get("source") != pio.fingerprint(shard)
                or log.get("config") != self.config(shard)):
            return None
        return log

    def _mark_running(self, shard: Path, report: pio.ShardReport) -> None:
        """Replace the shard's log by a 'running' one: a killed run never looks complete."""
        import os
        import socket

        pio.write_log(self.log_path(shard), report, "running", host=socket.gethostname(), pid=os.getpid())

    # -- within-shard checkpoints: a killed run resumes at the last saved batch -------------
    def checkpoint_path(self, shard: Path) -> Path:
        return self.log_path(shard).with_suffix(".partial.json")

    def _save_checkpoint(self, shard: Path, report: pio.ShardReport, **payload) -> None:
        body = {"source": pio.fingerprint(shard), "config": self.config(shard), "samples_read": report.samples_read,
                "skipped": report.skipped, "errors": report.errors, "skipped_keys": report.skipped_keys,
                "fallback_captions": report.fallback_captions, **payload}
        pio.atomic_write_bytes(self.checkpoint_path(shard), json.dumps(body).encode("utf-8"))

    def _load_checkpoint(self, shard: Path, report: pio.ShardReport, **match) -> dict | None:
        """The saved progress of an interrupted run (restoring ``report``), or None when there is
        none or it no longer applies (the source, the stage config or ``match`` changed)."""
        path = self.checkpoint_path(shard)
        if self.opts.overwrite or not path.is_file():
            return None
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (body.get("source") != pio.fingerprint(shard) or body.get("config") != self.config(shard)
                or any(body.get(k) != v for k, v in match.items())):
            return None
        report.samples_read = body["samples_read"]
        report.skipped, report.errors = dict(body["skipped"]), list(body["errors"])
        report.skipped_keys = list(body["skipped_keys"])
        report.fallback_captions = int(body.get("fallback_captions", 0))
        return body

    def _progress(self, shard: Path):
        from tqdm.auto import tqdm

        total = len(pio.shard_keys(shard)) if self.opts.progress else None
        return tqdm(total=total, desc=f"{self.name} {shard.name}", unit="sample", disable=not self.opts.progress,
                    leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- scoring stages


class ScoreStage(_Stage):
    """Stage ``rewards`` (or ``vqa``): rewards of both captions into the shard's score CSV."""

    def __init__(self, name: str, scorers: dict[str, Any], opts: StageOptions,
                 scorer_kwargs: dict[str, dict] | None = None):
        super().__init__(opts)
        if not scorers:
            raise ValueError(f"stage {name!r} needs at least one scorer")
        self.name = name
        self.scorers = scorers
        self.kinds = {n: synthetic_caption_kind(n, s) for n, s in scorers.items()}
        self.scorer_kwargs = scorer_kwargs or {}  # the factory arguments the scorers were built with

    def columns(self) -> list[str]:
        cols = list(self.scorers)
        if self.opts.synthetic:
            cols += [synthetic_reward_key(n) for n in self.scorers]
        return cols

    def settings(self) -> dict:
        # Factory arguments (a model folder, HPS version=...) and the autocast precision change the
        # scores, so a change redoes the shard like any other config change. Arguments that only
        # permit or locate a download do not.
        kwargs = {n: {k: v for k, v in sorted(self.scorer_kwargs.get(n, {}).items()) if k not in _NOT_SCORE_KWARGS}
                  for n in sorted(self.scorers)}
        return {"scorers": sorted(self.scorers), "synthetic": self.opts.synthetic,
                "precision": self.opts.precision, "scorer_kwargs": {n: kw for n, kw in kwargs.items() if kw}}

    def is_complete(self, shard: Path) -> bool:
        log = self._log_ok(shard)
        path = pio.scores_csv_path(self.opts.csv_dir, shard)
        if log is None or not path.is_file():
            return False
        try:
            rows = pio.read_scores_csv(path)
        except (OSError, ValueError):
            return False
        cols = self.columns()
        done = [k for k, r in rows.items() if all(r.get(c) is not None for c in cols)]
        return pio.keys_digest(done) == log.get("keys_digest")

    def _score(self, samples: list[pio.RawSample], caps: list[tuple[str, str]]) -> list[dict]:
        """Stored values per sample for every scorer, original and synthetic captions."""
        images = [s.image for s in samples]
        original = [pio.clean_caption(s.caption) for s in samples]
        rows: list[dict] = [{} for _ in samples]
        with torch.inference_mode(), autocast(self.opts.device, self.opts.precision):
            for name, scorer in self.scorers.items():
                vals = scorer.normalize(scorer.score(images, original)).float().cpu().tolist()
                if len(vals) != len(samples):
                    raise RuntimeError(f"scorer {name!r} returned {len(vals)} scores for {len(samples)} images")
                syn = None
                kind = self.kinds[name]
                if self.opts.synthetic:
                    if kind == "copy":
                        syn = vals
                    else:
                        prompts = [c[0] if kind == "long" else c[1] for c in caps]
                        syn = scorer.normalize(scorer.score(images, prompts)).float().cpu().tolist()
                for i, row in enumerate(rows):
                    row[name] = vals[i]
                    if syn is not None:
                        row[synthetic_reward_key(name)] = syn[i]
        return rows

    def _score_robust(self, samples, caps, report: pio.ShardReport, shard_ok: bool,
                      failures: list[Exception]) -> list[tuple[pio.RawSample, tuple, dict]]:
        """Score a batch; if it fails, score sample by sample and skip the ones that fail
        (counted as ``scoring failed``, their errors appended to ``failures``).

        A failure is systematic (re-raised: the shard fails, the job goes on) only while nothing of
        the shard has been scored (``shard_ok`` False): a batch of two or more samples that all fail
        on their own. One failing sample alone (a last batch of one, ``--batch-size 1``) cannot tell
        a bad sample from a broken model: it is skipped, and :meth:`run_shard` fails the shard at
        its end when no sample at all was scored.
        """
        try:
            return list(zip(samples, caps, self._score(samples, caps)))
        except Exception as batch_error:
            out, failed = [], []
            if len(samples) == 1:  # it has just failed on its own
                failed.append((samples[0], batch_error))
            else:
                for s, c in zip(samples, caps):
                    try:
                        out.append((s, c, self._score([s], [c])[0]))
                    except Exception as e:
                        failed.append((s, e))
                if not out and not shard_ok:
                    raise batch_error
            for s, e in failed:
                report.skip(s.key, "scoring failed", f"{type(e).__name__}: {e}")
                failures.append(e)
            return out

    def _other_stage(self) -> str:
        return {"rewards": "vqa", "vqa": "rewards"}.get(self.name, "the other score stage")

    def _check_captions(self, csv_path: Path, stored: dict[str, dict], samples, caps) -> None:
        """Fail a batch at once when its captions differ from those the other score stage scored
        in the CSV read at start (the merge checks again under the lock; this one spares the
        scoring of a shard whose merge would be refused)."""
        if not self.opts.synthetic or not stored:
            return
        mine = [*self.columns(), *pio.CAPTION_COLUMNS]  # this stage's own old values are replaced, not a conflict
        for s, (long, short) in zip(samples, caps):
            new = {"synthetic_caption": long, "short_synthetic_caption": short}
            found = pio.caption_conflict(stored[s.key], new, mine) if s.key in stored else None
            if found is not None:
                raise pio.CaptionConflictError.of(csv_path, s.key, found, self.name, self._other_stage())

    def run_shard(self, shard: Path) -> pio.ShardReport:
        t0 = time.perf_counter()
        csv_path = pio.scores_csv_path(self.opts.csv_dir, shard)
        stored: dict[str, dict] = {}
        if not self.opts.overwrite:  # an unreadable CSV fails now, not after the whole shard is scored
            stored = pio.check_scores_csv(csv_path, self.name)
        report = pio.ShardReport(self.name, shard.name)
        self._mark_running(shard, report)
        saved = self._load_checkpoint(shard, report)
        rows: dict[str, dict] = saved["rows"] if saved else {}
        done = [*rows, *report.skipped_keys]
        failures: list[Exception] = []
        last_save = time.monotonic()
        with self._progress(shard) as bar:
            bar.update(report.samples_read)
            for batch in pio.batched(pio.iter_decoded(shard, report, workers=self.opts.num_workers, done=done),
                                     self.opts.batch_size):
                samples = [s for s, _ in batch]
                resolved = [pio.resolve_captions(s, self.opts.captions) for s in samples]
                caps = [r[:2] for r in resolved]
                if self.opts.synthetic:
                    report.fallback_captions += sum(src == "original" for _, _, src in resolved)
                self._check_captions(csv_path, stored, samples, caps)
                for s, (long, short), vals in self._score_robust(samples, caps, report, bool(rows), failures):
                    if self.opts.synthetic:
                        vals["synthetic_caption"], vals["short_synthetic_caption"] = long, short
                    rows[s.key] = vals
                bar.update(report.samples_read - bar.n)  # usable and skipped samples alike
                if time.monotonic() - last_save >= self.opts.checkpoint_seconds:
                    self._save_checkpoint(shard, report, rows=rows)
                    last_save = time.monotonic()
        if failures and not rows:  # every sample the scorers saw failed: the model, not the data
            raise failures[0]
        pio.check_some_usable(report, len(rows))  # e.g. a tar whose members are not grouped by sample
        report.samples_ok = len(rows)
        cols = self.columns()
        if self.opts.synthetic:
            cols += list(pio.CAPTION_COLUMNS)
        else:  # a --no-synthetic rerun also drops this stage's stale synthetic values
            cols += [synthetic_reward_key(n) for n in self.scorers]
        pio.merge_scores_csv(csv_path, rows, cols, keys=set(pio.shard_keys(shard)), rebuild=self.opts.overwrite,
                             stage=self.name, other=self._other_stage())
        report.seconds = time.perf_counter() - t0
        pio.write_log(self.log_path(shard), report, "complete", source=pio.fingerprint(shard),
                      config=self.config(shard), keys_digest=pio.keys_digest(rows), output=str(csv_path),
                      columns=self.columns())
        self.checkpoint_path(shard).unlink(missing_ok=True)
        return report
