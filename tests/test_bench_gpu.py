"""benchmarks/bench_gpu.py on the CPU: the step it times is a real training step, and its FLOP count
is that of the passes the step runs."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402

from miro.models import MiroModel, get_config  # noqa: E402


def test_step_trains_and_counts_about_four_forwards(tmp_path):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = MiroModel.from_config(cfg)
    batch = bench_gpu.synthetic_batch(cfg, "tiny", 4, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step = bench_gpu.Step(model, batch, "adamw", "fp32", torch.device("cpu"))
    flops = bench_gpu.step_flops(step)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the optimizer stepped
    assert any(not torch.equal(a, p) for a, p in zip(before, step.ema.parameters()))  # the EMA moved
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.train()(batch["x0"], torch.full((4,), 0.5), batch["emb"], batch["mask"], batch["coh"])
    fwd = fc.get_total_flops()
    # self-conditioning pass (a forward without the last write) + forward + backward (2 forwards)
    assert 3.3 * fwd < flops < 4.2 * fwd, flops / fwd


def test_main_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--config", "tiny", "--batch", "2", "--iters", "2", "--warmup", "1", "--device", "cpu",
                           "--precision", "bf16", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["batch"] == 2 and r["samples_per_s"] > 0 and r["tflop_per_step"] > 0
    assert r["optimizer"] == "adamw" and "mfu" not in r  # no known peak on the CPU
    assert bench_gpu.main(["--config", "tiny", "--batch", "2", "--iters", "1", "--warmup", "0", "--device", "cpu",
                           "--peak-tflops", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["mfu"] > 0


def test_sampling_row_counts_two_forwards_per_step_per_image():
    # batched CFG runs 2B rows a step: the FLOPs per image are 2 x steps forwards of one image
    cfg = get_config("tiny")
    r = bench_gpu.measure_sampling("tiny", 2, 3, 7.0, "fp32", torch.device("cpu"), 1, 0, None)
    torch.manual_seed(0)
    model = MiroModel.from_config(cfg).eval()
    b = bench_gpu.synthetic_batch(cfg, "tiny", 1, torch.device("cpu"))
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(b["x0"], torch.full((1,), 0.5), b["emb"], b["mask"], b["coh"])
    per_image = 2 * 3 * fc.get_total_flops()
    assert 0.8 * per_image < 1e12 * r["tflop_per_image"] < 1.25 * per_image, 1e12 * r["tflop_per_image"] / per_image
    assert r["images_per_s"] > 0 and r["steps"] == 3 and "mfu" not in r
    r1 = bench_gpu.measure_sampling("tiny", 2, 1, 0.0, "fp32", torch.device("cpu"), 1, 0, None)  # no CFG: B rows
    assert 0.4 < r1["tflop_per_image"] * 3 / r["tflop_per_image"] < 0.6


def test_bench_optim_times_both_forms(capsys, monkeypatch):
    import bench_optim

    from miro.train import optim

    calls = {"loop": 0, "foreach": 0}
    for name, fn in (("loop", optim._loop_update), ("foreach", optim._foreach_update)):
        monkeypatch.setattr(optim, f"_{name}_update", lambda *a, _n=name, _f=fn: (calls.__setitem__(_n, calls[_n] + 1), _f(*a)))
    r = bench_optim.measure("tiny", torch.device("cpu"), 2)
    groups = len(optim.param_groups(MiroModel.from_config(get_config("tiny")), 0.01))
    assert calls == {"loop": 3 * groups, "foreach": 3 * groups}  # warm-up + 2 timed steps, each group
    assert r["tensors"] > 0 and r["loop"] > 0 and r["foreach"] > 0
    assert bench_optim.main(["--config", "tiny", "--iters", "1"]) == 0
    assert "tiny on cpu:" in capsys.readouterr().out
