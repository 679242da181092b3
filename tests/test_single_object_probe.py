"""benchmarks/single_object_probe.py: its scenes are what its captions say (the detector reads the
right class off the drawn images), and a short run trains, samples and logs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import single_object_probe as probe  # noqa: E402

from miro.shapes.detector import detect_array  # noqa: E402


def test_scenes_match_their_captions():
    imgs, caps, classes = probe.single_object_batch(np.random.default_rng(0), 40, 32)
    assert imgs.shape == (40, 32, 32, 3) and imgs.dtype == np.uint8
    right = 0
    for im, cap, cls in zip(imgs, caps, classes):
        assert cap.endswith(" " + cls) and cap.startswith("a photo of a ")
        dets = detect_array(im.astype(np.float32) / 255)
        right += len(dets) == 1 and dets[0].cls == cls
    assert right >= 38  # the probe's score is ~1 on the data itself


def test_short_run_logs_evaluations(tmp_path):
    out = tmp_path / "p"
    assert probe.main(["--out", str(out), "--steps", "2", "--batch", "2", "--eval-every", "1", "--eval-images", "3",
                       "--threads", "1"]) == 0
    log = json.loads((out / "probe.json").read_text())
    assert [e["step"] for e in log["evals"]] == [1, 2]
    for e in log["evals"]:
        assert 0 <= e["shape_right"] <= e["one_object"] <= 1 and np.isfinite(e["loss"])
    assert (out / "grid_2.png").is_file()


def test_bad_override_is_named(tmp_path):  # a ValueError: one line and exit 2 under run_main
    with pytest.raises(ValueError, match="--override 'nosuchsection.x=1': expected SECTION.KEY=JSON"):
        probe.main(["--out", str(tmp_path), "--override", "nosuchsection.x=1", "--steps", "1"])
    with pytest.raises(ValueError, match="--override 'network.patch_size=x': 'x' is not JSON"):
        probe.main(["--out", str(tmp_path), "--override", "network.patch_size=x", "--steps", "1"])


@pytest.mark.parametrize("peer,extra", [("unet", ["--dim", "8"]), ("dit", ["--dim", "16", "--depth", "1"])])
def test_peers_train_and_log(tmp_path, peer, extra):
    import probe_peers

    out = tmp_path / peer
    assert probe_peers.main(["--peer", peer, "--out", str(out), "--steps", "2", "--eval-every", "2",
                             "--threads", "1", *extra]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["peer"] == peer and log["parameters"] > 0
    (e,) = log["evals"]
    assert e["samples"] == 128 and 0 <= e["shape_right"] <= e["one_object"] <= 1 and np.isfinite(e["loss"])
    assert (out / "grid_2.png").is_file()

