"""Backbone benchmark: our RIN / MiroModel against the published implementation, same weights.

    python benchmarks/bench_backbone.py                       # tiny, shapes, release (CPU)
    python benchmarks/bench_backbone.py --configs shapes --iters 5

For each config both models hold the *same* weights (the published one's, loaded strict into
ours) and see the same inputs; the script first checks the outputs agree within the parity
contract, then times, interleaving the two implementations so that machine load hits both alike
(median over iterations of the process CPU time, which other processes on a shared machine
do not inflate; the wall-clock ratio is printed beside it):

- ``fwd``: preconditioned forward, eval, no grad;
- ``fwd+bwd``: one training forward (zero previous latents) + backward of the velocity MSE;
- ``step``: one full loss evaluation (self-conditioning 0.9, text dropout 0.1, log-variance
  reweighting) + backward: ``flow_loss`` against the published ``FlowMatchingLoss``;
- ``sample`` (shapes): Euler, 50 steps, CFG w = 7, images/s;
- ``vs_ref`` (shapes): the ``step`` of ours on the ``shapes`` config against the published code on
  a ~5M-parameter patch-2 reference (32 latents x 192), the setting of the published Shapes
  throughput measurement: what the config choice buys per training sample;
- ``bf16`` (shapes): our fwd+bwd in fp32 against the same under CPU bf16 autocast (a mixed
  precision speed-up, not bitwise, so listed apart from the parity-checked rows);
- ``fwd+bwd_compiled`` (``--compile``): ``fwd+bwd`` with *both* forwards under ``torch.compile``
  (inductor; on CPU it needs a C++ compiler and several minutes of compilation per model, which
  is not timed): whether kernel fusion changes the comparison or beats eager.

Text: ``max_text_len`` tokens with a realistic number of valid ones per sample (shapes 8-16 of 32,
release 8-20 of 77, tiny 3-6 of 8); ``--full-text`` makes every token valid. Also printed:
parameters, GFLOPs per forward (``torch.utils.flop_counter``, attention counted through the math
SDPA path), saved activations of fwd+bwd (MB, unique storages) and process peak RSS.

The published package is loaded from a renamed scratch copy (see make_parity_fixture.py); it is
never imported by ``miro``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import ArgumentParser, comma_choices, positive_int, run_main  # noqa: E402
from make_parity_fixture import load_peer  # noqa: E402

from miro.models import LossConfig, MiroModel, euler_sample, flow_loss, get_config  # noqa: E402
from miro.models.configs import NETWORK_EXTENSIONS  # noqa: E402

VALID_TEXT = {"tiny": (3, 6), "shapes": (8, 16), "release": (8, 20)}
DEFAULT_PLAN = {  # config -> list of (batch, measurements)
    "tiny": [(16, ("fwd", "fwd+bwd", "step"))],
    "shapes": [(64, ("fwd", "fwd+bwd", "step", "vs_ref", "bf16")), (16, ("sample",))],
    "release": [(1, ("fwd", "fwd+bwd")), (2, ("fwd+bwd", "step"))],
}
MEASUREMENTS = ("fwd", "fwd+bwd", "step", "vs_ref", "bf16", "sample", "fwd+bwd_compiled")  # what --only picks from
# The published measurement the Shapes config is compared with: a ~5M-parameter RIN at patch 2
# with 32 latents x 192 (docs/benchmarks.md, Backbone); this is such a model in the published code.
REFERENCE_SHAPES = dict(patch_size=2, data_dim=128, num_blocks=3, num_processing_layers=2, latent_mlp_multiplier=2,
                        data_mlp_multiplier=2, num_text_registers=16)


def published_architecture(cfg: dict) -> dict:
    """The config without this project's extensions (``data_norm``, ``data_mixer``, the velocity
    skip), which the published code does not have: both sides then run the same network."""
    cfg = dict(cfg, network=dict(cfg["network"]), preconditioning=dict(cfg["preconditioning"]))
    for key in NETWORK_EXTENSIONS:
        cfg["network"].pop(key, None)
    cfg["preconditioning"]["do_normalization"] = "noise_driven"
    return cfg


def synthetic_inputs(cfg: dict, name: str, b: int, full_text: bool = False, seed: int = 1) -> dict:
    """Random network inputs of config ``cfg`` (named ``name``): y, gamma, text embeddings with
    ``VALID_TEXT[name]`` valid tokens per sample (all with ``full_text``), a mask, reward values."""
    n = cfg["network"]
    g = torch.Generator().manual_seed(seed)
    c, s, length = n["num_input_channels"], n["data_size"], cfg["max_text_len"]
    lo, hi = VALID_TEXT[name]
    valid = torch.full((b,), length) if full_text else torch.randint(lo, hi + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < valid[:, None]
    return dict(
        y=torch.randn(b, c, s, s, generator=g),
        gamma=torch.rand(b, generator=g),
        emb=torch.randn(b, length, n["label_dim"], generator=g),
        mask=mask,
        coh={k: torch.rand(b, generator=g) for k in n["coherence_keys"]},
    )


class Pair:
    """Our model and the published one with identical weights, plus shared inputs."""

    def __init__(self, name: str, peer_classes, full_text: bool, seed: int = 0):
        CADRINTextCond, FlowPrecond, FlowMatchingLoss, flow_euler_sampler, LinearScheduler = peer_classes
        self.cfg = published_architecture(get_config(name))
        torch.manual_seed(seed)
        self.peer_net = CADRINTextCond(**self.cfg["network"])
        self.peer_pre = FlowPrecond(**self.cfg["preconditioning"])
        self.ours = MiroModel.from_config(self.cfg)
        sd = {f"network.{k}": v for k, v in self.peer_net.state_dict().items()}
        sd.update({f"preconditioning.{k}": v for k, v in self.peer_pre.state_dict().items()})
        sd.update({k: v for k, v in self.ours.state_dict().items() if k.startswith(("data_pre", "postpro"))})
        self.ours.load_state_dict_checked(sd)
        self.uncond = torch.randn(1, self.cfg["network"]["label_dim"])
        self.peer_loss = FlowMatchingLoss(LinearScheduler(), self.uncond, self_cond_rate=0.9, cond_drop_rate=0.1,
                                          do_gradnorm_reweighting=True)
        self.loss_cfg = LossConfig(self_cond_rate=0.9, cond_drop_rate=0.1, do_gradnorm_reweighting=True)
        self.flow_euler_sampler, self.sched = flow_euler_sampler, LinearScheduler()
        self.name, self.full_text = name, full_text
        if name == "shapes":  # the published code on the reference-like config
            ref = dict(self.cfg["network"], **REFERENCE_SHAPES)
            self.ref_net = CADRINTextCond(**ref)
            self.ref_pre = FlowPrecond(**self.cfg["preconditioning"])
            self.ref_params = sum(p.numel() for p in self.ref_net.parameters())

    def inputs(self, b: int, seed: int = 1):
        return synthetic_inputs(self.cfg, self.name, b, self.full_text, seed)

    def peer_batch(self, i, y=None):
        d = {"y": (i["y"] if y is None else y).clone(), "gamma": i["gamma"], "text_tokens_embeddings": i["emb"].clone(),
             "text_tokens_mask": i["mask"].clone(), "previous_latents": None}
        d.update({f"{k}_coherence": v.clone() for k, v in i["coh"].items()})
        return d

    # --- the measured callables
    def fwd(self, which, i):
        with torch.no_grad():
            if which == "peer":
                return self.peer_pre(self.peer_net.eval(), self.peer_batch(i))
            return self.ours.eval()(i["y"], i["gamma"], i["emb"], i["mask"], i["coh"])

    def fwd_bwd(self, which, i, compiled: bool = False):
        """Training forward + backward of the velocity MSE; ``compiled``: both under torch.compile."""
        peer = lambda batch: self.peer_pre(self.peer_net, batch)  # noqa: E731
        ours = self.ours
        if compiled:
            if not hasattr(self, "_compiled"):
                self._compiled = (torch.compile(peer), torch.compile(self.ours))
            peer, ours = self._compiled
        if which == "peer":
            self.peer_net.train()
            v, z = peer(self.peer_batch(i))
        else:
            self.ours.train()
            v, z = ours(i["y"], i["gamma"], i["emb"], i["mask"], i["coh"])
        v.square().mean().backward()
        return v.detach()

    def fwd_bwd_bf16(self, which, i):
        """Ours only: fp32 ("peer" slot) against CPU bf16 autocast ("ours" slot)."""
        self.ours.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=which == "ours"):
            v, z = self.ours(i["y"], i["gamma"], i["emb"], i["mask"], i["coh"])
        v.float().square().mean().backward()

    def step(self, which, i, reference=False):
        gen = torch.Generator().manual_seed(0)
        if which == "peer":
            net, pre = (self.ref_net, self.ref_pre) if reference else (self.peer_net, self.peer_pre)
            net.train()
            batch = self.peer_batch(i)
            batch["x_0"] = batch.pop("y")
            loss, _ = self.peer_loss(pre, net, None, batch, 0, generator=gen)
            loss.mean().backward()
        else:
            self.ours.train()
            loss, _ = flow_loss(self.ours, i["y"], i["emb"], i["mask"], i["coh"], self.uncond, self.loss_cfg, gen)
            loss.backward()

    def sample(self, which, i, steps=50, w=7.0):
        keys = list(self.cfg["coherence_keys"])
        b = i["y"].shape[0]
        if which == "peer":
            self.peer_net.eval()
            batch = self.peer_batch(i)
            batch.update({f"{k}_coherence": torch.ones(b) for k in keys})
            unc = {"text_tokens_embeddings": self.uncond[None].expand(b, -1, -1).contiguous(),
                   "text_tokens_mask": torch.ones(b, 1, dtype=torch.bool)}
            with torch.no_grad():
                return self.flow_euler_sampler(
                    lambda bb: self.peer_pre(self.peer_net, bb), batch, num_steps=steps, scheduler=self.sched,
                    conditioning_keys=["text_tokens"], uncond_tokens=unc, cfg_rate=w,
                    coherence_keys=[f"{k}_coherence" for k in keys],
                    coherence_values={f"{k}_coherence": 1.0 for k in keys},
                    uncoherence_values={f"{k}_coherence": 0.0 for k in keys}, sampling_dtype=torch.float32)
        return euler_sample(self.ours, i["y"], i["emb"], i["mask"], self.uncond, None, num_steps=steps, guidance_scale=w)


def timed(fn, iters: int, warmup: int = 1) -> dict:
    """Median CPU seconds (``time.process_time``: the work done, robust to other processes on a
    shared machine) and median wall seconds per call, for "peer" and "ours" interleaved."""
    cpu: dict[str, list] = {"peer": [], "ours": []}
    wall: dict[str, list] = {"peer": [], "ours": []}
    for which in ("peer", "ours"):
        for _ in range(warmup):
            fn(which)
    for _ in range(iters):
        for which in ("peer", "ours"):
            c, t = time.process_time(), time.perf_counter()
            fn(which)
            cpu[which].append(time.process_time() - c)
            wall[which].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in cpu.items()}
    out.update({f"{k}_wall": statistics.median(v) for k, v in wall.items()})
    return out


def saved_activation_mb(fn) -> float:
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def gflops(model: MiroModel, i: dict, full_text: bool) -> float:
    """GFLOPs of one forward of one sample; ``full_text``: every text token valid (nominal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    mask = torch.ones_like(i["mask"][:1]) if full_text else i["mask"][:1]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.eval()(i["y"][:1], i["gamma"][:1], i["emb"][:1], mask, {k: v[:1] for k, v in i["coh"].items()})
    return fc.get_total_flops() / 1e9


def assert_parity(*pairs) -> float:
    """The parity contract (rtol 1e-5, atol 1e-5 * max|ref|) on (ours, ref) pairs; the max |diff|."""
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    return max(float((ours - ref).abs().max()) for ours, ref in pairs)


def check_parity(pair: Pair, i: dict) -> float:
    a, za = pair.fwd("peer", i)
    b, zb = pair.fwd("ours", i)
    return assert_parity((b, a), (zb, za))


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=comma_choices(DEFAULT_PLAN), default="tiny,shapes,release",
                    help="comma-separated config names")
    ap.add_argument("--iters", type=positive_int, default=5, help="timed iterations per measurement")
    ap.add_argument("--release-iters", type=positive_int, default=1, help="timed iterations for the release config")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch intra-op threads (1: CPU time then measures work, not OpenMP spin-waits)")
    ap.add_argument("--full-text", action="store_true", help="every text token valid (no padding)")
    ap.add_argument("--peer", type=Path, default=Path("/tmp/peer/unpacked/miro"), help="unpacked published package")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/miro_scratch"), help="scratch dir (peer copy, einops)")
    ap.add_argument("--only", type=comma_choices(MEASUREMENTS), default=None,
                    help="comma-separated measurements to run (default: all of the plan)")
    ap.add_argument("--compile", action="store_true",
                    help="also time fwd+bwd with both models under torch.compile (minutes of compilation)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = load_peer(args.peer, args.scratch)
    results = []
    for name in args.configs.split(","):
        pair = Pair(name, classes, args.full_text)
        n_params = sum(p.numel() for p in pair.ours.network.parameters())
        print(f"== {name}: {n_params:,} network parameters", flush=True)
        for b, measures in DEFAULT_PLAN[name]:
            if args.compile and "fwd+bwd" in measures:
                measures = (*measures, "fwd+bwd_compiled")
            if args.only:
                measures = tuple(m for m in measures if m in args.only.split(","))
                if not measures:
                    continue
            i = pair.inputs(b)
            iters = args.release_iters if name == "release" else args.iters
            warm = 0 if name == "release" else 1  # release: one shared warm-up forward below instead
            if name == "release" and b == DEFAULT_PLAN[name][0][0]:
                pair.fwd("peer", i), pair.fwd("ours", i)
            row = {"config": name, "batch": b, "params": n_params, "valid_text": int(i["mask"].sum(1).float().mean())}
            row["max_abs_diff"] = check_parity(pair, i)
            row["gflops_full_text"] = gflops(pair.ours, i, True)
            row["gflops_per_sample"] = gflops(pair.ours, i, False)
            for m in measures:
                if m == "fwd":
                    t = timed(lambda w: pair.fwd(w, i), iters, warm)
                elif m == "fwd+bwd":
                    t = timed(lambda w: pair.fwd_bwd(w, i), iters, warm)
                    row["saved_MB"] = {w: saved_activation_mb(lambda: pair.fwd_bwd(w, i)) for w in ("peer", "ours")}
                elif m == "step":
                    t = timed(lambda w: pair.step(w, i), iters, warm)
                elif m == "fwd+bwd_compiled":
                    # The first calls compile (untimed) and check the compiled outputs' parity.
                    ref, got = pair.fwd_bwd("peer", i, compiled=True), pair.fwd_bwd("ours", i, compiled=True)
                    row["compiled_max_abs_diff"] = assert_parity((got, ref))
                    t = timed(lambda w: pair.fwd_bwd(w, i, compiled=True), iters, warm)
                elif m == "bf16":
                    t = timed(lambda w: pair.fwd_bwd_bf16(w, i), iters, warm)
                    print("  bf16: ours fp32 fwd+bwd (listed as peer) against ours under CPU bf16 autocast "
                          "(not bitwise: reported separately)")
                elif m == "vs_ref":
                    t = timed(lambda w: pair.step(w, i, reference=True), iters)
                    print(f"  vs_ref: ours on `shapes` ({n_params:,} params) against the published code on a "
                          f"patch-2 reference ({pair.ref_params:,} params)")
                else:
                    t = timed(lambda w: pair.sample(w, i), max(1, iters // 3), warmup=0)
                    o, p = pair.sample("ours", i), pair.sample("peer", i)
                    row["sample_max_abs_diff"] = float((o - p).abs().max())
                row[m] = {"peer_cpu_s": t["peer"], "ours_cpu_s": t["ours"], "speedup": t["peer"] / t["ours"],
                          "peer_wall_s": t["peer_wall"], "ours_wall_s": t["ours_wall"],
                          "wall_speedup": t["peer_wall"] / t["ours_wall"]}
                unit = "images" if m == "sample" else "samples"
                print(f"  B={b:<3d} {m:8s} CPU time: peer {t['peer'] * 1e3:9.1f} ms  ours {t['ours'] * 1e3:9.1f} ms  "
                      f"x{t['peer'] / t['ours']:.2f}  ({b / t['ours']:.1f} {unit}/CPU-s ours, {b / t['peer']:.1f} peer)"
                      f" | wall x{t['peer_wall'] / t['ours_wall']:.2f}", flush=True)
            extra = f", saved activations peer {row['saved_MB']['peer']:.0f} MB / ours {row['saved_MB']['ours']:.0f} MB" \
                if "saved_MB" in row else ""
            if "sample_max_abs_diff" in row:
                extra += f", sampled images max|d| = {row['sample_max_abs_diff']:.2e}"
            print(f"  B={b:<3d} parity max|d| = {row['max_abs_diff']:.2e}; GFLOPs/forward/sample "
                  f"{row['gflops_full_text']:.2f} with all {pair.cfg['max_text_len']} text tokens, "
                  f"{row['gflops_per_sample']:.2f} with {row['valid_text']} valid{extra}", flush=True)
            results.append(row)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB; threads {args.threads}; torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
