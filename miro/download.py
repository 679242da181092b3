"""``miro download``: fetch the full-scale weights once, for later offline use.

    miro download --list
    miro download pipeline text-encoder vae          # what `MiroPipeline.from_pretrained("nicolas-dufour/miro")` needs
    miro download rewards geneval --cache-dir /data/hf
    miro download image_reward_score --dry-run

Files land in the Hugging Face hub cache (``--cache-dir``, default ``HF_HUB_CACHE``, which is
``$HF_HOME/hub``), where the loaders find them with ``HF_HUB_OFFLINE=1``; after ``--cache-dir DIR``,
load with ``HF_HUB_CACHE=DIR``. Without a network the command stops with a clear error.
"""

from __future__ import annotations

import argparse
import os
import sys

# The subfolders of nicolas-dufour/miro-ablations (its model card): leave-one-out, specialists, no synthetic captions.
_ABLATED = ("aesthetic", "clip", "hpsv2", "image-reward", "pickscore", "sciscore", "vqa")
ABLATION_VARIANTS = ("miro-no-synthetic-captions", *(f"miro-no-{r}" for r in _ABLATED),
                     *(f"miro-only-{r}" for r in _ABLATED))

# name -> [(repo id, file patterns or None for the whole repo, why)]. Hub ids as published by
# each model's authors (see docs/evaluation.md for licences and sizes).
WEIGHTS: dict[str, list[tuple[str, list[str] | None, str]]] = {
    "pipeline": [("nicolas-dufour/miro", ["config.json", "model.safetensors", "uncond_embedding.npy"], "released MIRO")],
    "ablations": [("nicolas-dufour/miro-ablations", None, "the 15 published ablation variants")],
    "text-encoder": [("google/flan-t5-xl", ["*.json", "*.model", "*.safetensors"], "MIRO's text encoder")],
    "vae": [("stabilityai/sdxl-vae", ["config.json", "diffusion_pytorch_model.safetensors"], "MIRO's autoencoder")],
    "clip_score": [("jinaai/jina-clip-v2", None, "CLIP score (remote code; opt in to trust_remote_code to load)")],
    "aesthetic_score": [
        ("openai/clip-vit-large-patch14", ["*.json", "*.txt", "model.safetensors"], "aesthetic backbone"),
        ("ttj/sac-logos-ava1-l14-linearMSE", None, "LAION aesthetic MLP"),
    ],
    "image_reward_score": [
        ("THUDM/ImageReward", ["ImageReward.pt", "med_config.json"], "ImageReward v1.0"),
        ("google-bert/bert-base-uncased", ["*.json", "*.txt"], "ImageReward tokenizer"),
    ],
    "pick_a_score_score": [
        ("yuvalkirstain/PickScore_v1", None, "PickScore"),
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["*.json", "*.txt"], "PickScore processor"),
    ],
    "hpsv2_score": [
        ("xswu/HPSv2", ["HPS_v2.1_compressed.pt"], "HPSv2.1"),
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["*.json", "*.txt"], "HPSv2 tokenizer (OpenCLIP ViT-H-14)"),
    ],
    "vqa_score": [
        ("zhiqiulin/clip-flant5-xxl", None, "VQAScore CLIP-FlanT5-XXL"),
        ("openai/clip-vit-large-patch14-336", ["*.json", "*.txt", "model.safetensors"], "VQAScore vision tower"),
        ("google/flan-t5-xxl", ["*.json", "*.model"], "VQAScore tokenizer"),
    ],
    "sciscore_score": [("Jialuo21/SciScore", None, "SciScore")],
    "geneval": [
        ("facebook/mask2former-swin-small-coco-instance", None, "GenEval-like detector"),
        ("openai/clip-vit-large-patch14", ["*.json", "*.txt", "model.safetensors"], "GenEval-like colour classifier"),
    ],
    "owlv2": [("google/owlv2-base-patch16-ensemble", None, "open-vocabulary GenEval-like detector (optional)")],
}
GROUPS = {"rewards": ["clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score", "hpsv2_score",
                      "vqa_score", "sciscore_score"]}


def resolve(names: list[str]) -> list[tuple[str, list[str] | None, str]]:
    """Expand names and groups into a de-duplicated list of (repo, patterns, why)."""
    out, seen = [], set()
    for n in names:
        if n == "all":
            keys = list(WEIGHTS)
        elif n in GROUPS:
            keys = GROUPS[n]
        elif n in WEIGHTS:
            keys = [n]
        else:
            raise ValueError(f"unknown download {n!r}; choose from: all, {', '.join([*GROUPS, *WEIGHTS])}")
        for k in keys:
            for repo, pats, why in WEIGHTS[k]:
                key = (repo, tuple(pats) if pats else None)
                if key not in seen:
                    seen.add(key)
                    out.append((repo, pats, why))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="miro download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="what to fetch: all, rewards, or names from --list")
    ap.add_argument("--list", action="store_true", help="list what can be downloaded and exit")
    ap.add_argument("--cache-dir", default=None, help="Hugging Face hub cache folder (default: HF_HUB_CACHE, i.e. "
                    "$HF_HOME/hub); load later with HF_HUB_CACHE=<this folder>")
    ap.add_argument("--variant", default=None, help="only this subfolder of nicolas-dufour/miro-ablations")
    ap.add_argument("--dry-run", action="store_true", help="print the repositories and patterns, fetch nothing")
    ap.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding a hub token (gated models)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        if args.names:
            print(f"miro download: --list takes no names (got {' '.join(args.names)}); run it alone",
                  file=sys.stderr)
            return 2
        for name, entries in WEIGHTS.items():
            for repo, _pats, why in entries:
                print(f"{name:<20} {repo:<48} {why}")
        print(f"{'rewards':<20} (group) {', '.join(GROUPS['rewards'])}")
        return 0
    if not args.names:
        print("miro download: name what to fetch (e.g. `miro download pipeline text-encoder vae`), or --list", file=sys.stderr)
        return 2
    try:
        todo = resolve(args.names)
    except ValueError as e:
        print(f"miro download: {e}", file=sys.stderr)
        return 2
    if args.variant is not None:
        if args.variant not in ABLATION_VARIANTS:
            print(f"miro download: --variant {args.variant!r} is not a published ablation; one of "
                  f"{', '.join(ABLATION_VARIANTS)}", file=sys.stderr)
            return 2
        if not any(r == "nicolas-dufour/miro-ablations" for r, _p, _w in todo):
            print("miro download: --variant selects a subfolder of `ablations`; name it (`miro download ablations "
                  f"--variant {args.variant}`)", file=sys.stderr)
            return 2
        todo = [(r, [f"{args.variant}/*"] if r == "nicolas-dufour/miro-ablations" else p, w) for r, p, w in todo]
    if args.dry_run:
        for repo, pats, why in todo:
            print(f"{repo}  {' '.join(pats) if pats else '(all files)'}  # {why}")
        return 0
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        print("miro download: HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it on a machine with a network",
              file=sys.stderr)
        return 1
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    from miro.io import one_line

    token = os.environ.get(args.token_env) or None
    failed = 0
    for i, (repo, pats, why) in enumerate(todo):
        print(f"fetching {repo} ({why}) ...", flush=True)
        try:
            path = snapshot_download(repo, allow_patterns=pats, cache_dir=args.cache_dir, token=token)
            print(f"  -> {path}")
        except LocalEntryNotFoundError as e:  # the hub is unreachable: every other repository would fail alike
            print(f"miro download: the hub could not be reached ({one_line(e)}); {len(todo) - i} of {len(todo)} "
                  "repositories not fetched. Run it again where a network exists.", file=sys.stderr)
            return 1
        except Exception as e:  # gated repo, missing repo or file: report and go on
            failed += 1
            print(f"  failed: {type(e).__name__}: {one_line(e)}. Check the network (and {args.token_env} for gated "
                  "models).", file=sys.stderr)
    if failed:
        print(f"miro download: {failed} of {len(todo)} repositories failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
