"""The correction pipeline's logic on the scripted in-process backend (tests/fakes.py): caps,
chunking, ordering. Real models are tested in test_correct.py."""

from __future__ import annotations

import json

from conftest import cli

from metaalign_cli.correction import response_cap


def rows(out: bytes) -> list[dict]:
    return [json.loads(x) for x in out.decode().splitlines()]


def test_response_scaled_cap_hand_worked():
    # 64 + 1.5 x the response's tokens, at least 128, at most the ceiling.
    assert [response_cap(n, 1024) for n in (0, 40, 100, 300, 640, 1000)] == [128, 128, 214, 514, 1024, 1024]
    assert response_cap(300, 256) == 256 and response_cap(10, 100) == 100


def test_max_new_tokens_auto_is_per_record_and_recorded(scripted_backend):
    inp = ('{"id": "s", "query": "q", "response": "a short answer"}\n'
           '{"id": "l", "query": "q", "response": "' + "word " * 300 + '"}\n')
    r = cli("correct", "-b", "scripted", "-O", "helpful", input=inp)
    assert r.returncode == 0, r.stderr.decode()
    out = rows(r.stdout)
    # The scripted backend counts words as tokens: 3 -> 128 (the floor), 300 -> 64 + 450 = 514.
    assert [o["metaalign"]["max_new_tokens"] for o in out] == [128, 514]
    assert out[0]["metaalign"]["generation"]["max_new_tokens"] == "auto"
    assert out[0]["metaalign"]["generation"]["max_new_tokens_ceiling"] == 1024
    # The two records have different caps, so they went to the backend in two calls.
    assert len(scripted_backend.calls) == 2
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--max-new-tokens", "64", input=inp)
    out = rows(r.stdout)
    assert all("max_new_tokens" not in o["metaalign"] for o in out)
    assert out[1]["metaalign"]["generation"]["max_new_tokens"] == 64


def test_resume_refuses_to_mix_auto_and_a_fixed_cap(tmp_path, scripted_backend):
    out = tmp_path / "o.jsonl"
    inp = '{"id": 1, "query": "q", "response": "a"}\n{"id": 2, "query": "q", "response": "b"}\n'
    assert cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(out), input=inp).returncode == 0
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--max-new-tokens", "128", "--resume", "-o", str(out), input=inp)
    assert r.returncode == 2 and "generation.max_new_tokens 'auto' there, 128 now" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "-o", str(out), input=inp)
    assert r.returncode == 0 and [o["id"] for o in rows(out.read_bytes())] == [1, 2]


def test_chunks_follow_the_backend_and_output_keeps_input_order(scripted_backend):
    inp = "".join(json.dumps({"id": i, "query": "q", "response": "same length"}) + "\n" for i in range(7))
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--batch-size", "3", input=inp)
    assert r.returncode == 0 and [o["id"] for o in rows(r.stdout)] == list(range(7))
    assert [len(c) for c in scripted_backend.calls] == [3, 3, 1]
