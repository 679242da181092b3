"""MLLM judge against a stub OpenAI-compatible server on 127.0.0.1 (bounded, shuts itself down)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from miro.eval import mllm_judge as J
from miro.eval.folder import read_jsonl


class StubHandler(BaseHTTPRequestHandler):
    """Checks the request like an OpenAI endpoint would, then answers from the server's script."""

    def log_message(self, *a):  # keep test output clean
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = body["messages"][0]["content"]
        url = content[1]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        srv.sizes.append(im.size)
        answer = srv.script.pop(0) if srv.script else srv.default
        if answer == 500:
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    srv.requests, srv.sizes, srv.script = [], [], []
    srv.default = '{"prompt_alignment": 4, "visual_quality": 2, "details": "ok"}'
    srv.timeout = 5
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    watchdog = threading.Timer(30.0, srv.shutdown)  # the server stops by itself even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def _folder(root, metas):
    for i, m in enumerate(metas):
        d = root / f"{i:05d}" / "samples"
        d.mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(m) + "\n")
        Image.fromarray(np.full((600, 300, 3), 40 * i, np.uint8)).save(d / "0000.png")
    return root


@pytest.mark.timeout(60)
def test_judge_folder_against_stub(stub, tmp_path, monkeypatch):
    srv, url = stub
    monkeypatch.setenv("MY_KEY", "sk-test")
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t"}, {"prompt": "a blue dog", "tag": "t"},
                              {"prompt": "a cow", "tag": "t"}])
    srv.script = ['```json\n{"prompt_alignment": 5, "visual_quality": 3, "details": "fine"}\n```',
                  '{"prompt_alignment": 9, "visual_quality": 3}', '{"prompt_alignment": 2, "visual_quality": 1}',
                  500, 500]
    cfg = J.JudgeConfig(base_url=url, model="stub-vlm", api_key_env="MY_KEY", timeout=5, max_retries=1)
    monkeypatch.setattr(J.time, "sleep", lambda s: None)
    s = J.judge_folder(root, cfg, progress=False)
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "stub-vlm" and "a red cat" in req["body"]["messages"][0]["content"][0]["text"]
    assert max(srv.sizes[0]) == 512  # downscaled before upload
    recs = {r["prompt"]: r for r in read_jsonl(root / "judge.jsonl")}
    assert recs["a red cat"]["prompt_alignment"] == 5 and recs["a red cat"]["details"] == "fine"
    assert recs["a blue dog"]["prompt_alignment"] == 2  # out-of-range answer retried once
    assert "error" in recs["a cow"]  # server errors exhaust the retries
    assert s == {"rubric": "alignment", "images": 3, "answered": 2, "errors": 1, "unreadable": 0,
                 "first_error": "HTTPError: HTTP Error 500: Internal Server Error", "fields": {
        "prompt_alignment": {"mean": 3.5, "n": 2}, "visual_quality": {"mean": 2.0, "n": 2}}}
    # resume: only the failed image is asked again
    n = len(srv.requests)
    s = J.judge_folder(root, cfg, progress=False)
    assert len(srv.requests) == n + 1 and s["errors"] == 0 and s["answered"] == 3


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_a_limit_below_one_is_refused_before_any_request(tmp_path, limit, capsys):
    # todo[:limit] would judge nothing (0) or all but the last images (-1), silently
    from miro.eval import cli

    root = _folder(tmp_path, [{"prompt": "a cow", "tag": "t"}, {"prompt": "a dog", "tag": "t"}])
    cfg = J.JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout=1, max_retries=0)
    with pytest.raises(ValueError, match=f"limit must be an integer >= 1 .*; got {limit}"):
        J.judge_folder(root, cfg, limit=limit, progress=False)
    assert not (root / "judge.jsonl").exists()
    if isinstance(limit, int):
        assert cli.main(["judge", str(root), "--base-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                         "--limit", str(limit)]) == 2
        assert f"limit must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cure_rubric_and_validation(stub):
    srv, url = stub
    cfg = J.JudgeConfig(base_url=url, model="m", rubric="cure", timeout=5, max_retries=0)
    body = J.build_request(cfg, Image.new("RGB", (8, 8)), {"prompt": "An image of Panta Bhat", "item": "Panta Bhat",
                                                           "category": "Rice_Dish", "region": "Bangladesh"})
    text = body["messages"][0]["content"][0]["text"]
    assert "Panta Bhat" in text and "Rice Dish" in text and "Bangladesh" in text
    srv.default = '{"country_likelihood": 4, "item_accuracy": 3, "details": "x"}'
    ans = J.judge_image(cfg, Image.new("RGB", (8, 8)), {"prompt": "p"})
    assert ans["country_likelihood"] == 4 and ans["item_accuracy"] == 3
    with pytest.raises(ValueError, match="rubric"):
        J.JudgeConfig(base_url=url, model="m", rubric="vibes")
    with pytest.raises(ValueError, match="http"):
        J.JudgeConfig(base_url="ftp://x", model="m")
    with pytest.raises(ValueError, match="integer 1-5"):
        J.parse_answer('{"a": true}', ("a",))
    with pytest.raises(ValueError, match="no JSON"):
        J.parse_answer("I think 4", ("a",))


@pytest.mark.timeout(60)
def test_judge_command_prints_overall(stub, tmp_path, capsys):
    from miro.eval.cli import main

    srv, url = stub
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t"}])
    assert main(["judge", str(root), "--base-url", url, "--judge-model", "m", "--timeout", "5"]) == 0
    # ratings 4 and 2 -> mean 3 -> (3 - 1) / 4
    assert capsys.readouterr().out.strip().splitlines()[-1] == "overall: 0.50000"


@pytest.mark.timeout(60)
def test_judge_command_says_why_nothing_was_judged(tmp_path, capsys):
    import socket

    from miro.eval.cli import main

    with socket.socket() as s:  # a port nothing listens on: every request is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t"}])
    assert main(["judge", str(root), "--base-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m",
                 "--timeout", "1"]) == 1
    cap = capsys.readouterr()
    assert "0 answered, 1 errors, 0 unreadable" in cap.out and "first error: URLError" in cap.err
    assert json.loads((root / "judge_summary.json").read_text())["first_error"].startswith("URLError")


CURE_ANSWER = '{"country_likelihood": 5, "item_accuracy": 1, "details": "x"}'


@pytest.mark.timeout(60)
def test_answers_are_kept_per_rubric(stub, tmp_path):
    """Judging a folder again with another rubric asks its questions about every image; each
    summary holds one rubric's answers."""
    srv, url = stub
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t", "item": "cat", "region": "Peru"},
                              {"prompt": "a cow", "tag": "t", "item": "cow", "region": "Chad"}])
    cfg = {"base_url": url, "model": "m", "timeout": 5, "max_retries": 0}
    s = J.judge_folder(root, J.JudgeConfig(**cfg), progress=False)
    assert s["answered"] == 2 and s["fields"]["prompt_alignment"]["mean"] == 4.0
    # an answer written before the rubric was recorded counts for the rubric whose fields it holds
    lines = read_jsonl(root / "judge.jsonl")
    (root / "judge.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "rubric"}) + "\n"
                                              for r in lines))
    srv.default = CURE_ANSWER
    s = J.judge_folder(root, J.JudgeConfig(rubric="cure", **cfg), progress=False)
    assert len(srv.requests) == 4 and "country_likelihood" in srv.requests[-1]["body"]["messages"][0]["content"][0]["text"]
    assert s["rubric"] == "cure" and s["answered"] == 2 and s["images"] == 2
    assert s["fields"] == {"country_likelihood": {"mean": 5.0, "n": 2}, "item_accuracy": {"mean": 1.0, "n": 2}}
    assert [r.get("rubric") for r in read_jsonl(root / "judge.jsonl")] == [None, None, "cure", "cure"]
    # each rubric resumes on its own answers
    s = J.judge_folder(root, J.JudgeConfig(**cfg), progress=False)
    assert len(srv.requests) == 4 and s["rubric"] == "alignment" and s["fields"]["prompt_alignment"]["mean"] == 4.0
    assert json.loads((root / "judge_summary.json").read_text())["rubric"] == "alignment"


def test_the_cure_rubric_refuses_a_folder_without_items_and_regions(tmp_path):
    """Its questions name the item and region: on GenEval prompts it would rate placeholders."""
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t", "item": "cat", "region": "Peru"},
                              {"prompt": "a cow", "tag": "t", "item": "cow"}])
    cfg = J.JudgeConfig(base_url="http://127.0.0.1:9", model="m", rubric="cure", timeout=1, max_retries=0)
    with pytest.raises(ValueError, match=r"--rubric cure asks about each prompt's item and region, but .*00001 has "
                                         r"no 'region' in its metadata \(1 missing field\(s\) in all\)"):
        J.judge_folder(root, cfg, progress=False)
    assert not (root / "judge.jsonl").exists() or not read_jsonl(root / "judge.jsonl")


@pytest.mark.timeout(60)
def test_an_unreadable_image_is_skipped_and_counted(stub, tmp_path, capsys):
    from miro.eval.cli import main

    srv, url = stub
    root = _folder(tmp_path, [{"prompt": "a red cat", "tag": "t"}, {"prompt": "a cow", "tag": "t"}])
    (root / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG truncated")
    argv = ["judge", str(root), "--base-url", url, "--judge-model", "m", "--timeout", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "1 answered, 0 errors, 1 unreadable (skipped, retried on the next run)" in out
    assert out[-1] == "overall: 0.50000" and len(srv.requests) == 1
    assert [r["filename"] for r in read_jsonl(root / "judge.jsonl")] == ["00000/samples/0000.png"]
    # the run can finish: once the image is readable again it alone is judged
    Image.new("RGB", (8, 8)).save(root / "00001" / "samples" / "0000.png")
    assert main(argv) == 0 and len(srv.requests) == 2
    assert json.loads((root / "judge_summary.json").read_text())["answered"] == 2


class RedirectHandler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.server.code)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [302, 307])
def test_a_redirect_is_not_followed_with_the_key(stub, monkeypatch, code):
    srv, url = stub
    hop = ThreadingHTTPServer(("127.0.0.1", 0), RedirectHandler)
    hop.code, hop.target = code, url + "/chat/completions"
    t = threading.Thread(target=hop.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("MIRO_TEST_JUDGE_KEY", "sk-secret")
        cfg = J.JudgeConfig(base_url=f"http://127.0.0.1:{hop.server_address[1]}/v1", model="m",
                            api_key_env="MIRO_TEST_JUDGE_KEY", max_retries=0)
        ans = J.judge_image(cfg, Image.new("RGB", (8, 8)), {"prompt": "p"})
    finally:
        hop.shutdown()
        hop.server_close()
        t.join(timeout=5)
    assert srv.requests == []  # the redirect's target never saw the request (nor the key)
    assert "redirect to" in ans["error"] and "sk-secret" not in ans["error"]


def test_a_key_over_plain_http_to_another_host_is_warned(tmp_path, monkeypatch):
    import warnings

    (tmp_path / "empty" / "00000" / "samples").mkdir(parents=True)  # one prompt, no image: nothing is sent
    (tmp_path / "empty" / "00000" / "metadata.jsonl").write_text('{"prompt": "a red circle"}\n')
    monkeypatch.setenv("MY_KEY", "sk-secret")
    cfg = dict(model="m", api_key_env="MY_KEY")
    with pytest.warns(UserWarning, match=r"MY_KEY is sent unencrypted to judge.example \(base_url 'http://judge"):
        J.judge_folder(tmp_path / "empty", J.JudgeConfig(base_url="http://judge.example/v1", **cfg), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: https, a loopback host, or no key at all
        for url in ("https://judge.example/v1", "http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]/v1"):
            J.judge_folder(tmp_path / "empty", J.JudgeConfig(base_url=url, **cfg), progress=False)
        monkeypatch.delenv("MY_KEY")
        J.judge_folder(tmp_path / "empty", J.JudgeConfig(base_url="http://judge.example/v1", **cfg), progress=False)
