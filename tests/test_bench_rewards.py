"""benchmarks/bench_rewards.py: the Shapes suite times real detections, not the shared cache."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_rewards  # noqa: E402


def test_shapes_suite_detects_in_every_timed_run(monkeypatch, tmp_path, capsys):
    import miro.shapes.detector as det

    calls = []
    real = det.detect_array
    monkeypatch.setattr(det, "detect_array", lambda img, cfg=None: calls.append(1) or real(img, cfg))
    bench_rewards.suite_shapes(2)
    # warm-up + 3 timed runs, 2 images, at least the three detector rewards (alignment, counting,
    # position): with the shared cache left full, only the first run would detect (2 calls)
    assert len(calls) >= 4 * 2 * 3
    # --folder: generated images in GenEval layout, with their prompts
    for i, prompt in enumerate(["a photo of a red circle", "a photo of two blue squares"]):
        d = tmp_path / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(d / "samples" / "0000.png")
    bench_rewards.suite_shapes(5, str(tmp_path))
    out = capsys.readouterr().out
    assert "2 generated images from" in out and out.count("shapes_") >= 10
