"""Stage ``vae`` of ``miro preprocess``: latents, text embeddings and scores into enriched tars.

For each usable sample of a shard: the autoencoder's latent moments at every resolution
(centre crop 1:1, resize, [-1, 1]), the text embeddings of the original and the long synthetic
caption trimmed to the attention mask (float16), and the score CSV's values merged into the
JSON, streamed into ``{dest}/{stem}.tar`` in the published sample layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miro.data import preprocess_io as pio
from miro.data.schema import latent_name, synthetic_reward_key, text_embedding_name
from miro.data.stages import StageOptions, _Stage, autocast


def _max_tokens(encoder: Any, cap: int) -> int:
    """Token limit for an encoder: ``cap``, bounded by its position table when it has one."""
    model = getattr(encoder, "model", None)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(cap, int(limit)) if limit else cap


def encode_trimmed(encoder: Any, prompts: list[str], cap: int) -> list[np.ndarray]:
    """Text embeddings of each prompt trimmed to its attention mask, float16 (L_i, E).

    Encoders that pad to a fixed ``max_length`` are run with ``max_length`` set to the longest
    prompt of the batch (capped at ``cap``): masked padding never reaches the unmasked tokens'
    outputs, so the trimmed embeddings equal those of padding to ``cap`` (checked in the tests)
    at a fraction of the cost when ``cap`` is large (upstream uses 2048 with ``padding="longest"``).
    """
    if hasattr(encoder, "load"):
        encoder.load()
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None and hasattr(encoder, "max_length"):
        cap = _max_tokens(encoder, cap)
        longest = max(len(ids) for ids in tok(prompts, truncation=True, max_length=cap)["input_ids"])
        saved = encoder.max_length
        encoder.max_length = max(1, longest)
        try:
            emb, mask = encoder.encode(prompts)
        finally:
            encoder.max_length = saved
    else:
        emb, mask = encoder.encode(prompts)
    emb, mask = emb.float().cpu(), mask.bool().cpu()
    return [emb[i][mask[i]].numpy().astype(np.float16) for i in range(len(prompts))]


@dataclass
class EncodeSpec:
    """What stage ``vae`` writes besides the source image, caption and JSON."""

    resolutions: tuple[int, ...] = (256, 512)  # latent resolutions; () writes no latents
    resize_filter: str = "bicubic"  # see preprocess_io.to_model_input
    text_max_length: int = 2048  # token cap for the stored embeddings (upstream default)
    required_stages: tuple[str, ...] = ("rewards", "vqa")  # score stages that must be complete
    extra: dict = field(default_factory=dict)  # encoder / codec specs for the config signature


def _is_synthetic(key: str) -> bool:
    """A JSON key or CSV column of the synthetic captions: the captions and ``synthetic_<reward>``."""
    return key in pio.CAPTION_COLUMNS or key.startswith(synthetic_reward_key(""))


class MissingStageError(ValueError):
    """Stage ``vae`` found no (complete) scores for a shard; the message names the stage to run."""


class EncodeStage(_Stage):
    """Stage ``vae``: latents + text embeddings + merged scores into an enriched tar."""

    name = "vae"

    def __init__(self, text_encoder: Any, codec: Any | None, spec: EncodeSpec, opts: StageOptions):
        super().__init__(opts)
        if opts.dest is None:
            raise ValueError("stage 'vae' needs --dest (the folder for enriched tars)")
        self.text_encoder = text_encoder
        self.codec = codec
        self.spec = spec

    def settings(self) -> dict:
        return {"resolutions": list(self.spec.resolutions), "resize_filter": self.spec.resize_filter,
                "text_max_length": self.spec.text_max_length, "synthetic": self.opts.synthetic,
                "text_encoder": getattr(self.text_encoder, "schema_name", "?"),
                "precision": self.opts.precision, **self.spec.extra}

    def dest_path(self, shard: Path) -> Path:
        return Path(self.opts.dest) / shard.name

    def _scores_fingerprint(self, shard: Path) -> dict | None:
        p = pio.scores_csv_path(self.opts.csv_dir, shard)
        return pio.fingerprint(p) if p.is_file() else None

    def is_complete(self, shard: Path) -> bool:
        log = self._log_ok(shard)
        out = self.dest_path(shard)
        if log is None or not out.is_file() or log.get("scores") != self._scores_fingerprint(shard):
            return False
        return out.stat().st_size == log.get("output_size") and pio.tar_sample_count(out) == log.get("samples_ok")

    def check_inputs(self, shard: Path) -> tuple[dict[str, dict], list[str]]:
        """The shard's scores and the columns every sample needs (the score stages' columns), or
        :class:`MissingStageError` naming the stage to run."""
        csv_path = pio.scores_csv_path(self.opts.csv_dir, shard)
        hint = f"run `miro preprocess --stage {{}} --src ... --csv_dir {self.opts.csv_dir}` for it first"
        if not csv_path.is_file():
            raise MissingStageError(f"shard {shard.name}: no scores at {csv_path}; stage 'vae' merges the "
                                    f"scores of stage 'rewards': " + hint.format("rewards"))
        rows = pio.check_scores_csv(csv_path, "rewards")
        required: list[str] = []
        for stage in self.spec.required_stages:
            log = pio.read_log(pio.log_path(self.opts.csv_dir, shard, stage))
            if log is None or log.get("status") != "complete" or log.get("source") != pio.fingerprint(shard):
                raise MissingStageError(f"shard {shard.name}: stage {stage!r} has not completed for this shard "
                                        f"(no complete log at {pio.log_path(self.opts.csv_dir, shard, stage)}); "
                                        + hint.format(stage))
            self._check_synthetic(shard, stage, log)
            cols = log.get("columns", [])
            done = [k for k, r in rows.items() if all(r.get(c) is not None for c in cols)]
            if pio.keys_digest(done) != log.get("keys_digest"):  # e.g. the other stage rebuilt the CSV
                raise MissingStageError(f"shard {shard.name}: the scores of stage {stage!r} are no longer all in "
                                        f"{csv_path}; " + hint.format(stage))
            required += [c for c in cols if c not in required]
        return rows, required

    def _check_synthetic(self, shard: Path, stage: str, log: dict) -> None:
        """Refuse synthetic embeddings over a score stage that ran with ``--no-synthetic``: the
        enriched JSON would carry the synthetic captions without their ``synthetic_<reward>``
        values (the other way round is fine: ``--no-synthetic`` here drops every synthetic column)."""
        if self.opts.synthetic and (log.get("config") or {}).get("synthetic") is False:
            raise MissingStageError(
                f"shard {shard.name}: stage {stage!r} ran with --no-synthetic, so it computed no synthetic_<reward> "
                f"values for the synthetic captions this 'vae' run embeds; rerun stage {stage!r} without "
                "--no-synthetic, or run stage 'vae' with --no-synthetic as well")

    def _transform(self, sample: pio.RawSample) -> dict[int, np.ndarray]:
        return {r: pio.to_model_input(sample.image, r, self.spec.resize_filter) for r in self.spec.resolutions}

    def _encode_batch(self, batch, scores: dict[str, dict], required: list[str],
                      report: pio.ShardReport) -> list[dict]:
        kept = []
        for s, pix in batch:
            missing = [c for c in required if scores.get(s.key, {}).get(c) is None]
            if missing:  # a score stage skipped this sample (e.g. its scorer failed on it)
                report.skip(s.key, "missing scores", ", ".join(missing))
            else:
                kept.append((s, pix))
        if not kept:
            return []
        out = [{"__key__": s.key, s.image_ext: s.image_bytes, "txt": s.txt_bytes} for s, _ in kept]
        metas = []
        longs = []
        for s, _ in kept:
            row = scores[s.key]
            meta = dict(s.meta)
            if not self.opts.synthetic:  # --no-synthetic drops everything synthetic, the source JSON's too
                row = {c: v for c, v in row.items() if not _is_synthetic(c)}
                meta = {k: v for k, v in meta.items() if not _is_synthetic(k)}
            if self.opts.synthetic:
                long, short, _ = pio.resolve_captions(s, self.opts.captions)
                long = row.get("synthetic_caption") or long  # the captions the rewards were computed on
                short = row.get("short_synthetic_caption") or short
                meta["synthetic_caption"], meta["short_synthetic_caption"] = long, short
                longs.append(long)
            # The current score stages' columns only: a column no stage writes any more (a scorer
            # dropped from --scorers, a vqa run before --vqa-scorer none) holds scores of another
            # run, maybe of other images. A non-finite score leaves no key (a missing reward),
            # not the source JSON's own value under that name.
            for col in required:
                if not self.opts.synthetic and _is_synthetic(col):
                    continue
                v = row.get(col)
                if pio.finite(v):
                    meta[col] = float(v)
                else:
                    meta.pop(col, None)
            metas.append(meta)
        bad: set[int] = set()
        enc_name = getattr(self.text_encoder, "schema_name", "text")
        with torch.inference_mode():
            for synthetic, prompts in ((False, [pio.clean_caption(s.caption) for s, _ in kept]),
                                       (True, longs if self.opts.synthetic else None)):
                if prompts is None:
                    continue
                for i, e in enumerate(encode_trimmed(self.text_encoder, prompts, self.spec.text_max_length)):
                    if not np.isfinite(e).all():
                        bad.add(i)
                    out[i][text_embedding_name(enc_name, synthetic)] = e
            if self.codec is not None:
                for r in self.spec.resolutions:
                    x = torch.from_numpy(np.stack([pix[r] for _, pix in kept])).to(self.opts.device)
                    with autocast(self.opts.device, self.opts.precision):
                        mean, std = self.codec.encode(x)
                    mean = mean.float().cpu().numpy().astype(np.float16)
                    std = std.float().cpu().numpy().astype(np.float16)
                    for i in range(len(kept)):
                        if not (np.isfinite(mean[i]).all() and np.isfinite(std[i]).all()):
                            bad.add(i)
                        out[i][latent_name("mean", r)] = mean[i]
                        out[i][latent_name("std", r)] = std[i]
        result = []
        for i, (sample, meta) in enumerate(zip(out, metas)):
            if i in bad:  # fp16 overflow or a broken model output: never write NaN into training data
                report.skip(sample["__key__"], "non-finite embedding")
                continue
            sample["json"] = meta
            result.append(sample)
        return result

    def run_shard(self, shard: Path) -> pio.ShardReport:
        t0 = time.perf_counter()
        scores, required = self.check_inputs(shard)
        scores_fp = self._scores_fingerprint(shard)
        report = pio.ShardReport(self.name, shard.name)
        self._mark_running(shard, report)
        out_path = self.dest_path(shard)
        pio.remove_stale_temps(out_path.parent, out_path.name)
        saved = self._load_checkpoint(shard, report, scores=scores_fp)
        resumable = saved is not None  # saved progress refers to the spool
        writer = None
        if saved is not None:
            try:
                writer = pio.SortedShardWriter(out_path, resume=saved["writer"])
            except (ValueError, KeyError, TypeError):  # its spool is gone or another run's: start over
                report, resumable = pio.ShardReport(self.name, shard.name), False
        if writer is None:
            # Before the spool is recreated: a checkpoint of another config (or an --overwrite'd
            # one) left in place would resume, in a later run with that config, into this run's bytes.
            self.checkpoint_path(shard).unlink(missing_ok=True)
            writer = pio.SortedShardWriter(out_path)
        report.samples_ok = writer.n_samples
        done = [*writer.keys, *report.skipped_keys]
        last_save = time.monotonic()
        try:
            transform = self._transform if self.codec is not None else None
            with self._progress(shard) as bar:
                bar.update(report.samples_read)
                for batch in pio.batched(pio.iter_decoded(shard, report, transform=transform, done=done,
                                                          workers=self.opts.num_workers), self.opts.batch_size):
                    for sample in self._encode_batch(batch, scores, required, report):
                        writer.write(sample)
                        report.samples_ok += 1
                    bar.update(report.samples_read - bar.n)
                    if time.monotonic() - last_save >= self.opts.checkpoint_seconds:
                        self._save_checkpoint(shard, report, scores=scores_fp, writer=writer.checkpoint())
                        resumable, last_save = True, time.monotonic()
            pio.check_some_usable(report, report.samples_ok)  # never a complete tar of no sample from a full one
            writer.commit()
        except BaseException:
            if resumable:
                writer.close()  # keep the spool: the saved progress resumes from it
            else:
                writer.abort()  # no saved progress refers to it: leave no spool behind
            raise
        report.seconds = time.perf_counter() - t0
        pio.write_log(self.log_path(shard), report, "complete", source=pio.fingerprint(shard), config=self.config(shard),
                      scores=scores_fp, output=str(out_path), output_size=out_path.stat().st_size)
        self.checkpoint_path(shard).unlink(missing_ok=True)
        return report
