"""``miro eval``: generate, score, summarise and report.

    miro eval generate --model shapes --prompts shapes --outdir runs/shapes --n-samples 4
    miro eval geneval runs/shapes                 # GenEval-like / ShapesEval -> results.jsonl
    miro eval rewards runs/shapes                 # reward models -> rewards.jsonl
    miro eval summary runs/shapes/rewards.jsonl   # -> rewards_summary.json
    miro eval best-of-n runs/bo16 --select-by image_reward_score --metrics hpsv2_score
    miro eval sweep --model shapes --prompts shapes --reward-key shapes_counting --outdir runs/sweep
    miro eval judge runs/cure --base-url http://127.0.0.1:8000/v1 --judge-model M --rubric cure
    miro eval report runs/shapes
    miro eval all --model path/to/last.ckpt       # generate -> geneval -> rewards -> summary -> report

Scoring commands end with a line ``overall: <score in [0, 1]>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from miro.eval.generate import parse_reward_cfg
from miro.eval.prompts import CURE_VARIANTS


def _add_generation(ap: argparse.ArgumentParser, outdir_required: bool = True) -> None:
    ap.add_argument("--model", default="shapes", help="built-in name, pipeline folder, hub id or Lightning .ckpt (default: shapes)")
    ap.add_argument("--variant", default=None, help="variant subfolder (e.g. miro-only-aesthetic)")
    ap.add_argument("--prompts", default=None, help="geneval | parti | shapes | cure | FILE (.jsonl, .tsv, .txt); default: shapes for a "
                    "Shapes model, else geneval")
    ap.add_argument("--cure-dir", default=None, help="folder with CuRe's six CSVs (for --prompts cure)")
    ap.add_argument("--cure-variants", default=",".join(CURE_VARIANTS), help="comma-separated MIA variants")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--outdir", "--out", dest="outdir", required=outdir_required, default=None, help="output folder")
    ap.add_argument("--n-samples", "--n", dest="n_samples", type=int, default=4, help="images per prompt (default 4)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument("--cfg", type=float, default=7.0, help="guidance scale (default 7.0)")
    ap.add_argument("--reward-cfg", type=parse_reward_cfg, default=None,
                    help="separate guidance scale of the reward direction (default: --cfg; 3 branches per step), "
                         "or one per reward: KEY=W,KEY=W (rewards left out: --cfg; README, per-reward scales)")
    ap.add_argument("--reward-direction", choices=("prompt", "null"), default="prompt",
                    help="with --reward-cfg: the reward direction taken with the prompt or with the null text")
    ap.add_argument("--seed", type=int, default=0, help="base seed; sample j of prompt i uses seed + 1000*i + j")
    ap.add_argument("--reward", action="append", default=[], metavar="K=V", help="positive reward target (repeatable)")
    ap.add_argument("--negative-reward", action="append", default=[], metavar="K=V", help="negative reward target")
    ap.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _add_geneval(ap: argparse.ArgumentParser) -> None:
    from miro.eval.geneval import DEFAULT_CLIP, DEFAULT_DETECTOR

    ap.add_argument("--detector", default="auto", help=f"'shapes' (ShapesEval), a Mask2Former id/folder "
                    f"(default {DEFAULT_DETECTOR}), or 'auto' (shapes for Shapes models)")
    ap.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIPModel id/folder for colour naming")
    ap.add_argument("--options", nargs="*", default=[], metavar="K=V",
                    help="GenEval options: threshold, counting_threshold, max_objects, max_overlap, position_threshold")
    ap.add_argument("--bgcolor", default="#999", help="canvas for masked colour crops, or 'original'")
    ap.add_argument("--local-files-only", action="store_true", help="never use the network: the pipeline, reward "
                    "and GenEval models from the local cache, prompt files from $MIRO_DATA_DIR or the cache")


def _scorers_arg(ap):
    ap.add_argument("--scorers", default="auto", help="comma-separated reward names, or 'auto' (Shapes rewards for "
                    "Shapes models, else MIRO's seven)")
    ap.add_argument("--scorer-kwargs", default="{}",
                    help='JSON {"reward": {kwarg: value}} passed to the scorers, e.g. local weight folders')
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let rewards whose hub model runs its own code load it (clip_score's jina-clip-v2); off "
                         "by default")


def _items(args):
    from miro.eval.prompts import load_prompts

    from miro.eval.generate import check_local_model, is_shapes_run, model_reward_keys

    if args.prompts is None:  # the model decides the prompt set: a bad path is named, not the fallback's download
        check_local_model(args.model, args.variant)
    spec = args.prompts or ("shapes" if is_shapes_run(model_reward_keys(args.model, args.variant), args.model)
                            else "geneval")
    variants = tuple(v.strip() for v in args.cure_variants.split(",") if v.strip())
    return spec, load_prompts(spec, cure_dir=args.cure_dir, cure_variants=variants, limit=args.limit)


def _gen_config(args):
    from miro.eval.generate import GenerateConfig, parse_reward_args

    return GenerateConfig(model=args.model, variant=args.variant, n_samples=args.n_samples, steps=args.steps,
                          cfg=args.cfg, reward_cfg=args.reward_cfg, reward_direction=args.reward_direction,
                          seed=args.seed, reward_targets=parse_reward_args(args.reward),
                          negative_reward_targets=parse_reward_args(args.negative_reward, "--negative-reward"),
                          batch_size=args.batch_size)


def _parse_list(text: str, flag: str, convert, what: str, expected: str) -> list:
    """``--ns`` / ``--targets``: comma-separated values; a bad one is named with its option
    (int()/float() alone would say "invalid literal ..." without either)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            out.append(convert(part))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not {what}; expected {expected}") from None
    return out


def _load_scorers(names: list[str], args) -> dict:
    """The named scorers on ``--device``, with ``--scorer-kwargs`` / ``--trust-remote-code``."""
    from miro.rewards import load_scorer, scorer_kwargs_from_cli

    kwargs = scorer_kwargs_from_cli(args.scorer_kwargs, names, args.trust_remote_code)
    out = {}
    for n in names:
        if getattr(args, "local_files_only", False):
            kwargs.setdefault(n, {}).setdefault("local_files_only", True)
        sc = load_scorer(n, **kwargs.get(n, {}))
        out[n] = sc.to(args.device) if args.device else sc
    return out


def _scorer_names(spec: str, root, model=None) -> list[str]:
    from miro.eval.rewards import default_scorers

    from miro.rewards import available

    names = default_scorers(root, model) if spec == "auto" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no scorers: pass --scorers NAME[,NAME...], from {', '.join(available())}")
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise ValueError(f"--scorers {', '.join(unknown)}: not a registered reward; available: {', '.join(available())}")
    return names


def _run_info(root) -> dict:
    """The ``generation.json`` a generation run left in ``root`` ({} when there is none)."""
    run = Path(root) / "generation.json" if root is not None else None
    return json.loads(run.read_text()) if run is not None and run.is_file() else {}


def _has_geneval_metadata(items) -> bool:
    return all("include" in it.metadata for it in items)


def _print_reward_summary(summary: dict) -> None:
    from miro.eval.rewards import format_summary

    print(format_summary(summary))
    _print_overall(summary)


def _print_overall(summary: dict) -> None:
    """A reward summary's ``overall:`` line."""
    overall = summary["overall"]
    print(f"overall: {overall:.5f}" if overall is not None else "overall: - (no reward has a finite normalised mean)")


def _load_pipeline(args):
    """The pipeline of ``--model``/``--variant`` on ``--device``, with its progress bar off."""
    from miro.eval.generate import load_pipeline

    pipe = load_pipeline(args.model, args.variant, args.device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _detector_name(args, root, prompts: str | None = None) -> str:
    from miro.eval.generate import is_shapes_run, model_reward_keys
    from miro.eval.geneval import DEFAULT_DETECTOR

    if args.detector != "auto":
        return args.detector
    info = _run_info(root)
    model = info.get("config", {}).get("model", getattr(args, "model", ""))
    keys = info.get("reward_keys") or (model_reward_keys(model, getattr(args, "variant", None)) if model else None)
    return "shapes" if is_shapes_run(keys, model, info.get("prompts") or prompts) else DEFAULT_DETECTOR


def _generate(args, outdir, cfg, spec, items) -> dict:
    """Generate the missing samples; the model is loaded only when something is missing."""
    from miro.eval.generate import generate_folder, pending_samples

    pipe = _load_pipeline(args) if pending_samples(outdir, items, cfg.n_samples) else None
    return generate_folder(pipe, items, outdir, cfg, prompts_spec=spec)


def cmd_generate(args) -> int:
    cfg = _gen_config(args)
    spec, items = _items(args)
    counts = _generate(args, args.outdir, cfg, spec, items)
    print(f"{counts['generated']} images generated, {counts['skipped']} already present, in {args.outdir}")
    return 0


def _evaluator(args, detector: str):
    from miro.eval import geneval_rules as rules
    from miro.eval.geneval import GenEvalLike, GenEvalLikeConfig

    base = None
    if detector == "shapes":  # ShapesEval's thresholds, for the Shapes detector's fit scores
        from miro.shapes.eval import SHAPES_EVAL_OPTIONS as base
    cfg = GenEvalLikeConfig(detector=detector, clip_model=args.clip_model,
                            options=rules.GenEvalOptions.from_strings(args.options, base=base), bgcolor=args.bgcolor,
                            device=args.device, local_files_only=args.local_files_only)
    return GenEvalLike(cfg)


def _image_folder(root) -> Path:
    """``root`` if it is a folder; else the error that says what was expected (before any model loads)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: no such folder (give a folder of generated images, e.g. the --outdir of "
                                f"`miro eval generate`)")
    return Path(root)


def run_geneval(root, args, outfile=None) -> dict:
    from miro.eval import geneval_rules as rules
    from miro.eval.geneval import evaluate_folder, format_counts

    _image_folder(root)
    summary = evaluate_folder(root, outfile or Path(root) / "results.jsonl", _evaluator(args, _detector_name(args, root)))
    print(f"[{summary['benchmark']}; detector {summary['backends']['detector']}]")
    print(format_counts(summary))
    print(rules.format_summary(summary))
    return summary


def cmd_geneval(args) -> int:
    run_geneval(args.dir, args, args.outfile)
    return 0


def cmd_rewards(args) -> int:
    from miro.eval.rewards import score_folder, summarize_file

    outfile = Path(args.outfile or _image_folder(args.dir) / "rewards.jsonl")
    names = _scorer_names(args.scorers, args.dir)
    counts = score_folder(args.dir, _load_scorers(names, args), outfile, batch_size=args.batch_size)
    print(f"{counts['scored']} images scored, {counts['skipped']} already scored, {counts['corrupt']} unreadable")
    _print_reward_summary(summarize_file(outfile))
    return 0


def cmd_summary(args) -> int:
    from miro.eval.rewards import summarize_file

    if not Path(args.file).is_file():
        raise FileNotFoundError(f"{args.file}: no such file (a rewards.jsonl written by `miro eval rewards`)")
    _print_reward_summary(summarize_file(args.file, args.out))
    return 0


def cmd_best_of_n(args) -> int:
    from miro.eval import plots
    from miro.eval.best_of_n import check_best_destination, curve, write_best_folder
    from miro.eval.folder import atomic_write_json
    from miro.eval.rewards import read_records

    ns = _parse_list(args.ns, "--ns", int, "an integer", "comma-separated N values, e.g. 1,2,4,8") if args.ns else None
    if args.outdir:  # before anything is written
        check_best_destination(args.dir, args.outdir, args.overwrite)
    rewards = Path(args.rewards or Path(args.dir) / "rewards.jsonl")
    if not rewards.is_file():  # else the curve reports "no prompt has candidates scored", hiding the cause
        scorers = ",".join(dict.fromkeys([args.select_by, *(m for m in (args.metrics or "").split(",") if m)]))
        raise FileNotFoundError(f"{rewards}: no such file; score the candidates first "
                                f"(miro eval rewards {args.dir} --scorers {scorers})")
    records = read_records(rewards)
    metrics = [m for m in (args.metrics or "").split(",") if m] or [args.select_by]
    c = curve(records, args.select_by, metrics, ns, args.mode)
    atomic_write_json(Path(args.dir) / "best_of_n_curve.json", c)
    from miro.eval import paper_numbers as P

    cfg = _run_info(args.dir).get("config", {})
    paper = P.best_of_n_reference(metrics, c["versions"]) if P.paper_row(cfg.get("model"), cfg.get("variant")) else None
    plots.plot_best_of_n(c, Path(args.dir) / "best_of_n.png", paper=paper)
    if paper is not None:
        for key, version in c["versions"].items():
            if not P.comparable(key, version):
                print(P.version_note(key, version))
    print(f"best-of-N selected by {args.select_by} ({c['mode']}, {c['n_prompts']} prompts, {c['candidates']} candidates)")
    for i, n in enumerate(c["n"]):
        print(f"N={n:<5} " + "  ".join(f"{k}={c['values'][k][i]:.4f}" for k in metrics))
    if args.outdir:
        chosen = write_best_folder(args.dir, records, args.select_by, args.outdir, overwrite=args.overwrite)
        print(f"{len(chosen)} best images written to {args.outdir}")
    return 0


def cmd_sweep(args) -> int:
    from miro.eval import plots
    from miro.eval.sweep import BIN_TARGETS, check_targets, run_sweep, targets_from_bins

    from_bins = args.targets in BIN_TARGETS
    # checked before the model and scorers load
    targets = None if from_bins else check_targets(_parse_list(
        args.targets, "--targets", float, "a number",
        f"comma-separated targets in [0, 1] (e.g. 0,0.5,1) or one of {', '.join(BIN_TARGETS)}"))
    cfg = _gen_config(args)
    spec, items = _items(args)
    pipe = _load_pipeline(args)
    keys = getattr(pipe, "coherence_keys", None)
    if keys is not None and args.reward_key not in keys:  # before the scorers load
        raise ValueError(f"--reward-key {args.reward_key!r} is not one of the model's rewards: {', '.join(keys)}")
    if from_bins:  # chosen from the model's quantile bins (docs/evaluation.md, "Reward sweeps")
        targets = targets_from_bins(args.targets, pipe.reward_bins, args.reward_key)
    names = _scorer_names(args.scorers, None, args.model)
    evaluator = None
    if args.geneval:
        if not _has_geneval_metadata(items):
            raise ValueError("--geneval needs GenEval-format prompts (geneval, shapes or a .jsonl file)")
        evaluator = _evaluator(args, detector=_detector_name(args, None, spec))
    res = run_sweep(pipe, items, args.reward_key, cfg, args.outdir, _load_scorers(names, args), targets,
                    geneval=evaluator)
    plots.plot_sweep(res, Path(args.outdir) / "sweep.png")
    for n, rho in res["spearman_means"].items():
        print(f"{n}: " + " ".join(f"{r[n]['mean']:.4f}" for r in res["per_target"]) + f"  spearman={rho:.3f}")
    return 0


def cmd_judge(args) -> int:
    from miro.eval.mllm_judge import JudgeConfig, judge_folder

    cfg = JudgeConfig(base_url=args.base_url, model=args.judge_model, rubric=args.rubric, api_key_env=args.api_key_env,
                      timeout=args.timeout)
    s = judge_folder(args.dir, cfg, limit=args.limit)
    print(f"{s['answered']} answered, {s['errors']} errors, {s['unreadable']} unreadable (skipped, retried on the next run)")
    if s["errors"]:  # say why, so that a refused connection or a bad key is not a silent zero
        print(f"miro eval judge: {s['errors']} image(s) not judged; first error: {s['first_error']}", file=sys.stderr)
        if not s["answered"]:
            return 1
    for f, v in s["fields"].items():
        print(f"{f}: {v['mean']}")
    means = [v["mean"] for v in s["fields"].values() if v["mean"] is not None]
    if means:  # ratings 1..5 mapped to [0, 1]
        print(f"overall: {(sum(means) / len(means) - 1) / 4:.5f}")
    return 0


def cmd_report(args) -> int:
    from miro.eval.report import build_report

    path = build_report(args.dir, args.out)
    print(f"report: {path} (and report.html)")
    return 0


def default_outdir(model: str, variant: str | None) -> Path:
    """``<ckpt_dir>/geneval_images/<ckpt_name>/`` for a ``.ckpt``; ``eval-runs/<name>`` otherwise."""
    if str(model).endswith(".ckpt"):
        p = Path(model)
        return p.parent / "geneval_images" / p.stem
    name = str(model).rstrip("/").replace("/", "--") + (f"--{variant}" if variant else "")
    return Path("eval-runs") / name


def cmd_all(args) -> int:
    from miro.eval.report import build_report
    from miro.eval.rewards import format_summary, score_folder, summarize_file

    out = Path(args.outdir) if args.outdir else default_outdir(args.model, args.variant)
    cfg = _gen_config(args)
    spec, items = _items(args)
    if not args.skip_rewards and args.scorers != "auto":
        _scorer_names(args.scorers, None)  # a misspelt scorer fails now, not after the generation
    print(f"[1/5] generate {len(items)} prompts x {cfg.n_samples} into {out}")
    _generate(args, out, cfg, spec, items)
    geneval, rewards = None, None
    if args.skip_geneval:
        print("[2/5] GenEval-style scoring skipped (--skip-geneval)")
    elif _has_geneval_metadata(items):
        print("[2/5] GenEval-style scoring")
        geneval = run_geneval(out, args)
    else:
        print("[2/5] GenEval-style scoring skipped (prompts without GenEval metadata)")
    if not args.skip_rewards:
        names = _scorer_names(args.scorers, out, args.model)
        print(f"[3/5] rewards: {', '.join(names)}")
        counts = score_folder(out, _load_scorers(names, args), out / "rewards.jsonl", batch_size=args.batch_size)
        print(f"{counts['scored']} images scored, {counts['skipped']} already scored, {counts['corrupt']} unreadable")
        print("[4/5] summary")
        rewards = summarize_file(out / "rewards.jsonl")
        print(format_summary(rewards))
    print(f"[5/5] report: {build_report(out)}")
    # the contract's last line: the GenEval-style score, else (no GenEval metadata, --skip-geneval)
    # the rewards' overall, their mean normalised value in [0, 1]
    if geneval is not None:
        print(f"overall: {geneval['overall']:.5f}")
    elif rewards is not None:
        _print_overall(rewards)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="miro eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="images in GenEval's folder layout (resumable)")
    _add_generation(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("geneval", help="GenEval-like (or ShapesEval) scoring -> results.jsonl")
    p.add_argument("dir", help="folder of generated images")
    p.add_argument("--outfile", default=None, help="results file (default DIR/results.jsonl)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    _add_geneval(p)
    p.set_defaults(fn=cmd_geneval)

    p = sub.add_parser("rewards", help="score images with reward models -> rewards.jsonl")
    p.add_argument("dir", help="folder of generated images")
    p.add_argument("--outfile", default=None, help="default DIR/rewards.jsonl")
    _scorers_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per scorer call (default 16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.set_defaults(fn=cmd_rewards)

    p = sub.add_parser("summary", help="per-reward mean/std of a rewards.jsonl -> rewards_summary.json")
    p.add_argument("file", help="a rewards.jsonl (miro eval rewards)")
    p.add_argument("--out", default=None, help="default: rewards_summary.json beside FILE (X_summary.json for X.jsonl)")
    p.set_defaults(fn=cmd_summary)

    p = sub.add_parser("best-of-n", help="score-vs-N curves and best-candidate folders from scored candidates")
    p.add_argument("dir", help="folder with N candidates per prompt")
    p.add_argument("--rewards", default=None, help="default DIR/rewards.jsonl")
    p.add_argument("--select-by", required=True, help="reward that picks the best candidate")
    p.add_argument("--metrics", default=None, help="comma-separated rewards to report (default: --select-by)")
    p.add_argument("--ns", default=None, help="comma-separated N values (default 1,2,4,...,N)")
    p.add_argument("--mode", choices=("expected", "prefix"), default="expected",
                   help="expected: mean over all n-subsets (exact); prefix: first n candidates")
    p.add_argument("--outdir", "--out", dest="outdir", default=None,
                   help="write the best candidates here (a new or empty folder), with a generation.json for auto-detection")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier best-of-N folder at --outdir: its images, results, rewards and report")
    p.set_defaults(fn=cmd_best_of_n)

    p = sub.add_parser("sweep", help="images and scores vs one reward's target; Spearman rho")
    _add_generation(p)
    p.add_argument("--reward-key", required=True, help="the reward whose target is swept")
    p.add_argument("--geneval", action="store_true", help="also score every target GenEval-style (as the paper's sweep)")
    _add_geneval(p)
    p.add_argument("--targets", default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1",
                   help="comma-separated targets, or 'score' (the targets of evenly spaced raw scores), 'filled' "
                        "(those topped up to 9 distinct values) or 'trained' (the values seen in training), all "
                        "from the model's reward_bins.json")
    _scorers_arg(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("judge", help="MLLM judge over an OpenAI-compatible endpoint -> judge.jsonl")
    p.add_argument("dir", help="folder of generated images")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="the endpoint's model name")
    p.add_argument("--rubric", choices=("alignment", "cure"), default="alignment",
                   help="alignment (default): prompt faithfulness and visual quality; cure: CuRe's cultural questions")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--limit", type=int, default=None, help="judge at most N images this run")
    p.set_defaults(fn=cmd_judge)

    p = sub.add_parser("report", help="Markdown + HTML report with grids, tables and plots")
    p.add_argument("dir", help="an evaluated folder (images, and any results/rewards files)")
    p.add_argument("--out", default=None, help="default DIR/report")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("all", help="generate -> GenEval-like/ShapesEval -> rewards -> summary -> report")
    _add_generation(p, outdir_required=False)
    _add_geneval(p)
    _scorers_arg(p)
    p.add_argument("--skip-geneval", action="store_true", help="no GenEval-like/ShapesEval scoring")
    p.add_argument("--skip-rewards", action="store_true", help="no reward scoring")
    p.set_defaults(fn=cmd_all)
    return ap


def main(argv: list[str] | None = None) -> int:
    from miro.cli import report_errors

    args = build_parser().parse_args(argv)
    return report_errors(f"miro eval {args.cmd}", _checked_run, args)  # 1: model files missing offline


# sub-commands that draw PNG plots (miro/eval/plots.py); checked before any generation or scoring
PLOTTING = ("best-of-n", "sweep", "report", "all")


def _checked_run(args) -> int:
    if getattr(args, "local_files_only", False):
        # the whole command offline: the hub libraries read this when first imported (they are
        # imported lazily, after this), the prompt loader before it would download
        os.environ["HF_HUB_OFFLINE"] = "1"
    if args.cmd in PLOTTING:
        from miro.extras import require

        require("matplotlib", extra="eval", what=f"miro eval {args.cmd}")
    if getattr(args, "device", None) is not None:  # a bad --device fails here, before any model loads
        from miro.generate_cli import check_device

        args.device = check_device(args.device)
    if hasattr(args, "bgcolor"):  # GenEval-style settings: refused before generation or any model loads
        from miro.eval.geneval import check_bgcolor
        from miro.eval.geneval_rules import GenEvalOptions

        check_bgcolor(args.bgcolor, "--bgcolor")
        GenEvalOptions.from_strings(args.options)
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
