"""What the web demo adds on top of the pipeline: HTTP, JSON, PNG encoding and base64.

Loads a pipeline the way ``miro demo`` does, starts the demo server on 127.0.0.1 (a free port)
in a thread, and times, alternately, a direct ``pipe(...)`` call and the same request through
``POST /api/generate`` (round trip: request, checks, generation, PNG + base64, JSON, read back).
Both get the same seed; the script checks that they return the same pixels. Reports medians.

    python benchmarks/bench_demo.py --steps 10 --n 4 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.request

import numpy as np

from _args import ArgumentParser, positive_int, run_main  # beside this script


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--n", type=positive_int, default=4)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1)
    args = p.parse_args(argv)
    from miro.demo.handlers import DemoLimits

    limits = DemoLimits()  # the demo as `miro demo` serves it: larger requests get a 400 there
    for flag, value, most in (("--steps", args.steps, limits.max_steps), ("--n", args.n, limits.max_images)):
        if value > most:  # refused before the direct call spends minutes on a request the server refuses
            p.error(f"{flag} {value} is above the demo's limit of {most}")

    import torch
    from PIL import Image

    from miro.demo.server import make_server
    from miro.generate_cli import load_pipeline

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    server = make_server(pipe, "127.0.0.1", 0, model_name=args.model, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    payload = {"prompt": "two red circles above a blue square", "num_inference_steps": args.steps,
               "num_images_per_prompt": args.n, "seed": 3407}

    def direct():
        return pipe(payload["prompt"], num_inference_steps=args.steps, num_images_per_prompt=args.n,
                    guidance_scale=7.0, generator=torch.Generator().manual_seed(3407), output_type="np")

    def http():
        req = urllib.request.Request(server.url + "api/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            raw = r.read()
        body = json.loads(raw)
        imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB"))
                for u in body["images"]]
        return np.stack(imgs), len(raw), body["seconds"]

    try:
        want = direct()  # warm-up (loads the text encoder)
        got, size, _ = http()
        assert np.array_equal(got, want), "the demo's images differ from the pipeline's"
        d_times, h_times, gen_times = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            direct()
            d_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            _, size, gen_s = http()
            h_times.append(time.perf_counter() - t)
            gen_times.append(gen_s)
        t = time.perf_counter()
        for _ in range(20):
            urllib.request.urlopen(server.url + "api/info", timeout=30).read()
        info_ms = (time.perf_counter() - t) / 20 * 1e3
    finally:
        server.shutdown()
        server.server_close()
    d, h, g = (statistics.median(x) for x in (d_times, h_times, gen_times))
    print(f"model {args.model} ({pipe.source}), load {load_s:.2f} s, threads {args.threads}, "
          f"{args.n} images x {args.steps} steps, {args.repeats} repeats (medians)")
    print(f"direct pipe call      {d:.3f} s")
    print(f"POST /api/generate    {h:.3f} s round trip ({g:.3f} s generation inside), "
          f"overhead {1e3 * (h - g):.1f} ms, response {size / 1024:.1f} KiB")
    print(f"GET /api/info         {info_ms:.1f} ms")
    print("identical pixels: yes")


if __name__ == "__main__":
    run_main(main)
