"""``miro demo``: JSON handlers on a tiny pipeline, and one real server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from miro.demo.handlers import (
    DemoLimits,
    handle_generate,
    handle_info,
    isolation_targets,
    parse_generate_request,
)
from miro.demo.server import main as demo_main
from miro.demo.server import make_server
from miro.encoders.tiny import tiny_pipeline

PROMPT = "two red circles above a blue square"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("demo_tiny"))


def _req(**kw):
    base = {"prompt": PROMPT, "num_inference_steps": 2, "num_images_per_prompt": 2, "seed": 0}
    base.update(kw)
    return base


def _decode(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


def test_generate_returns_the_pipelines_images(pipe):
    status, body = handle_generate(pipe, _req(num_images_per_prompt=3, seed=11))
    assert status == 200, body
    res = int(pipe.config["network"]["data_size"])
    assert len(body["images"]) == 3 and body["width"] == body["height"] == res
    got = np.stack([np.asarray(_decode(u).convert("RGB")) for u in body["images"]])
    assert got.shape == (3, res, res, 3)
    # The demo is the pipeline: same arguments and seed give the same pixels.
    want = pipe(PROMPT, num_inference_steps=2, num_images_per_prompt=3, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(11), output_type="np")
    np.testing.assert_array_equal(got, want)
    assert body["seed"] == 11 and body["seconds"] >= 0
    assert body["reward_targets"] == {k: 1.0 for k in pipe.coherence_keys}
    assert body["negative_reward_targets"] == {k: 0.0 for k in pipe.coherence_keys}


def test_reward_guidance_scale_reaches_the_pipeline(pipe):
    for direction in ("prompt", "null"):
        status, body = handle_generate(pipe, _req(num_images_per_prompt=2, seed=4, reward_guidance_scale=12.5,
                                                  reward_direction=direction))
        assert status == 200, body
        got = np.stack([np.asarray(_decode(u).convert("RGB")) for u in body["images"]])
        want = pipe(PROMPT, num_inference_steps=2, num_images_per_prompt=2, guidance_scale=7.0,
                    reward_guidance_scale=12.5, reward_direction=direction,
                    generator=torch.Generator().manual_seed(4), output_type="np")
        np.testing.assert_array_equal(got, want)
        assert body["reward_guidance_scale"] == 12.5 and body["reward_direction"] == direction
    assert handle_generate(pipe, _req(seed=4))[1]["reward_guidance_scale"] is None
    per = {pipe.coherence_keys[0]: 12.5}  # one scale per reward, through the JSON API
    status, body = handle_generate(pipe, _req(num_images_per_prompt=1, seed=4, reward_guidance_scale=per))
    assert status == 200 and body["reward_guidance_scale"] == per
    want = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.0, reward_guidance_scale=per,
                generator=torch.Generator().manual_seed(4), output_type="np")
    np.testing.assert_array_equal(np.asarray(_decode(body["images"][0]).convert("RGB"))[None], want)


def test_same_seed_same_bytes_other_seed_differs(pipe):
    a = handle_generate(pipe, _req(seed=5))[1]["images"]
    b = handle_generate(pipe, _req(seed=5))[1]["images"]
    c = handle_generate(pipe, _req(seed=6))[1]["images"]
    assert a == b
    assert a != c


def test_reward_slider_changes_output(pipe):
    key = pipe.coherence_keys[0]
    base = handle_generate(pipe, _req())[1]
    moved = handle_generate(pipe, _req(reward_targets={key: 0.0}))[1]
    assert moved["reward_targets"][key] == 0.0
    assert moved["images"] != base["images"]
    neg = handle_generate(pipe, _req(negative_reward_targets={key: 1.0}))[1]
    assert neg["negative_reward_targets"][key] == 1.0 and neg["images"] != base["images"]


def test_isolate_sets_negative_to_positive_with_one_reward_at_zero(pipe):
    keys = pipe.coherence_keys
    pos = {k: (i + 1) / 8 for i, k in enumerate(keys)}
    want = dict(pos, **{keys[1]: 0.0})
    assert isolation_targets(pos, keys[1]) == want
    iso = handle_generate(pipe, _req(reward_targets=pos, isolate=keys[1]))
    explicit = handle_generate(pipe, _req(reward_targets=pos, negative_reward_targets=want))
    assert iso[0] == explicit[0] == 200
    assert iso[1]["negative_reward_targets"] == want and iso[1]["isolate"] == keys[1]
    assert iso[1]["images"] == explicit[1]["images"]


def test_random_seed_is_reported_and_reproducible(pipe):
    class Fixed:
        def randbelow(self, n):
            return 1234

    assert parse_generate_request(pipe, _req(seed=-1), rng=Fixed()).seed == 1234
    status, body = handle_generate(pipe, _req(seed=-1))
    assert status == 200 and 0 <= body["seed"] < 2**31
    assert handle_generate(pipe, _req(seed=body["seed"]))[1]["images"] == body["images"]


BAD = [
    ({"reward_targets": {"bogus": 1.0}}, "reward_targets", ["bogus", "valid keys"]),
    ({"reward_targets": {"KEY0": 1.5}}, "reward_targets", ["1.5", "[0, 1]"]),
    ({"negative_reward_targets": {"KEY0": "high"}}, "negative_reward_targets", ["'high'", "[0, 1]"]),
    ({"reward_targets": [1, 2]}, "reward_targets", ["[1, 2]", "dict"]),
    ({"num_inference_steps": 0}, "num_inference_steps", ["got 0", ">= 1"]),
    ({"num_inference_steps": 2.5}, "num_inference_steps", ["2.5", "integer"]),
    ({"num_inference_steps": 201}, "num_inference_steps", ["201", "1 to 200"]),
    ({"guidance_scale": -1}, "guidance_scale", ["-1", ">= 0"]),
    ({"guidance_scale": "7"}, "guidance_scale", ["'7'"]),
    ({"reward_guidance_scale": -2}, "reward_guidance_scale", ["-2", "None or a finite number >= 0"]),
    ({"reward_guidance_scale": True}, "reward_guidance_scale", ["True"]),
    ({"reward_direction": "text"}, "reward_direction", ["'text'", "'prompt' or 'null'"]),
    ({"reward_guidance_scale": {"nope": 2}}, "reward_guidance_scale", ["unknown reward keys ['nope']"]),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt", ["got 0", ">= 1"]),
    ({"num_images_per_prompt": 9}, "num_images_per_prompt", ["= 9", "1 to 8"]),
    ({"seed": -2}, "seed", ["-2", "2**63 - 1"]),
    ({"seed": True}, "seed", ["True", "integer"]),
    ({"seed": 2**63}, "seed", [str(2**63)]),
    ({"prompt": ""}, "prompt", ["''", "non-empty"]),
    ({"prompt": None}, "prompt", ["None", "string"]),
    ({"prompt": "a" * 2001}, "prompt", ["2001", "2000"]),
    ({"isolate": "bogus"}, "isolate", ["'bogus'", "KEY0"]),
    ({"isolate": "KEY0", "negative_reward_targets": {}}, "isolate", ["not both"]),
    ({"steps": 10}, "steps", ["'steps'", "num_inference_steps"]),
]


@pytest.mark.parametrize("patch,field,fragments", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_fields_give_400_naming_them(pipe, patch, field, fragments):
    key0 = pipe.coherence_keys[0]

    def sub(o):  # "KEY0" stands for the checkpoint's first reward key
        if isinstance(o, dict):
            return {sub(k): sub(v) for k, v in o.items()}
        return o.replace("KEY0", key0) if isinstance(o, str) else o

    payload = _req(**sub(patch))
    status, body = handle_generate(pipe, payload)
    assert status == 400
    assert body["field"] == field
    for frag in fragments:
        assert sub(frag) in body["error"], (frag, body["error"])


def test_non_object_body_is_400(pipe):
    status, body = handle_generate(pipe, ["prompt"])
    assert status == 400 and "JSON object" in body["error"] and body["field"] is None


def test_generation_is_serialised(pipe):
    active, peak, guard = [0], [0], threading.Lock()

    class Tracking:  # the pipeline, counting how many calls overlap
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, *a, **kw):
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            try:
                return pipe(*a, **kw)
            finally:
                with guard:
                    active[0] -= 1

    lock, results = threading.Lock(), []
    threads = [threading.Thread(target=lambda: results.append(handle_generate(Tracking(), _req(), lock=lock)[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [200, 200, 200] and peak[0] == 1


def test_busy_gives_503_after_queue_timeout(pipe):
    lock = threading.Lock()
    lock.acquire()
    try:
        status, body = handle_generate(pipe, _req(), DemoLimits(queue_timeout_s=0.0), lock)
    finally:
        lock.release()
    assert status == 503 and "busy" in body["error"]


def test_info(pipe):
    status, info = handle_info(pipe, "tiny", DemoLimits(max_steps=30, max_images=3))
    assert status == 200
    assert info["coherence_keys"] == list(pipe.coherence_keys)
    assert set(info["labels"]) == set(pipe.coherence_keys)
    assert info["resolution"] == int(pipe.config["network"]["data_size"])  # identity codec
    d = info["defaults"]
    assert (d["num_inference_steps"], d["guidance_scale"], d["seed"]) == (50, 7.0, 3407)
    assert info["slider_step"] == 1 / 64
    assert info["limits"]["max_steps"] == 30 and info["limits"]["max_images"] == 3
    json.dumps(info)  # serialisable as is


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_steps"):
        DemoLimits(max_steps=0)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        DemoLimits(queue_timeout_s=float("nan"))


def test_cli_rejects_bad_flags_before_loading(capsys):
    assert demo_main(["--threads", "0"]) == 2
    assert demo_main(["--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 1, got 0" in err and "--port must be in [0, 65535], got 70000" in err
    with pytest.raises(SystemExit) as e:
        demo_main(["--help"])
    assert e.value.code == 0
    assert "--max-images" in capsys.readouterr().out


def _call(url, data=None, ctype="application/json", method=None):
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def test_real_server_round_trip(pipe):
    server = make_server(pipe, "127.0.0.1", 0, model_name="tiny", limits=DemoLimits(max_body_bytes=4096),
                         quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = server.url
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0/")
        status, ctype, page = _call(base)
        assert status == 200 and ctype.startswith("text/html")
        assert b"api/generate" in page and b"api/info" in page and b'id="isolate"' in page

        status, ctype, raw = _call(base + "api/info")
        info = json.loads(raw)
        assert status == 200 and ctype == "application/json"
        assert info["model"] == "tiny" and info["coherence_keys"] == list(pipe.coherence_keys)

        payload = _req(num_images_per_prompt=2, seed=3)
        status, _, raw = _call(base + "api/generate", json.dumps(payload).encode())
        body = json.loads(raw)
        assert status == 200 and len(body["images"]) == 2
        assert body["images"] == handle_generate(pipe, payload)[1]["images"]

        status, _, raw = _call(base + "api/generate", json.dumps(_req(num_inference_steps=0)).encode())
        assert status == 400 and json.loads(raw)["field"] == "num_inference_steps"
        status, _, raw = _call(base + "api/generate", b"{not json")
        assert status == 400 and "not valid UTF-8 JSON" in json.loads(raw)["error"]
        status, _, raw = _call(base + "api/generate", b"x" * 5000)
        assert status == 413 and "4096" in json.loads(raw)["error"]
        status, _, raw = _call(base + "api/generate", b"{}", ctype="text/plain")
        assert status == 415
        assert _call(base + "api/generate")[0] == 405
        assert _call(base + "nope")[0] == 404
        # bodies json.loads refuses beyond JSONDecodeError: a 400, not a dropped connection
        for body in (b"[" * 3000, b'{"seed": ' + b"9" * 5000 + b"}"):
            server.limits = DemoLimits(max_body_bytes=1 << 16)
            status, _, raw = _call(base + "api/generate", body)
            assert status == 400 and "not valid UTF-8 JSON" in json.loads(raw)["error"]
        # a POST to another path is refused without its body being read as the next request
        status, _, _ = _call(base + "api/info", b'{"prompt": "x"}')
        assert status == 405 and _call(base + "api/info")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_cli_serves_a_saved_pipeline_and_stops_on_ctrl_c(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "pipe")
    cmd = [sys.executable, "-m", "miro.demo.server", "--model", str(folder), "--port", "0",
           "--device", "cpu", "--threads", "1", "--quiet"]
    # A shell's background job (nohup ... &, a CI runner) starts with SIGINT ignored, and a child
    # inherits that; give the server a terminal's default disposition, as when a user runs it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        if url is None:
            proc.kill()
            pytest.fail(f"no URL printed; stdout: {''.join(lines)!r}; stderr: {proc.stderr.read()!r}")
        info = json.loads(_call(url + "api/info")[2])
        assert info["model"] == str(folder) and info["coherence_keys"] == list(pipe.coherence_keys)
        status, _, raw = _call(url + "api/generate", json.dumps(_req(seed=9)).encode())
        assert status == 200
        # The loaded folder is the same model: same bytes as the in-memory pipeline.
        assert json.loads(raw)["images"] == handle_generate(pipe, _req(seed=9))[1]["images"]
        proc.send_signal(signal.SIGINT)
        # communicate() drains both pipes while waiting, so a full stderr pipe cannot block the exit
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_queue_is_first_come_first_served_and_capped(pipe):
    from miro.demo.handlers import GenerationQueue

    q, order, started = GenerationQueue(), [], []
    assert q.acquire(timeout=1) and q.locked()  # a generation is running

    def wait(i):
        started.append(i)
        if q.acquire(timeout=10):
            order.append(i)
            q.release()

    threads = []
    for i in range(4):  # arrive one after another
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while q.waiting() < i + 1:
            time.sleep(0.005)
    # the cap: with 4 waiting and max_waiting=4 a fifth request is refused at once
    status, body = handle_generate(pipe, _req(), DemoLimits(max_waiting=4), q)
    assert status == 503 and "4 requests are already waiting" in body["error"]
    assert not q.acquire(timeout=0.01)  # a ticket that times out gives its turn up without blocking others
    q.release()
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2, 3] and not q.locked() and q.waiting() == 0


def test_a_request_whose_client_left_is_not_generated(pipe):
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, *a, **kw):
            calls.append(1)
            return pipe(*a, **kw)

    status, body = handle_generate(Counting(), _req(), still_wanted=lambda: False)
    assert status == 499 and "closed the connection" in body["error"] and not calls
    assert handle_generate(Counting(), _req(), still_wanted=lambda: True)[0] == 200 and calls == [1]


def _raw(server, request: bytes) -> bytes:
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_loopback_server_refuses_foreign_host_headers_and_odd_lengths(pipe):
    server = make_server(pipe, "127.0.0.1", 0, model_name="tiny", quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert server.loopback
        port = server.server_address[1]
        # a page on a rebound DNS name sends its own name as Host: refused before anything runs
        for host in (b"evil.example:%d" % port, b"127.0.0.1.evil.example", b"[::1"):
            out = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 403") and b"is not allowed" in out, out[:200]
        body = json.dumps(_req()).encode()
        out = _raw(server, b"POST /api/generate HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert out.startswith(b"HTTP/1.1 403")
        for host in (b"localhost:%d" % port, b"127.0.0.1:%d" % port, b"LOCALHOST", b"[::1]:%d" % port):
            out = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200"), (host, out[:200])
        # "\xb2" (superscript two) passes str.isdigit(), not int(): a 400 naming it, not a dropped
        # connection; so is -1; a missing header is a 411
        for length in (b"\xb2", b"-1"):
            out = _raw(server, b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                       b"\r\nContent-Length: " + length + b"\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400") and b"is not a byte count" in out, out[:200]
        out = _raw(server, b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 411"), out[:200]
        # other methods: JSON 405 with Allow; HEAD is GET without the body
        for method in (b"PUT", b"OPTIONS", b"DELETE"):
            out = _raw(server, method + b" / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD, POST" in head, out[:300]
            assert json.loads(body)["error"].startswith(f"method {method.decode()} is not supported")
        out = _raw(server, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 2\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in out
        head, _, body = _raw(server, b"HEAD /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                             ).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"" and b"Content-Length: " in head
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_open_connections_are_capped(pipe):
    """Idle clients hold a thread each: beyond max_connections a connection is answered 503 and closed
    at once, and a slot frees when a client leaves."""
    import socket

    server = make_server(pipe, "127.0.0.1", 0, model_name="tiny", quiet=True, limits=DemoLimits(max_connections=2))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted, each handler waiting for its request line
        out = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and b"too many open connections" in out, out[:200]
        body = out.split(b"\r\n\r\n", 1)[1]
        assert json.loads(body)["error"].startswith("too many open connections")
        idle.pop().close()
        deadline = time.time() + 5
        while True:  # the handler sees the close and gives its slot back
            out = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if out.startswith(b"HTTP/1.1 200") or time.time() > deadline:
                break
            time.sleep(0.05)
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    with pytest.raises(ValueError, match="max_connections must be an integer >= 1; got 0"):
        DemoLimits(max_connections=0)


def test_a_failing_generation_says_why_only_on_loopback(pipe):
    class Failing:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, *a, **k):
            raise RuntimeError("cannot read /home/someone/models/x.safetensors")

    body = json.dumps(_req()).encode()
    request = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    for loopback, shown in ((True, b"RuntimeError: cannot read /home/someone"), (False, b"see the server's log")):
        server = make_server(Failing(), "127.0.0.1", 0, model_name="tiny", quiet=True)
        server.loopback = loopback  # as if bound to a public address
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            out = _raw(server, request)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        assert out.startswith(b"HTTP/1.1 500") and b"generation failed: " + shown in out, out[:300]
        assert loopback or b"/home/someone" not in out


def test_cli_warns_when_listening_beyond_loopback(pipe, monkeypatch, capsys):
    import miro.demo.server as server_mod
    import miro.generate_cli as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pipe)

    def stop(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(server_mod.DemoServer, "serve_forever", stop)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert demo_main(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--quiet"]) == 0
        assert "warning" not in capsys.readouterr().err
        assert demo_main(["--host", "0.0.0.0", "--port", "0", "--device", "cpu", "--quiet"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "no authentication" in err


def test_info_names_local_folders_without_their_path_beyond_loopback(pipe, tmp_path):
    folder = tmp_path / "home" / "someone" / "export_run7"
    folder.mkdir(parents=True)

    class AtFolder:  # the pipeline as loaded from that folder
        source = str(folder)

        def __getattr__(self, name):
            return getattr(pipe, name)

    for loopback, shown in ((True, str(folder)), (False, "export_run7")):
        server = make_server(AtFolder(), "127.0.0.1", 0, model_name=str(folder), quiet=True)
        server.loopback = loopback  # as if bound to a public address
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            out = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        info = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert info["model"] == shown and info["source"] == shown and (loopback or b"someone" not in out)
    from miro.demo.handlers import handle_info

    _, info = handle_info(pipe, "org/miro-model", show_paths=False)
    assert info["model"] == "org/miro-model"  # a hub id is no local path


def test_a_reset_connection_is_one_line_not_a_traceback(pipe, capsys):
    import socket
    import struct

    for quiet in (True, False):
        server = make_server(pipe, "127.0.0.1", 0, model_name="tiny", quiet=quiet)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            s = socket.create_connection(server.server_address[:2], timeout=5)
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            s.close()
            time.sleep(0.5)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert ("connection lost" in err) is not quiet, err


def test_ipv6_loopback_binds():
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:  # a kernel without IPv6
        pytest.skip(f"::1 not available here: {e}")
    server = make_server(None, "::1", 0, model_name="tiny", quiet=True)
    try:
        assert server.loopback and server.url.startswith("http://[::1]:")
    finally:
        server.server_close()


def test_guidance_is_bounded_and_the_cap_holds_under_its_lock(pipe):
    from miro.demo.handlers import GenerationQueue, QueueFull

    for field, value in (("guidance_scale", 1e30), ("reward_guidance_scale", 1e39),
                         ("reward_guidance_scale", {pipe.coherence_keys[0]: 101.0})):
        status, body = handle_generate(pipe, {**_req(), field: value}, DemoLimits(), GenerationQueue())
        assert status == 400 and body["field"] == field and "at most 100" in body["error"], body
    q = GenerationQueue()
    assert q.acquire(timeout=1)
    with pytest.raises(QueueFull):  # counted and joined in one step: nothing waits, the cap is 0
        q.acquire(timeout=1, max_waiting=0)
    assert q.waiting() == 0
    q.release()


def test_the_port_is_taken_before_the_model_loads(monkeypatch, capsys):
    import socket

    import miro.generate_cli as G
    from miro.demo.server import main

    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded before the port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port), "--device", "cpu"]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
