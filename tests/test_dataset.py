"""build-data: Algorithm 1 worked out by hand, determinism, splits, input formats, bad rows.

Fast: no models (the tokenizer test loads only the SmolLM2 GGUF tokenizer and is marked slow).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from conftest import DATA, run_cli
from metaalign_cli.dataset import (BuildOptions, BuildStats, RatedPair, ReadOptions, build_data,
                                   build_dynamic_dataset, load_excluded_queries, normalize_query,
                                   parse_rating, percentiles, read_rated_pairs, relation,
                                   split_for_query, split_hh_transcripts)
from metaalign_cli.errors import InputError, UnknownNameError
from metaalign_cli.objectives import load_objectives, render_objectives
from metaalign_cli.templates import load_template

FIX = Path(__file__).parent / "fixtures" / "dataset"
UF160 = DATA / "multi-aspect" / "just-eval-ultrafeedback-160.jsonl"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
# The real data lives in ../shared/data beside the checkout (CI has it; a bare clone does not).
needs_data = pytest.mark.skipif(not UF160.exists() or not HH.exists(), reason="needs ../shared/data")
STAGES = ("warmup", "equal", "preference")


@pytest.fixture(scope="module")
def objset():
    return load_objectives(include_user=False)


@pytest.fixture(scope="module")
def uf_template():
    return load_template("ultrafeedback", kind="correction")


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_out(out: Path, splits=("train", "validation")) -> list[dict]:
    rows = []
    for sp in splits:
        for st in STAGES:
            p = out / sp / f"{st}.jsonl"
            rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    return rows


def pairs_of(paths, objset, fmt=None, **kw):
    stats = BuildStats(strict=kw.pop("strict", False))
    opts = ReadOptions(objective_set=objset, **kw)
    return list(read_rated_pairs([str(p) for p in paths], fmt, opts, stats)), stats


def build(tmp_path, inputs, objset, template, name="out", fmt=None, read=None, **kw) -> tuple[Path, BuildStats]:
    out = tmp_path / name
    opts = BuildOptions(template=template, read=ReadOptions(objective_set=objset, **(read or {})),
                        input_format=fmt, **kw)
    return out, build_data([str(p) for p in inputs], out, opts)


# ---------------------------------------------------------------------------------------------
# Algorithm 1 on the hand-worked fixture


def test_algorithm1_hand_worked_fixture(tmp_path, objset, uf_template):
    # Worked out by hand from tests/fixtures/dataset/algorithm1.jsonl (ratings y1 vs y2):
    # A (0,1): IF 5>3, honesty 3=3, truthfulness N/A (left out), helpful 4<5 -> mixed pair:
    #   pref-y1 T(qA, A1, [IF]) -> A0; pref-y2 T(qA, A0, [helpful]) -> A1; equal T(qA, A1, [honest]) -> A0.
    # B (0,1): 4>2, 4>1 -> one-sided: pref-y1 T(qB, B1, {IF, honest}) -> B0.
    # B (0,2): 4=4, 4=4 -> only an equal item T(qB, B2, {IF, honest}, equal) -> B0.
    # B (1,2): 2<4, 1<4 -> one-sided the other way: pref-y2 T(qB, B1, {IF, honest}) -> B2.
    # C: C2 is blank (empty_response, its 2 pairs dropped); C1 rates everything N/A, so
    #   (0,1) has no comparable objective -> dropped. warmup_ratio=1: every equal item is copied.
    out, stats = build(tmp_path, [FIX / "algorithm1.jsonl"], objset, uf_template, warmup_ratio=1.0,
                       validation_ratio=0.0)
    rows = read_out(out)
    got = {(r["id"], r["stage"], r["response"], r["target"], frozenset(r["objectives"]), r["variant"])
           for r in rows}
    IF, HON, HELP = "instruction_following", "honest", "helpful"
    want = {
        ("algorithm1:1:0-1:pref-y1", "preference", "A1: 9 is prime.", "A0: 7 is prime.", frozenset({IF}), "better"),
        ("algorithm1:1:0-1:pref-y2", "preference", "A0: 7 is prime.", "A1: 9 is prime.", frozenset({HELP}), "better"),
        ("algorithm1:1:0-1:equal", "equal", "A1: 9 is prime.", "A0: 7 is prime.", frozenset({HON}), "equal"),
        ("algorithm1:1:0-1:warmup", "warmup", "A1: 9 is prime.", "A1: 9 is prime.", frozenset({HON}), "equal"),
        ("algorithm1:2:0-1:pref-y1", "preference", "B1: Go away.", "B0: Hello!", frozenset({IF, HON}), "better"),
        ("algorithm1:2:0-2:equal", "equal", "B2: Hi there!", "B0: Hello!", frozenset({IF, HON}), "equal"),
        ("algorithm1:2:0-2:warmup", "warmup", "B2: Hi there!", "B2: Hi there!", frozenset({IF, HON}), "equal"),
        ("algorithm1:2:1-2:pref-y2", "preference", "B1: Go away.", "B2: Hi there!", frozenset({IF, HON}), "better"),
    }
    assert got == want
    assert len(rows) == 8
    for r in rows:
        assert r["objectives"], "never an empty objective list"
        q = {"A": "Query A: name a prime number.", "B": "Query B: say hello."}[r["query"][6]]
        assert r["query"] == q and r["split"] == "train" and r["template"] == "ultrafeedback"
        objs = [objset.get(n) for n in r["objectives"]]
        assert r["prompt"] == uf_template.render(q, r["response"], render_objectives(objs, "ultrafeedback"),
                                                 r["variant"])
    d = stats.to_dict()
    assert d["items_total"] == {"warmup": 2, "equal": 2, "preference": 4}
    assert (d["rows"], d["pairs"], d["pairs_used"]) == (3, 7, 4)
    assert d["dropped_pairs"] == {"empty_response": 2, "no_comparable_objective": 1}
    assert d["bad_records"] == {"empty_response": 1}
    assert d["bad_record_examples"]["empty_response"].endswith(
        "algorithm1.jsonl:3: field 'completions[2].response': empty text")
    assert d["unknown_ratings"] == 3  # A0 truthfulness, C1 IF and honesty (C2 is never read)
    assert d["objective_frequency"]["preference"] == {IF: 3, HON: 2, HELP: 1}
    assert d["queries"] == {"train": 2, "validation": 0}
    assert json.loads((out / "stats.json").read_text()) == d


def test_algorithm1_order_and_empty_sets(objset, uf_template):
    pair = RatedPair("q", "y1", "y2", (("harmless", ">"), ("helpful", ">"), ("humor", ">")), "p", {})
    items = list(build_dynamic_dataset([pair], objset, uf_template, seed=3, warmup_ratio=0.0))
    assert [i.stage for i in items] == ["preference"]
    assert sorted(items[0].objectives) == ["harmless", "helpful", "humor"]
    tie = RatedPair("q", "y1", "y2", (("harmless", "="),), "t", {})
    assert [i.stage for i in build_dynamic_dataset([tie], objset, uf_template, warmup_ratio=0.0)] == ["equal"]
    nothing = RatedPair("q", "y1", "y2", (), "n", {})
    assert list(build_dynamic_dataset([nothing], objset, uf_template)) == []
    with pytest.raises(UnknownNameError):
        list(build_dynamic_dataset([RatedPair("q", "a", "b", (("nonsense", ">"),), "x", {})], objset, uf_template))


def test_relation_and_scores():
    assert relation(4, 3) == ">" and relation(3, 4) == "<" and relation(4, 4) == "="
    assert relation(4.0, 4.3, 0.5) == "=" and relation(4.0, 4.6, 0.5) == "<"
    assert relation(0.3, 0.2, 0.1) == "="  # float rounding does not break a tie on the margin
    assert parse_rating("4") == 4.0 and parse_rating(3) == 3.0 and parse_rating(" 2.5 ") == 2.5
    assert parse_rating("N/A") is None and parse_rating(None) is None and parse_rating("") is None
    assert parse_rating("high") == "bad" and parse_rating(True) == "bad" and parse_rating(float("nan")) == "bad"


def test_percentiles_nearest_rank():
    assert percentiles([]) == {}
    # sorted 1..10: p50 -> 5th value, p90 -> 9th, p95 and p99 -> 10th
    assert percentiles(list(range(10, 0, -1))) == {"p50": 5, "p90": 9, "p95": 10, "p99": 10, "max": 10, "mean": 5.5}


# ---------------------------------------------------------------------------------------------
# Determinism


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@needs_data
def test_same_seed_byte_identical_other_seed_changes_only_order_and_warmup(tmp_path, objset, uf_template):
    a, _ = build(tmp_path, [UF160], objset, uf_template, name="a", seed=7, sharegpt=True)
    b, _ = build(tmp_path, [UF160], objset, uf_template, name="b", seed=7, sharegpt=True)
    assert _files(a) == _files(b)
    c, _ = build(tmp_path, [UF160], objset, uf_template, name="c", seed=8, sharegpt=True)
    ra, rc = read_out(a), read_out(c)
    strip = lambda rows, stage: [(r["id"], r["split"], r["query"], r["response"], r["target"],
                                  sorted(r["objectives"])) for r in rows if r["stage"] == stage]
    for stage in ("equal", "preference"):
        assert strip(ra, stage) == strip(rc, stage)
    assert [r["objectives"] for r in ra if len(r["objectives"]) > 1] != \
           [r["objectives"] for r in rc if len(r["objectives"]) > 1]
    wa = {r["id"] for r in ra if r["stage"] == "warmup"}
    wc = {r["id"] for r in rc if r["stage"] == "warmup"}
    assert wa != wc
    equal_ids = {r["id"].rsplit(":", 1)[0] for r in ra if r["stage"] == "equal"}
    assert {w.rsplit(":", 1)[0] for w in wa | wc} <= equal_ids  # warm-up is drawn from D_e only


# ---------------------------------------------------------------------------------------------
# Splits


@needs_data
def test_split_by_query_never_crosses(tmp_path, objset, uf_template):
    # The same query in two rows (and with different spacing) must land in one split.
    dup = [json.loads(line) for line in UF160.read_text().splitlines()[:40]]
    again = dict(dup[0], instruction="  " + dup[0]["instruction"].replace(" ", "  ") + "\n")
    f = write_jsonl(tmp_path / "dup.jsonl", dup + [again])
    out, stats = build(tmp_path, [f, UF160], objset, uf_template, validation_ratio=0.3, test_ratio=0.2)
    rows = read_out(out, ("train", "validation", "test"))
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(normalize_query(r["query"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    seen = {next(iter(s)) for s in split_of.values()}
    assert seen == {"train", "validation", "test"}
    assert sum(stats.queries.values()) == len(split_of) == 160
    assert split_for_query("a  b", 0.5, 0.0, 1) == split_for_query(" a b ", 0.5, 0.0, 1)
    assert split_for_query("x", 0.0, 0.0) == "train" and split_for_query("x", 1.0, 0.0) == "validation"


# ---------------------------------------------------------------------------------------------
# Input formats


def test_ultrafeedback_real_layout_with_na(objset):
    pairs, stats = pairs_of([FIX / "ultrafeedback-real-layout.jsonl"], objset)
    assert stats.files[0]["format"] == "ultrafeedback"
    assert len(pairs) == 1
    p = pairs[0]
    assert p.query == "Explain in one sentence why the sky is blue."
    assert p.y1.startswith("Sunlight") and p.y2.startswith("The sky is blue because")
    # honesty: N/A vs 2 and truthfulness: 5 vs N/A are unknown -> left out, not ties
    assert p.relations == (("instruction_following", "="), ("helpful", ">"))
    assert p.source["models"] == ["gpt-4", "llama-2-7b-chat"] and p.source["pair"] == [0, 1]
    assert stats.unknown_ratings == 2


@needs_data
def test_real_multi_aspect_file(objset):
    pairs, stats = pairs_of([UF160], objset)
    assert stats.rows == 160 and stats.pairs == 960 and len(pairs) == 958
    assert stats.bad_records == {"identical_responses": 2}
    rels = [r for p in pairs for _, r in p.relations]
    assert len(rels) == 958 * 4 and rels.count("=") > len(rels) // 5  # real ties


def test_scored_tie_margin_objective_map_and_filter(tmp_path, objset):
    row = {"query": "q", "responses": [
        {"text": "r0", "scores": {"safety": 4.0, "helpfulness": "0.9", "humor": None}},
        {"text": "r1", "scores": {"safety": 4.3, "helpfulness": 0.2, "humor": 1}},
        {"text": "r2", "scores": {"safety": 1, "helpfulness": "N/A"}}]}
    f = write_jsonl(tmp_path / "s.jsonl", [row])
    pairs, stats = pairs_of([f], objset, objective_map={"safety": "harmless"}, tie_margin=0.5)
    assert stats.files[0]["format"] == "scored"
    assert [(p.y1, p.y2, p.relations) for p in pairs] == [
        ("r0", "r1", (("harmless", "="), ("helpful", ">"))),
        ("r0", "r2", (("harmless", ">"),)),
        ("r1", "r2", (("harmless", ">"),))]
    assert stats.unknown_ratings == 2
    pairs, _ = pairs_of([f], objset, objective_map={"safety": "harmless"}, tie_margin=0.0,
                        objectives=[objset.get("helpful")])
    assert [p.relations for p in pairs] == [(("helpful", ">"),)]
    # 'safety' is no objective: without a map the row is a bad record; --strict stops there.
    pairs, stats = pairs_of([f], objset)
    assert pairs == [] and stats.bad_records == {"unknown_objective": 1}
    assert stats.examples["unknown_objective"].startswith(f"{f}:1: unknown objective 'safety'")
    assert "--objective-map safety=OBJECTIVE" in stats.examples["unknown_objective"]
    with pytest.raises(UnknownNameError, match=f"{f}:1: unknown objective 'safety'"):
        pairs_of([f], objset, strict=True)


def test_pairwise_labels_objectives_csv_and_json(tmp_path, objset):
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad",
             "labels": {"harmless": "chosen", "helpfulness": "rejected", "humor": "equal", "honest": "N/A"}},
            {"prompt": "p2", "chosen": "ok", "rejected": "meh"}]
    f = write_jsonl(tmp_path / "pw.jsonl", rows)
    pairs, stats = pairs_of([f], objset, objectives=None)
    assert stats.files[0]["format"] == "pairwise"
    assert pairs[0].relations == (("harmless", ">"), ("helpful", "<"), ("humor", "="))
    assert len(pairs) == 1 and stats.bad_records == {"missing_field": 1}  # p2: no labels, no --objectives
    pairs, _ = pairs_of([f], objset, objectives=objset.resolve("harmless,helpful"))
    assert pairs[1].relations == (("harmless", ">"), ("helpful", ">"))
    assert pairs[0].relations == (("harmless", ">"), ("helpful", "<"))  # labels filtered to --objectives
    # CSV and .json array and .jsonl.gz carry the same rows
    c = tmp_path / "pw.csv"
    with open(c, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "chosen", "rejected"])
        w.writerow(["multi\nline q", "yes", "no"])
    j = tmp_path / "pw.json"
    j.write_text(json.dumps([{"query": "jq", "chosen": "a", "rejected": "b"}]))
    g = tmp_path / "pw.jsonl.gz"
    with gzip.open(g, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"query": "gq", "chosen": "c", "rejected": "d"}) + "\n")
    pairs, stats = pairs_of([c, j, g], objset, objectives=[objset.get("harmless")])
    assert [(p.query, p.y1, p.y2, p.source["line"]) for p in pairs] == [
        ("multi\nline q", "yes", "no", 2), ("jq", "a", "b", 1), ("gq", "c", "d", 1)]
    assert [f["format"] for f in stats.files] == ["pairwise"] * 3


def test_hh_rlhf_transcripts(tmp_path, objset):
    ctx = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I am locked out.\n\nAssistant:"
    assert split_hh_transcripts(ctx + " I can't help with that.", ctx + " I can explain: take a pin") == \
        (ctx, "I can't help with that.", "I can explain: take a pin")
    # replies that diverge before the final assistant turn are not one shared context
    assert split_hh_transcripts("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                                "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d") is None
    f = write_jsonl(tmp_path / "harmless-base.jsonl", [
        {"chosen": ctx + " I can't help with that.", "rejected": ctx + " I can explain: take a pin"},
        {"chosen": ctx + " Call a locksmith.", "rejected": ctx + "   "}])
    pairs, stats = pairs_of([f], objset)
    assert stats.files[0]["format"] == "hh-rlhf"
    assert [(p.query, p.y1, p.y2, p.relations) for p in pairs] == [
        (ctx, "I can't help with that.", "I can explain: take a pin", (("harmless", ">"),))]
    assert stats.bad_records == {"empty_response": 1}


@needs_data
def test_hh_rlhf_real_file_with_test_queries_excluded(objset):
    exclude = load_excluded_queries([str(DATA / "metaaligner-samples" / "hh-rlhf" / "*.csv")])
    assert len(exclude) == 1200
    pairs, stats = pairs_of([HH], objset, exclude=exclude)
    assert stats.rows == 2312 and stats.excluded_rows == 1200
    assert not any(normalize_query(p.query) in exclude for p in pairs)
    assert len(pairs) == 1112 and stats.bad_records == {}
    assert all(p.query.endswith("\n\nAssistant:") and p.y1 == p.y1.strip() for p in pairs)


# ---------------------------------------------------------------------------------------------
# Bad rows


def test_each_bad_row_reason_counted(tmp_path, objset):
    pw = write_jsonl(tmp_path / "bad.jsonl", [
        {"query": "q1", "chosen": "a", "rejected": "b"},
        '{"query": "q2", "chosen": "a",',                       # invalid_json
        {"query": "q3", "chosen": "a"},                          # missing_field: rejected
        {"query": "q4", "chosen": "", "rejected": "b"},          # empty_response
        {"query": "q5", "chosen": "same", "rejected": "same "},  # identical_responses
        {"query": "q6", "chosen": ["a"], "rejected": "b"},       # bad_value
    ])
    sc = write_jsonl(tmp_path / "bad-scored.jsonl", [
        {"query": "q7", "responses": [{"text": "x", "scores": {"harmless": "very"}},
                                      {"text": "y", "scores": {"harmless": 2}}]},  # non_numeric_score
        {"query": "q8", "responses": [{"text": "alone", "scores": {"harmless": 2}}]}])  # missing_field
    pairs, stats = pairs_of([pw, sc], objset, objectives=[objset.get("harmless")])
    assert len(pairs) == 1
    assert dict(stats.bad_records) == {"invalid_json": 1, "missing_field": 2, "empty_response": 1,
                                       "identical_responses": 1, "bad_value": 1, "non_numeric_score": 1}
    assert stats.examples["missing_field"] == f"{pw}:3: field 'rejected': missing"
    assert stats.examples["non_numeric_score"] == \
        f"{sc}:1: field 'responses[0].scores.harmless': not a number: 'very'"
    assert stats.examples["invalid_json"].startswith(f"{pw}:2: invalid JSON")
    assert stats.examples["identical_responses"] == f"{pw}:5: field 'rejected': same text as 'chosen'"
    assert stats.examples["empty_response"] == f"{pw}:4: field 'chosen': empty text"
    # q7's only pair lost its only objective: dropped, reported; every pair is accounted for
    assert dict(stats.dropped_pairs) == {"missing_field": 1, "empty_response": 1, "identical_responses": 1,
                                         "bad_value": 1, "no_comparable_objective": 1}
    assert stats.pairs == stats.pairs_used + sum(stats.dropped_pairs.values()) == 6
    with pytest.raises(InputError, match=r"bad\.jsonl:2: invalid JSON"):
        pairs_of([pw], objset, objectives=[objset.get("harmless")], strict=True)


def test_cli_strict_one_line_error_exit_2(tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [{"query": "q1", "chosen": "a", "rejected": "b"},
                                            {"query": "q2", "chosen": "a"}])
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o"), "-O", "harmless", "--strict")
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert err == f"error: {f}:2: field 'rejected': missing"
    # without --strict it builds, reports the row and exits 0
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o2"), "-O", "harmless", "--validation-ratio", "0")
    assert r.returncode == 0, r.stderr.decode()
    assert "missing_field" in r.stderr.decode()
    stats = json.loads((tmp_path / "o2" / "stats.json").read_text())
    assert stats["bad_records"] == {"missing_field": 1} and stats["items_total"]["preference"] == 1
    assert "train split is empty" not in r.stderr.decode()
    # Every query held out (--validation-ratio 1): built, with a warning that train has nothing.
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "held"), "-O", "harmless", "--validation-ratio", "1")
    assert r.returncode == 0 and "warning: the train split is empty: every query went to validation or test " \
        "(--validation-ratio 1.0, --test-ratio 0.0)" in r.stderr.decode(), r.stderr.decode()
    # the failed --strict build left nothing behind: the same command runs again, no --overwrite
    assert not (tmp_path / "o").exists()
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "new" / "deep" / "o"), "-O", "harmless", "--strict")
    assert r.returncode == 2 and not (tmp_path / "new").exists()  # the parents it made went too
    keep = tmp_path / "o3" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    r = run_cli("build-data", str(f), "-o", str(keep.parent), "-O", "harmless", "--strict", "--format", "pairwise,sharegpt")
    assert r.returncode == 2 and sorted(p.name for p in keep.parent.rglob("*")) == ["notes.txt"]
    # a failed --overwrite keeps the earlier build whole; an empty build writes nothing
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o2").rglob("*") if p.is_file()}
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o2"), "-O", "harmless", "--strict", "--overwrite")
    assert r.returncode == 2
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o2").rglob("*") if p.is_file()} == before
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q2", "chosen": "a"}])
    r = run_cli("build-data", str(bad), "-o", str(tmp_path / "o2"), "-O", "harmless", "--overwrite", "--format", "pairwise")
    assert r.returncode == 1 and f"nothing was written to {tmp_path / 'o2'}" in r.stderr.decode()
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o2").rglob("*") if p.is_file()} == before
    # --overwrite that succeeds replaces the earlier files (a test split it no longer has goes)
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o4"), "-O", "harmless", "--test-ratio", "0.5")
    assert r.returncode == 0 and (tmp_path / "o4" / "test").is_dir()
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o4"), "-O", "harmless", "--overwrite")
    assert r.returncode == 0 and not (tmp_path / "o4" / "test").exists()
    assert sorted(p.name for p in (tmp_path / "o4").iterdir()) == ["stats.json", "train", "validation"]


def test_killed_build_leaves_nothing(tmp_path):
    """SIGTERM in the middle of a build (like Ctrl-C) removes the half-built dataset."""
    import signal
    import subprocess
    import sys
    import time

    f = write_jsonl(tmp_path / "big.jsonl", ({"query": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                              for i in range(100_000)))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "metaalign_cli", "build-data", str(f), "-o", str(out), "-O",
                             "harmless", "-q"], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".building-*/train/*.jsonl")):
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not out.exists()


def test_unknown_objective_in_a_row_is_a_bad_record(tmp_path):
    """A label naming no known objective drops that row (counted, with the first message),
    the other rows build; --strict stops there with exit 2."""
    f = write_jsonl(tmp_path / "in.jsonl", [
        {"query": "q1", "chosen": "a", "rejected": "b", "labels": {"harmless": "chosen"}},
        {"query": "q2", "chosen": "a", "rejected": "b", "labels": {"harmles": "chosen", "helpful": "equal"}}])
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o"), "--validation-ratio", "0")
    assert r.returncode == 0, r.stderr.decode()
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["bad_records"] == {"unknown_objective": 1}
    assert stats["items_total"]["preference"] == 1 and stats["items_total"]["equal"] == 0
    assert stats["bad_record_examples"]["unknown_objective"].startswith(
        f"{f}:2: unknown objective 'harmles'; did you mean harmless")
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o2"), "--strict")
    assert r.returncode == 2 and f"error: {f}:2: unknown objective 'harmles'" in r.stderr.decode()


def test_cli_end_to_end_sharegpt_exclusion_and_errors(tmp_path):
    rows = [{"query": "Keep me", "chosen": "yes", "rejected": "no"},
            {"query": "Test   query\n", "chosen": "a", "rejected": "b"}]
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    ex = tmp_path / "test.csv"
    ex.write_text("query,goldens\n Test query,x\n", encoding="utf-8")
    out = tmp_path / "o"
    r = run_cli("build-data", str(f), "-o", str(out), "-f", "pairwise,sharegpt", "-O", "helpfulness,harmless",
                "--exclude-queries", str(ex), "--validation-ratio", "0", "--seed", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""  # data goes to files, the summary to stderr
    pref = [json.loads(x) for x in (out / "train" / "preference.jsonl").read_text().splitlines()]
    assert [(p["query"], p["response"], p["target"], sorted(p["objectives"])) for p in pref] == [
        ("Keep me", "no", "yes", ["harmless", "helpful"])]
    share = json.loads((out / "train" / "preference.sharegpt.json").read_text())
    assert share == [{"id": pref[0]["id"], "conversations": [{"from": "human", "value": pref[0]["prompt"]},
                                                             {"from": "gpt", "value": "yes"}]}]
    assert json.loads((out / "train" / "equal.sharegpt.json").read_text()) == []
    stats = json.loads((out / "stats.json").read_text())
    assert stats["excluded"] == {"rows": 1, "queries": 1}
    assert stats["dropped_pairs"] == {"excluded_query": 1}
    # an earlier build is not overwritten silently; unknown objectives fail as in `correct`
    r = run_cli("build-data", str(f), "-o", str(out), "-O", "harmless")
    assert r.returncode == 2 and b"--overwrite" in r.stderr
    r = run_cli("build-data", str(f), "-o", str(tmp_path / "o3"), "-O", "harmles")
    assert r.returncode == 2 and b"unknown objective 'harmles'" in r.stderr and b"harmless" in r.stderr


@pytest.mark.slow
def test_token_length_percentiles_with_gguf_tokenizer(tmp_path, smollm2_gguf, objset, uf_template):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from metaalign_cli.dataset import load_token_counter

    count = load_token_counter(str(smollm2_gguf))
    f = write_jsonl(tmp_path / "t.jsonl", [{"query": "Say hi.", "chosen": "Hello there!", "rejected": "No."}])
    out, stats = build(tmp_path, [f], objset, uf_template, read={"objectives": [objset.get("harmless")]},
                       count_tokens=count, validation_ratio=0.0)
    row = read_out(out)[0]
    n_prompt, n_target = count([row["prompt"]])[0], count(["Hello there!"])[0]
    assert 0 < n_target < 10 < n_prompt
    assert stats.token_lengths["preference"]["prompt"]["max"] == n_prompt
    assert stats.token_lengths["preference"]["total"]["p50"] == n_prompt + n_target


def test_no_items_says_why_even_with_quiet(tmp_path):
    """Tenth new-user trial: with -q (or an input of whitespace) "no items were built (see the
    bad records and dropped pairs above)" pointed at lines that were not printed."""
    ws = tmp_path / "ws.jsonl"
    ws.write_text("  \n\n")
    r = run_cli("build-data", str(ws), "-o", str(tmp_path / "a"), "-O", "harmless", "-q")
    assert r.returncode == 1 and r.stderr.decode().strip() == \
        f"error: no items were built (the input holds no rows); nothing was written to {tmp_path / 'a'}"
    one = tmp_path / "one.jsonl"
    one.write_text('{"query": "q", "responses": ["a"]}\n')
    r = run_cli("build-data", str(one), "-o", str(tmp_path / "b"), "-O", "harmless", "-q")
    assert r.returncode == 1 and r.stderr.decode().strip() == \
        f"error: no items were built (1 bad record(s), 0 dropped pair(s): rerun without -q for the reasons); " \
        f"nothing was written to {tmp_path / 'b'}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inputs_with_one_name_get_distinct_ids_and_a_file_twice_or_in_the_output_is_refused(tmp_path, objset):
    """Item ids start with the input's name; inputs that share it (a/data.jsonl, b/data.jsonl)
    are told apart by their folders, so no two items share an id. One file given twice (its rows
    read twice) and an input that is a file of the output's build (which --overwrite would
    replace) are refused, one line, exit 2, nothing written."""
    row = {"prompt": "p1", "chosen": "good", "rejected": "bad", "labels": {"harmless": "chosen"}}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a, b, c = (write_jsonl(tmp_path / f, [row]) for f in ("a/data.jsonl", "b/data.jsonl", "c.jsonl"))
    pairs, _ = pairs_of([a, b, c], objset)
    assert [p.pair_id for p in pairs] == ["a/data:1", "b/data:1", "c:1"]
    with pytest.raises(InputError, match=r"data.jsonl: given twice as an input"):
        pairs_of([a, tmp_path / "a" / ".." / "a" / "data.jsonl"], objset)
    out = tmp_path / "out"
    r = run_cli("build-data", str(a), str(b), "-o", str(out), "-O", "harmless")
    assert r.returncode == 0, r.stderr.decode()
    ids = [json.loads(x)["id"] for f in out.glob("*/*.jsonl") for x in f.read_text().splitlines()]
    assert ids and len(ids) == len(set(ids))
    r = run_cli("build-data", str(a), str(a), "-o", str(tmp_path / "o2"), "-O", "harmless")
    assert r.returncode == 2 and "given twice as an input" in r.stderr.decode() and not (tmp_path / "o2").exists()
    built = next(out.glob("*/preference.jsonl"))
    before = built.read_bytes()
    r = run_cli("build-data", str(built), "-o", str(out), "-O", "harmless", "--overwrite")
    assert r.returncode == 2 and f"{built}: is an input, and the build in {out} writes" in r.stderr.decode()
    assert built.read_bytes() == before and "Traceback" not in r.stderr.decode()


def test_ctrl_c_says_nothing_was_written(tmp_path):
    """Ctrl-C during a build: exit 130 and a line saying the output was left as it was (a build
    is moved into place whole), as `correct` and `judge` say they were interrupted."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    big = tmp_path / "big.jsonl"
    row = {"prompt": "p", "chosen": "good answer here", "rejected": "bad", "labels": {"harmless": "chosen"}}
    big.write_text("".join(json.dumps(dict(row, prompt=f"p{i}")) + "\n" for i in range(200000)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "metaalign_cli", "build-data", str(big), "-o", str(out),
                             "-O", "harmless"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted; nothing was written to {out}" in err and "Traceback" not in err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
