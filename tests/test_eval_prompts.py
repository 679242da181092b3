"""Prompt sets: GenEval metadata, PartiPrompts, CuRe with MIA variants, plain files."""

from __future__ import annotations

import collections
import json

import pytest

from miro.eval import prompts as P


def test_geneval_553_prompts_with_published_tag_counts(shared_data):
    items = P.load_geneval(shared_data / "geneval" / "evaluation_metadata.jsonl")
    assert len(items) == 553
    counts = collections.Counter(it.metadata["tag"] for it in items)
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    first = items[0]
    assert first.prompt == "a photo of a bench" and first.metadata["include"] == [{"class": "bench", "count": 1}]
    # exclude clauses only on counting prompts
    assert all(("exclude" in it.metadata) == (it.metadata["tag"] == "counting") for it in items)


def test_partiprompts_1632_and_quotes_kept(shared_data):
    items = P.load_parti(shared_data / "partiprompts" / "PartiPrompts.tsv")
    assert len(items) == 1632
    assert len({it.metadata["tag"] for it in items}) == 12
    assert items[0].prompt == "bond" and items[0].metadata["tag"] == "Abstract"
    quoted = [it.prompt for it in items if it.prompt.startswith('"G I G G L E"')]
    assert len(quoted) == 1  # the default CSV dialect would have stripped these quotes


def test_cure_300_items_times_three_mia_variants(shared_data):
    items = P.load_cure(shared_data / "cure")
    assert len(items) == 900
    by_var = collections.Counter(it.metadata["mia_variant"] for it in items)
    assert by_var == {v: 300 for v in P.CURE_VARIANTS}
    assert collections.Counter(it.metadata["supercategory"] for it in items if it.metadata["tag"] == "item") == {
        n: 50 for n in P.CURE_FILES}
    row = [it for it in items if it.metadata["item"] == "Panta Bhat"]
    assert [it.prompt for it in row] == ["An image of Panta Bhat", "An image of Panta Bhat. Rice Dish",
                                         "An image of Panta Bhat. Rice Dish, Bangladesh"]
    only = P.load_cure(shared_data / "cure", variants=("item+category+region",))
    assert len(only) == 300
    with pytest.raises(ValueError, match="unknown CuRe variant"):
        P.load_cure(shared_data / "cure", variants=("item+colour",))


def test_load_prompts_dispatches_on_name_and_suffix(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MIRO_DATA_DIR", str(shared_data))
    assert len(P.load_prompts("geneval")) == 553
    assert len(P.load_prompts("parti", limit=5)) == 5
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n two blue squares \n")
    assert [it.prompt for it in P.load_prompts(str(txt))] == ["a red circle", "two blue squares"]
    jl = tmp_path / "m.jsonl"
    jl.write_text(json.dumps({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}],
                              "prompt": "a photo of a red cat"}) + "\n")
    assert P.load_prompts(str(jl))[0].metadata["include"][0]["color"] == "red"
    with pytest.raises(ValueError, match="not one of"):
        P.load_prompts("drawbench")
    (tmp_path / "p.csv").write_text("x\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        P.load_prompts(str(tmp_path / "p.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs 'prompt' and 'tag'"):
        P.load_prompts(str(bad))


def test_missing_public_file_downloads_into_cache_or_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("MIRO_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the suite runs offline; here the download is stubbed
    monkeypatch.setenv("MIRO_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    class _Resp:
        def __init__(self, data):
            self.data = data

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def fake_urlopen(url, timeout):
        calls.append(url)
        return _Resp(b"Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\t\n")

    monkeypatch.setattr(P.urllib.request, "urlopen", fake_urlopen)
    items = P.load_prompts("parti")
    assert [it.prompt for it in items] == ["a cat"] and calls == [P.PARTI_URL]
    assert (tmp_path / "cache" / "prompts" / "partiprompts" / "PartiPrompts.tsv").is_file()
    P.load_prompts("parti")  # cached: no second download
    assert len(calls) == 1

    def offline(url, timeout):
        raise P.urllib.error.URLError("no network")

    monkeypatch.setattr(P.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"could not download .*; pass the file with --prompts PATH, "
                                              r"or put it at \$MIRO_DATA_DIR/geneval/evaluation_metadata.jsonl"):
        P.load_prompts("geneval")
    # CuRe's CSVs cannot be given with --prompts: the error names --cure-dir and the files
    with pytest.raises(ConnectionError, match=r"pass --cure-dir DIR, a folder of CuRe's 6 CSVs \(architecture, .*\), "
                                              r"or put it at \$MIRO_DATA_DIR/cure/architecture.csv"):
        P.load_prompts("cure")
    assert not list((tmp_path / "cache" / "prompts").glob("geneval/*"))


def test_a_bad_geneval_line_is_named_by_file_and_line(tmp_path):
    from miro.eval.prompts import load_geneval

    f = tmp_path / "meta.jsonl"
    for text, msg in (('{"prompt": "a cat", "tag": "single_object"}\n\n{"prompt": \n', r"meta.jsonl:3: not a JSON object"),
                      ('["a cat"]\n', r"meta.jsonl:1: a GenEval metadata line must be a JSON object; got list"),
                      ('{"prompt": "a cat"}\n', r"meta.jsonl:1: a GenEval metadata line needs 'prompt' and 'tag'; "
                                                r"got keys \['prompt'\]")):
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_geneval(f)
    f.write_text('{"prompt": "a cat", "tag": "single_object"}\n\n')
    assert [it.prompt for it in load_geneval(f)] == ["a cat"]
