"""The load generator's data handling, without any server."""

from __future__ import annotations

import json
import time

import pytest

from beluga.loadgen import dataset, report, score, synth
from beluga.loadgen.replay import ReplaySettings, TargetError, check_target

pytestmark = pytest.mark.timeout(60)


def test_synthetic_data_reads_back_in_lveval_layout(tmp_path):
    paths = synth.write(tmp_path, ["hotpotwikiqa_mixup", "factrecall_en"], rows=3, length="16k", seed=7, words=800)
    assert paths[0] == tmp_path / "hotpotwikiqa_mixup" / "hotpotwikiqa_mixup_16k.jsonl"
    first = json.loads(paths[0].read_text().splitlines()[0])
    assert set(first) == {"input", "context", "answers", "length", "dataset", "language", "answer_keywords",
                          "confusing_facts"}
    rows = dataset.read(tmp_path, None, "16k")
    assert len(rows) == 6 and rows[0].answers[0] in rows[0].context
    assert synth.make_rows("x", 2, "16k", 7, 800) == synth.make_rows("x", 2, "16k", 7, 800)  # deterministic
    hotpot = next(r for r in rows if r.subset == "hotpotwikiqa_mixup")
    prompt = dataset.build_prompt(hotpot)
    assert prompt.startswith("Answer the question based on the given passages") and hotpot.input in prompt


def test_real_lveval_rows_unchanged(tmp_path):
    """A row exactly as the dataset ships it (answers list, answer_keywords string, confusing_facts list)."""
    row = {"input": "Who wrote it?", "context": "Passage 1: ...", "answers": ["Ann"], "length": 12034,
           "dataset": "loogle_SD_mixup_16k", "language": "en", "answer_keywords": "Ann",
           "confusing_facts": ["Bob wrote it."]}
    p = tmp_path / "loogle_SD_mixup" / "loogle_SD_mixup_16k.jsonl"
    p.parent.mkdir()
    p.write_text(json.dumps(row) + "\n")
    [r] = dataset.read(tmp_path, ["loogle_SD_mixup"], "16k")
    assert r.answers == ["Ann"] and r.length == 12034 and "only relevant to one passage" in dataset.build_prompt(r)


@pytest.mark.parametrize("content,message", [
    ('{"input": "q"}\n', r":1: missing field\(s\) context, answers"),
    ('{"input":"q","context":"c","answers":["a"],"length":1,"dataset":"d","language":"en"}\n{broken\n',
     ":2: not valid JSON"),
    ("", "empty file"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "s" / "s_16k.jsonl"
    p.parent.mkdir()
    p.write_text(content)
    with pytest.raises(dataset.DataError, match=message) as e:  # noqa: PT011
        dataset.read(tmp_path, ["s"], "16k")
    assert str(p) in str(e.value)


def test_unreachable_target_fails_fast(tmp_path):
    import asyncio

    import httpx

    s = ReplaySettings(target="http://127.0.0.1:9", data=str(tmp_path), out=str(tmp_path / "o"))
    t0 = time.monotonic()

    async def go():
        async with httpx.AsyncClient() as c:
            await check_target(c, s)

    with pytest.raises(TargetError, match="cannot reach"):
        asyncio.run(go())
    assert time.monotonic() - t0 < 10


def test_keyword_gated_f1():
    assert score.score("It was founded in 1642.", ["1642"], "1642") > 0
    assert score.score("I do not know.", ["1642"], "1642") == 0.0
    assert score.f1("the red bridge", "red bridge") == 1.0


def test_compare_table(tmp_path):
    from beluga.loadgen.client import Result

    for name, ttft in (("plain", 5.0), ("beluga", 0.5)):
        rs = [Result(f"r{i}", p, ok=True, ttft_s=ttft / p, tpot_s=0.1, e2e_s=1.0) for p in (1, 2) for i in range(3)]
        report.write(tmp_path / name, rs, {1: 3.0, 2: 1.0}, {"name": name}, plots=False)
    table = report.compare([tmp_path / "plain", tmp_path / "beluga"])
    assert "| beluga | 2 | 3 | 0 | 0.250 |" in table and table.count("\n") == 5
