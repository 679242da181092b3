"""``miro preprocess``: raw webdataset shards -> enriched MIRO training shards, in three stages.

Raw shards hold ``{key}.jpg|png``, ``{key}.txt`` (caption) and optionally ``{key}.json``.

1. ``rewards``: every reward except VQAScore, for the original caption and for the synthetic
   caption each reward uses (CLIP: long, ImageReward/PickScore/HPSv2/SciScore: short, aesthetic:
   copied), written to ``{csv_dir}/{stem}_scores.csv``.
2. ``vqa``: VQAScore (original + long synthetic caption) merged into the same CSV. Run it as its
   own job: the VQA model is the largest and should not share a GPU with the others.
3. ``vae``: latent moments at 256 and 512 px (centre crop 1:1, bicubic resize), text embeddings of
   the original and synthetic captions (float16, trimmed to the mask), the stored reward values
   merged into the JSON, written as ``{dest}/{stem}.tar`` in the published sample layout.

``--stage all`` runs the three in order in one process, freeing each stage's models before the
next (``--isolate-stages``: each stage in its own child process instead). Shards are chosen with ``--shard_id N``, ``--shard_ids a,b,c`` or ``--shard_range a-b``
(inclusive) over the sorted ``*.tar`` of ``--src``; none means every shard. Outputs are written
atomically; a rerun skips shards whose outputs are complete and valid and redoes the others.
Damaged samples are skipped and counted in ``{csv_dir}/logs/{stem}.{stage}.json``.

Every model is chosen by name, so the same command preprocesses the Shapes world::

    miro preprocess --stage all --src raw/ --dest enriched/ --scorers shapes_... \\
        --vqa-scorer none --text-encoder minilm --autoencoder identity
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from miro.data import preprocess_io as pio
from miro.data.schema import list_shards, select_shards

STAGES = ("rewards", "vqa", "vae")
# Stage 1 scores the six published rewards other than VQAScore (upstream `stage_rewards`).
DEFAULT_SCORERS = ("clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score",
                   "hpsv2_score", "sciscore_score")
DEFAULT_VQA_SCORER = "vqa_score"
DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"
DEFAULT_AUTOENCODER = "stabilityai/sdxl-vae"
PRECISIONS = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --isolate-stages re-runs the same arguments minus its own flags, which it
    # finds by their full names (an abbreviation such as --isolate would reach the children)
    p = argparse.ArgumentParser(prog="miro preprocess", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=(*STAGES, "all"), help="which stage to run")
    p.add_argument("--src", required=True, help="folder of raw *.tar shards (or one .tar)")
    p.add_argument("--csv_dir", help="folder for score CSVs and per-shard logs (default: SRC/scores)")
    p.add_argument("--dest", help="folder for enriched tars (stages vae and all)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--shard_id", type=int, help="the N-th tar of SRC in sorted order")
    sel.add_argument("--shard_ids", help="comma-separated shard indices, e.g. 0,5,9")
    sel.add_argument("--shard_range", help="inclusive index range a-b, e.g. 0-99")
    cap = p.add_argument_group("captions")
    cap.add_argument("--synthetic_captions", help="TSV: file_name<TAB>short<TAB>long, no header (else read "
                     "synthetic_caption / short_synthetic_caption from each sample's JSON)")
    cap.add_argument("--no-synthetic", "--no_synthetic", dest="no_synthetic", action="store_true",
                     help="original captions only: no synthetic rewards or embeddings")
    mod = p.add_argument_group("models (any of them swappable by name)")
    mod.add_argument("--scorers", default=",".join(DEFAULT_SCORERS),
                     help="comma-separated rewards of stage rewards (default: %(default)s)")
    mod.add_argument("--vqa-scorer", default=DEFAULT_VQA_SCORER,
                     help="reward of stage vqa, or 'none' to have no vqa stage (default: %(default)s)")
    mod.add_argument("--scorer-kwargs", default="{}",
                     help='JSON {"reward": {kwarg: value}} passed to load_scorer, e.g. local weight folders')
    mod.add_argument("--trust-remote-code", action="store_true",
                     help="let rewards whose hub model runs its own code load it (clip_score's jina-clip-v2, "
                          "MIRO's CLIP reward); off by default")
    mod.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                     help="name, folder or hub id (default: %(default)s; 'minilm' for the Shapes world)")
    mod.add_argument("--text-max-length", type=int, default=2048,
                     help="token cap of stored text embeddings (default: %(default)s, as upstream)")
    mod.add_argument("--autoencoder", default=DEFAULT_AUTOENCODER,
                     help="name, folder or hub id; 'identity' for pixel space (default: %(default)s)")
    mod.add_argument("--resolutions", help="latent resolutions, comma-separated (default: 256,512; "
                     "none for the identity codec, whose training reads the image itself)")
    mod.add_argument("--no_vae_512", action="store_true", help="skip the 512 px latents")
    mod.add_argument("--resize-filter", default="bicubic", choices=pio.RESIZE_FILTERS,
                     help="resampling filter of the centre-cropped image (default: %(default)s)")
    run = p.add_argument_group("execution")
    run.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                     help="samples per model call (default: %(default)s)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="autocast dtype of reward and VAE models (default: bf16 on cuda, fp32 on cpu); "
                          "text encoders always run in fp32")
    run.add_argument("--num-workers", type=int, default=2, help="image-decoding threads (default: %(default)s)")
    run.add_argument("--overwrite", action="store_true", help="redo shards even when their outputs are complete")
    run.add_argument("--checkpoint-seconds", type=float, default=120.0,
                     help="save progress within a shard this often, so a killed job resumes mid-shard "
                          "(default: %(default)s; 0: after every batch)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the shards each stage would process (and those already complete); load no model")
    run.add_argument("--isolate-stages", action="store_true",
                     help="with --stage all: run each stage in its own Python process, so the next stage "
                          "starts with all of the previous stage's GPU memory returned")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _parse_resolutions(args, codec_is_identity: bool) -> tuple[int, ...]:
    # No latents are asked for by 'none' only: a list that parses empty is refused (a real VAE
    # would silently write shards that latent-space training cannot read).
    if args.resolutions is None:
        res = () if codec_is_identity else (256, 512)
    elif args.resolutions.strip().lower() == "none":
        res = ()
    else:
        try:
            res = tuple(int(r) for r in _csv_list(args.resolutions))
        except ValueError:
            raise ValueError(f"--resolutions must be comma-separated integers or 'none'; got {args.resolutions!r}") from None
        if not res:
            raise ValueError(f"--resolutions {args.resolutions!r} lists no resolution; give comma-separated "
                             "multiples of 8 (e.g. 256,512), or 'none' for no latents")
        for r in res:
            if r < 8 or r % 8:
                raise ValueError(f"--resolutions: {r} is not a positive multiple of 8")
    if args.no_vae_512:
        kept = tuple(r for r in res if r != 512)
        if res and not kept:
            given = args.resolutions if args.resolutions is not None else "256,512"
            raise ValueError(f"--no_vae_512 leaves no latent resolution of --resolutions {given!r}; "
                             "use --resolutions none for no latents")
        res = kept
    return res


def _hub_id_shaped(name: str) -> bool:
    """``owner/name`` (one slash, word characters, dots and dashes): a hub id, checked by name only."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]", name) is not None and ".." not in name


def check_text_encoder_name(spec: str) -> None:
    """A built-in name, a folder with ``config.json``, or an ``owner/name`` hub id (nothing is loaded
    or downloaded); otherwise a one-line ``ValueError``."""
    from miro.encoders.text import _MINILM_NAMES, _T5_NAMES

    name = str(spec).strip()
    builtin = _T5_NAMES + _MINILM_NAMES
    if name.lower() in {n.lower() for n in builtin}:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--text-encoder folder {name!r} has no config.json")
        return
    if path.exists():
        raise ValueError(f"--text-encoder {name!r} is a file; give a folder with config.json, a hub id or a "
                         f"built-in name ({', '.join(builtin)})")
    if not _hub_id_shaped(name):
        raise ValueError(f"unknown --text-encoder {name!r}: not a built-in name ({', '.join(builtin)}), not an "
                         "existing folder, not a hub id (owner/name)")


def check_autoencoder_name(spec: str):
    """Build (never load) the codec ``spec`` names: a built-in name, an ``AutoencoderKL`` folder or an
    ``owner/name`` hub id; weights stay unloaded. Otherwise a one-line ``ValueError``."""
    from miro.encoders.autoencoder import load_autoencoder

    name = str(spec).strip()
    if not Path(name).expanduser().is_dir() and "/" in name and not _hub_id_shaped(name):
        raise ValueError(f"unknown --autoencoder {name!r}: not an existing folder, not a hub id (owner/name)")
    try:
        return load_autoencoder(name)  # lazy: reads a folder's config.json at most
    except (ValueError, OSError) as e:
        raise ValueError(" ".join(str(e).split())) from None


def check_models(args, stages: tuple[str, ...], vqa: str | None) -> tuple[int, ...] | None:
    """Resolve every model name the chosen stages use, before any stage runs, without loading
    weights: rewards in the registry, the text encoder and autoencoder by name (a typo in
    ``--autoencoder`` must not cost a whole rewards stage first). Returns the latent
    resolutions of stage ``vae`` (None when it does not run)."""
    from miro.rewards import available

    wanted = []
    if "rewards" in stages:
        names = _csv_list(args.scorers)
        if not names:
            raise ValueError("--scorers is empty; name at least one reward")
        wanted += [("--scorers", n) for n in names]
    if "vqa" in stages and vqa is not None:
        wanted.append(("--vqa-scorer", vqa))
    if wanted:
        known = available()
        for flag, n in wanted:
            if n not in known:
                raise ValueError(f"{flag}: unknown reward {n!r}; available: {', '.join(known)}")
    if "vae" not in stages:
        return None
    if args.text_max_length is not None and args.text_max_length < 1:
        raise ValueError(f"--text-max-length must be >= 1; got {args.text_max_length}")
    check_text_encoder_name(args.text_encoder)
    from miro.encoders import IdentityCodec

    return _parse_resolutions(args, isinstance(check_autoencoder_name(args.autoencoder), IdentityCodec))


def load_scorers(names: list[str], kwargs: dict, device: str) -> dict:
    """Build the scorers (weights load lazily, see :func:`_load_now`)."""
    from miro.rewards import load_scorer

    out = {}
    for n in names:
        s = load_scorer(n, **kwargs.get(n, {}))
        out[n] = s.to(device) if hasattr(s, "to") else s
    return out


def _load_now(model) -> None:
    """Load lazily-loaded weights before the first shard, so that a missing model fails early
    and shard timings measure processing only."""
    from miro.rewards.base import Scorer, load_parts, load_weights

    if isinstance(model, Scorer):  # a missing reward model is named (the hub's message does not)
        load_weights(model)
    else:  # the VAE and text encoders name themselves when they cannot load
        load_parts(model)


def _free_models() -> None:
    """Release the finished stage's models before the next stage loads its own (GPU memory)."""
    import torch

    if torch.cuda.is_available():  # on CPU reference counting already freed them; gc costs ~1 s
        gc.collect()
        torch.cuda.empty_cache()


def run_stage(stage, shards: list[Path], overwrite: bool, models: list | None = None,
              dry_run: bool = False) -> tuple[int, int, int]:
    """Run a stage over shards; returns (done, skipped as complete, failed); with ``dry_run``,
    (shards to do, skipped as complete, 0) and nothing is run.

    ``models`` are loaded only when some shard still needs work (a rerun over finished shards
    never loads a multi-GB model)."""
    from miro.data.encode_stage import MissingStageError

    done = skipped = failed = 0
    totals = {"ok": 0, "skipped": 0}
    pending = []
    for shard in shards:
        if not overwrite and stage.is_complete(shard):
            print(f"{stage.name} {shard.name}: complete, skipped")
            skipped += 1
        else:
            pending.append(shard)
    if dry_run:
        for shard in pending:
            print(f"{stage.name} {shard.name}: to do")
        return len(pending), skipped, 0
    if pending:
        for m in models or []:
            _load_now(m)
    for shard in pending:
        try:
            report = stage.run_shard(shard)
        except MissingStageError as e:
            print(f"miro preprocess: {e}", file=sys.stderr)
            failed += 1
            continue
        except Exception as e:  # one broken shard must not stop a job over hundreds
            print(f"miro preprocess: {stage.name} {shard.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(report.summary())
        if report.n_skipped:
            print(f"  skipped samples are listed in {stage.log_path(shard)}")
        done += 1
        totals["ok"] += report.samples_ok
        totals["skipped"] += report.n_skipped
    if done:
        print(f"stage {stage.name}: {totals['ok']} samples written, {totals['skipped']} skipped as damaged")
    return done, skipped, failed


def _run_isolated(argv: list[str], stages: tuple[str, ...]) -> int:
    """``--stage all --isolate-stages``: each stage as a child ``miro preprocess`` process."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # the same arguments, minus --stage and --isolate-stages
        if skip:
            skip = False
        elif a == "--stage":
            skip = True
        elif not (a.startswith("--stage=") or a == "--isolate-stages"):
            rest.append(a)
    worst = 0
    for name in stages:
        cmd = [sys.executable, "-m", "miro.cli", "preprocess", "--stage", name, *rest]
        print(f"miro preprocess: stage {name} in a child process")
        rc = subprocess.run(cmd, check=False).returncode  # an argument list: no shell involved
        if rc < 0:  # killed (OOM killer, scancel): the next stage would find no outputs; a shell's 128+N
            print(f"miro preprocess: stage {name} killed by signal {-rc}", file=sys.stderr)
            return 128 - rc
        if rc == 2:
            return 2
        worst = max(worst, rc)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.isolate_stages and args.stage != "all":
            raise ValueError("--isolate-stages only applies to --stage all")
        plan = check_args(args)  # every argument of every stage, before the first stage (or child) runs
        if args.isolate_stages:
            return _run_isolated(argv, plan.stages)
        return _run(args, plan)
    except (ValueError, OSError) as e:  # bad arguments, missing inputs, weights that cannot be loaded
        from miro.io import one_line

        print(f"miro preprocess: {one_line(e)}", file=sys.stderr)
        return 2


@dataclass
class Plan:
    """What the checked arguments resolve to."""

    stages: tuple[str, ...]  # the stages to run, in order (no vqa with --vqa-scorer none)
    vqa: str | None  # the reward of stage vqa
    device: str
    precision: str
    shards: list[Path]
    csv_dir: Path
    scorer_kwargs: dict[str, dict]


def check_args(args) -> Plan:
    """Check every argument the chosen stages use, loading no model: numbers, --dest, --device,
    --scorer-kwargs, the shard selection and every model name. ``ValueError`` (one line) otherwise."""
    import torch

    from miro.generate_cli import check_device
    from miro.rewards import scorer_kwargs_from_cli

    stages = STAGES if args.stage == "all" else (args.stage,)
    vqa = None if args.vqa_scorer.strip().lower() == "none" else args.vqa_scorer.strip()
    if vqa is None:
        if stages == ("vqa",):
            raise ValueError("--stage vqa with --vqa-scorer none has nothing to do; name the VQA reward "
                             f"(default: {DEFAULT_VQA_SCORER}) or choose another --stage")
        stages = tuple(s for s in stages if s != "vqa")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0; got {args.num_workers}")
    if not args.checkpoint_seconds >= 0:  # NaN too
        raise ValueError(f"--checkpoint-seconds must be >= 0 (0: after every batch); got {args.checkpoint_seconds}")
    if "vae" in stages and not args.dest:
        raise ValueError(f"--stage {args.stage} needs --dest (the folder for enriched tars)")
    known = set(_csv_list(args.scorers)) | ({vqa} - {None})
    scorer_kwargs = scorer_kwargs_from_cli(args.scorer_kwargs, known, args.trust_remote_code)
    device = check_device(args.device)
    precision = args.precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    src = Path(args.src)
    listed = list_shards(src)
    if not listed:  # before the selection: '--shard_id 3' of an empty folder is no index error
        raise FileNotFoundError(f"no *.tar shards in {src}: the folder holds no regular, non-hidden *.tar file")
    shards = select_shards(listed, args.shard_id, args.shard_ids, args.shard_range)
    csv_dir = Path(args.csv_dir) if args.csv_dir else (src.parent if src.is_file() else src) / "scores"
    if args.dest and Path(args.dest).resolve() == (src.parent if src.is_file() else src).resolve():
        raise ValueError(f"--dest {args.dest} is the source folder: enriched shards would replace the raw ones; "
                         "choose another folder")
    # Checked now: with --stage all a file there would fail every shard of 'vae', after 'rewards' ran.
    for flag, folder in (("--dest", args.dest if "vae" in stages else None), ("--csv_dir", csv_dir)):
        if folder is not None and _blocking_file(Path(folder)) is not None:
            raise ValueError(f"{flag} {folder}: {_blocking_file(Path(folder))} is a file, not a folder; "
                             "choose a folder (it is created when missing)")
    check_models(args, stages, vqa)  # every model name of every stage, before the first stage runs
    return Plan(stages, vqa, device, precision, shards, csv_dir, scorer_kwargs)


def _blocking_file(folder: Path) -> Path | None:
    """The existing non-folder at ``folder`` or above it that would stop its creation, or None."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def _run(args, plan: Plan) -> int:
    from miro.data.encode_stage import EncodeSpec, EncodeStage
    from miro.data.stages import ScoreStage, StageOptions

    shards, vqa, device, precision, csv_dir = plan.shards, plan.vqa, plan.device, plan.precision, plan.csv_dir

    captions = None
    if args.synthetic_captions and not args.no_synthetic:
        tsv = Path(args.synthetic_captions)
        wanted = {k for s in shards for k in pio.shard_keys(s)}
        captions = pio.load_synthetic_captions(tsv, wanted)
        print(f"synthetic captions: {len(captions)} of {len(wanted)} samples found in {tsv}")
    opts = StageOptions(csv_dir=csv_dir, dest=Path(args.dest) if args.dest else None, batch_size=args.batch_size,
                        device=device, precision=precision, synthetic=not args.no_synthetic, captions=captions,
                        num_workers=args.num_workers, overwrite=args.overwrite,
                        checkpoint_seconds=args.checkpoint_seconds,
                        progress=not args.no_progress)
    print(f"miro preprocess: stage {args.stage}, {len(shards)} shard(s), device {device} ({precision}), csv_dir {csv_dir}")

    failed = 0
    scorers = text_encoder = codec = None
    for name in plan.stages:
        if name in ("rewards", "vqa"):
            names = _csv_list(args.scorers) if name == "rewards" else [vqa]
            scorers = load_scorers(names, plan.scorer_kwargs, device)
            stage, models = ScoreStage(name, scorers, opts, plan.scorer_kwargs), list(scorers.values())
        else:
            from miro.encoders import IdentityCodec, load_autoencoder, load_text_encoder

            text_encoder = load_text_encoder(args.text_encoder, device=device)
            codec = load_autoencoder(args.autoencoder, device=device)
            resolutions = _parse_resolutions(args, isinstance(codec, IdentityCodec))
            if hasattr(codec, "to"):
                codec = codec.to(device)
            spec = EncodeSpec(resolutions=resolutions, resize_filter=args.resize_filter,
                              text_max_length=args.text_max_length,
                              required_stages=("rewards",) + (("vqa",) if vqa else ()),
                              extra={"text_encoder_spec": str(args.text_encoder), "autoencoder": str(args.autoencoder)})
            stage = EncodeStage(text_encoder, codec if resolutions else None, spec, opts)
            models = [text_encoder] + ([codec] if resolutions else [])
        done, skipped, bad = run_stage(stage, shards, args.overwrite, models, dry_run=args.dry_run)
        failed += bad
        if args.dry_run:
            print(f"stage {name}: {done} to do, {skipped} already complete (dry run: nothing processed)")
        else:
            print(f"stage {name}: {done} shard(s) processed, {skipped} already complete, {bad} failed")
        stage = models = scorers = text_encoder = codec = None  # drop every reference before the next stage
        _free_models()
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
