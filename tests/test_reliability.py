"""Issue 14 (reliability, round 3): what a fault trial and a first-hour trial broke, one test
(or more) per item, each asserting the value that was wrong. Servers are real HTTP servers
on 127.0.0.1 (tests/fault_server.py); processes are real where the item needs one (a pty
as stdin, /dev/full as stdout, a file-size limit standing in for a full disk)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_cli
from fault_server import FaultServer, prefer_marker


def rows_of(data: bytes | str) -> list[dict]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def judge_records(n: int = 3, tag: str = "ok") -> list[dict]:
    return [{"id": f"r{i}", "query": f"Question {i} ({tag if i == 1 else 'ok'})?", "golden": f"FINE golden {i}",
             "response": f"weak answer {i}", "corrected": f"GOOD corrected answer {i}"} for i in range(n)]


def judge_args(src: Path, url: str, *extra: str) -> tuple[str, ...]:
    return ("judge", str(src), "-O", "harmless", "--base-url", url, "-m", "fake-judge", "--timeout", "2",
            "--api-retries", "0", "--retries", "0", "--concurrency", "2", "--quiet", *extra)


def correct_records(n: int = 3) -> str:
    return "".join(json.dumps({"id": i, "query": f"Question {i}?", "response": f"answer {i}"}) + "\n"
                   for i in range(n))


def one_line_error(stderr: bytes) -> str:
    """The error line of a run that failed cleanly: exactly one non-empty stderr line, no traceback."""
    text = stderr.decode("utf-8")
    assert "Traceback" not in text, text
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


# ------------------------------------------------------------------ 1. the judge cache and the server

def test_judge_cache_does_not_answer_for_another_server(tmp_path):
    """Item 1: judging against server A, then the same file against B with the same --cache,
    asks B every question and records B's verdicts; a server that answers only 401 does not
    "succeed" from A's cache."""
    src = write_jsonl(tmp_path / "in.jsonl", judge_records())
    cache = tmp_path / "judge.sqlite"
    with FaultServer(prefer_marker) as a:
        r = run_cli(*judge_args(src, a.url, "--cache", str(cache)))
        assert r.returncode == 0, r.stderr.decode()
        assert a.requests == 6
    assert [x["outcome"] for x in rows_of(r.stdout)] == ["loss", "win"] * 3
    with FaultServer(lambda p: "0") as b:  # B calls everything a tie
        r = run_cli(*judge_args(src, b.url, "--cache", str(cache)))
        assert r.returncode == 0, r.stderr.decode()
        assert b.requests == 6  # 0 before: every answer came from A's cache
    rows = rows_of(r.stdout)
    assert [x["outcome"] for x in rows] == ["tie"] * 6
    assert {x["judge"]["base_url"] for x in rows} == {b.url}
    assert not any(j["cached"] for x in rows for j in x["judgments"])
    with FaultServer(lambda p: "1", lambda p, n: "401") as denied:
        r = run_cli(*judge_args(src, denied.url, "--cache", str(cache)))
        assert denied.requests == 6
    assert r.returncode == 1
    rows = rows_of(r.stdout)
    assert all(x["outcome"] == "invalid" and "AuthenticationError" in x["invalid_reason"] for x in rows)


# ------------------------------------------------------------------ 2. credentials in --base-url

SECRET, QSECRET = "sk-CANARY-password-1234", "sk-CANARY-query-5678"


def _secret_free(*blobs: bytes | str) -> None:
    for b in blobs:
        text = b.decode("utf-8", "replace") if isinstance(b, bytes) else b
        assert SECRET not in text and QSECRET not in text, text[:2000]


def test_credentials_in_base_url_are_never_recorded(tmp_path):
    """Item 2: a password in the URL's userinfo and an ``?api-key=`` query value appear in no
    corrected record, judge row, summary file or error message; the URL is recorded with
    them masked."""
    with FaultServer(lambda p: "1") as srv:
        port = srv.url.split(":")[2].split("/")[0]
        url = f"http://user:{SECRET}@127.0.0.1:{port}/v1"
        r = run_cli("correct", "-O", "helpful", "--base-url", url, "-m", "fake-judge", "--timeout", "2", "--api-retries", "0",
                    "-q", input=correct_records(2))
        assert r.returncode == 0, r.stderr.decode()
        out = rows_of(r.stdout)
        assert [o["corrected"] for o in out] == ["1", "1"]
        assert {o["metaalign"]["base_url"] for o in out} == {f"http://127.0.0.1:{port}/v1"}
        _secret_free(r.stdout, r.stderr)

        src = write_jsonl(tmp_path / "in.jsonl", judge_records(2))
        summary = tmp_path / "summary.json"
        r = run_cli(*judge_args(src, url, "--no-cache", "--summary", str(summary)))
        assert r.returncode == 0, r.stderr.decode()
        rows = rows_of(r.stdout)
        assert len(rows) == 4 and {x["judge"]["base_url"] for x in rows} == {f"http://127.0.0.1:{port}/v1"}
        assert json.loads(summary.read_text())["judge"]["base_url"] == f"http://127.0.0.1:{port}/v1"
        _secret_free(r.stdout, r.stderr, summary.read_text())

    # A query-string key, to a server that is down: the errors and kept records are clean too.
    dead = f"http://user:{SECRET}@127.0.0.1:{free_port()}/v1?api-key={QSECRET}&model=x"
    r = run_cli("correct", "-O", "helpful", "--base-url", dead, "-m", "fake-judge", "--timeout", "1", "--api-retries", "0",
                "--on-error", "keep", "-q", input=correct_records(1))
    assert r.returncode == 1
    kept = rows_of(r.stdout)[0]
    assert "generation failed" in kept["error"]
    assert kept["metaalign"]["base_url"].endswith("/v1?api-key=REDACTED&model=x")
    _secret_free(r.stdout, r.stderr)
    r = run_cli("correct", "-O", "helpful", "--base-url", dead, "--timeout", "1", "--api-retries", "0",
                input=correct_records(1))  # no -m: the model list is asked for, and fails
    assert r.returncode == 2
    using, err = r.stderr.decode().splitlines()
    assert using == f"using the first model http://127.0.0.1:{dead.split(':')[3].split('/')[0]}/v1" \
                    "?api-key=REDACTED&model=x lists"  # (it said "the embedded demo model")
    assert err.startswith("error: http://127.0.0.1:") and "cannot list models" in err
    _secret_free(r.stdout, r.stderr)


# ------------------------------------------------------------------ 3. --resume and another server

def test_resume_refuses_another_server(tmp_path):
    """Item 3: resuming a `correct` or `judge` output against another --base-url (same model
    name) exits 2 naming base_url, and leaves the file as it was."""
    src = write_jsonl(tmp_path / "judge-in.jsonl", judge_records(2))
    with FaultServer(lambda p: "1") as a, FaultServer(lambda p: "2") as b:
        out = tmp_path / "corrected.jsonl"
        first = ["correct", "-O", "helpful", "-m", "fake-judge", "--api-retries", "0", "-q", "-o", str(out)]
        inp = tmp_path / "in.jsonl"
        inp.write_text(correct_records(3), encoding="utf-8")
        one = tmp_path / "one.jsonl"
        one.write_text(correct_records(1), encoding="utf-8")
        assert run_cli(*first, "--base-url", a.url, str(one)).returncode == 0
        before = out.read_bytes()
        r = run_cli(*first, "--base-url", b.url, "--resume", str(inp))
        assert r.returncode == 2
        assert f"base_url '{a.url}' there, '{b.url}' now" in one_line_error(r.stderr)
        assert out.read_bytes() == before and b.requests == 0
        assert run_cli(*first, "--base-url", a.url, "--resume", str(inp)).returncode == 0
        assert [o["corrected"] for o in rows_of(out.read_bytes())] == ["1", "1", "1"]

        jout = tmp_path / "judged.jsonl"
        assert run_cli(*judge_args(src, a.url, "--no-cache", "-o", str(jout))).returncode == 0
        before = jout.read_bytes()
        r = run_cli(*judge_args(src, b.url, "--no-cache", "-o", str(jout), "--resume"))
        assert r.returncode == 2
        assert f"base_url '{a.url}' there, '{b.url}' now" in one_line_error(r.stderr)
        assert jout.read_bytes() == before and b.requests == 0


# ------------------------------------------------------------------ 4. judge --resume and failed calls

def test_judge_resume_asks_failed_calls_again_in_plan_order(tmp_path):
    """Item 4: rows whose judge call failed (server answering 500) are asked again by
    --resume once the server is back; the file ends in plan order and equals a run that
    never failed. Unparsable answers are not re-asked."""
    src = write_jsonl(tmp_path / "in.jsonl", judge_records(4, tag="flaky") + [
        {"id": "r9", "query": "Garbage?", "golden": "FINE", "response": "weak", "corrected": "GOOD garbage"}])
    down = {"flag": True}

    def fault(prompt, n):
        return "500" if down["flag"] and "flaky" in prompt else None

    def answer(prompt):
        return "Response 1 is better" if "garbage" in prompt else prefer_marker(prompt)

    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    with FaultServer(answer, fault) as srv:
        args = judge_args(src, srv.url, "--no-cache", "--max-invalid", "1")
        r = run_cli(*args, "-o", str(out))
        assert r.returncode == 0
        rows = rows_of(out.read_bytes())
        failed = [(x["record_id"], x["candidate"]) for x in rows if "judge call failed" in (x["invalid_reason"] or "")]
        assert failed == [("r1", "response"), ("r1", "corrected")]
        down["flag"] = False
        before = srv.requests
        r = run_cli(*args, "-o", str(out), "--resume")
        assert r.returncode == 0, r.stderr.decode()
        assert srv.requests - before == 2  # the two failed calls only (not the unparsable r9)
        r = run_cli(*args, "-o", str(ref))
    got, want = rows_of(out.read_bytes()), rows_of(ref.read_bytes())
    key = lambda x: (x["record_id"], x["candidate"], x["outcome"], x["invalid_reason"])  # noqa: E731
    assert [key(x) for x in got] == [key(x) for x in want]
    assert [(x["record_id"], x["outcome"]) for x in got if x["record_id"] == "r1"] == [("r1", "loss"), ("r1", "win")]
    assert got[-1]["outcome"] == "invalid" and "characters of text" in got[-1]["invalid_reason"]


# ------------------------------------------------------------------ 6. null text from a server

@pytest.mark.parametrize("fmt", ["raw", "chat"])  # the completions endpoint, the chat endpoint
def test_null_text_from_the_server_fails_that_record(fmt):
    """Item 6: ``"text": null`` (completions) or ``"content": null`` (chat) fails that record
    as a generation failure: --on-error keep writes it with an error and the others
    corrected (exit 1); the default stops there with the records before it written (exit 1)."""
    data = correct_records(3).replace("Question 1?", "Question 1 NULL?")
    with FaultServer(lambda p: None if "NULL" in p else "fixed") as srv:
        args = ("correct", "-O", "helpful", "--base-url", srv.url, "-m", "fake-judge", "--prompt-format", fmt,
                "--retries", "0", "--concurrency", "1", "-q")
        r = run_cli(*args, "--on-error", "keep", input=data)
        assert r.returncode == 1, r.stderr.decode()
        out = rows_of(r.stdout)
        assert [o.get("corrected") for o in out] == ["fixed", None, "fixed"]
        assert out[1]["error"] == "<stdin>:2: generation failed: the server answered null text (model fake-judge)"
        assert "Traceback" not in r.stderr.decode()
        r = run_cli(*args, input=data)
        assert r.returncode == 1
        assert [o["corrected"] for o in rows_of(r.stdout)] == ["fixed"]
        assert one_line_error(r.stderr) == "error: <stdin>:2: generation failed: the server answered null text (model fake-judge)"
        assert set(srv.paths) == {"/v1/chat/completions" if fmt == "chat" else "/v1/completions"}


# ------------------------------------------------------------------ 7. judge on a full disk

def _judge_process(args, stdout, fsize: int | None = None):
    def limit():
        if fsize is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "metaalign_cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          cwd=REPO, preexec_fn=limit, timeout=300)


def test_judge_on_a_full_disk_is_one_line_exit_2(tmp_path):
    """Item 7: `judge > /dev/full`, `-o` on a full device (a symlink to /dev/full), and a
    cache or output file that cannot grow (a file-size limit, RLIMIT_FSIZE, standing in for a
    small full filesystem: SQLite's "disk I/O error" and the output's "File too large") each
    stop with one error line and exit 2 (not 1, the "too many invalid" code); the rows
    written before it are whole, and --resume completes the file."""
    src = write_jsonl(tmp_path / "in.jsonl", judge_records(30))
    with FaultServer(prefer_marker) as srv:
        with open("/dev/full", "wb") as full:
            p = _judge_process(judge_args(src, srv.url, "--no-cache"), full)
        assert p.returncode == 2
        assert one_line_error(p.stderr).startswith("error: <stdout>: cannot write output: No space left on device")

        link = tmp_path / "full.jsonl"
        link.symlink_to("/dev/full")
        r = run_cli(*judge_args(src, srv.url, "--no-cache", "-o", str(link)))
        assert r.returncode == 2
        assert one_line_error(r.stderr).startswith(f"error: {link}: cannot write output: No space left on device")

        cache = tmp_path / "judge.sqlite"
        p = _judge_process(judge_args(src, srv.url, "--cache", str(cache)), subprocess.PIPE, fsize=48 * 1024)
        assert p.returncode == 2
        msg = one_line_error(p.stderr)
        assert msg.startswith(f"error: {cache}: cannot write the judge cache: ") and "--no-cache" in msg
        assert all(x["outcome"] in ("win", "loss") for x in rows_of(p.stdout))  # whole rows before it

        out = tmp_path / "out.jsonl"
        p = _judge_process(judge_args(src, srv.url, "--no-cache", "-o", str(out)), subprocess.PIPE, fsize=16 * 1024)
        assert p.returncode == 2
        assert one_line_error(p.stderr).startswith(f"error: {out}: cannot write output: File too large")
        assert 0 < out.stat().st_size <= 16 * 1024
        r = run_cli(*judge_args(src, srv.url, "--no-cache", "-o", str(out), "--resume"))
        assert r.returncode == 0, r.stderr.decode()
    rows = rows_of(out.read_bytes())
    assert [(x["record_id"], x["candidate"]) for x in rows] == [(f"r{i}", c) for i in range(30)
                                                               for c in ("response", "corrected")]


# ------------------------------------------------------------------ 8. build-data to an unwritable place

def test_build_data_to_an_unwritable_place_is_one_line(tmp_path):
    """Item 8: `build-data ... -o /proc/x` (a place nothing can be created in) is one error
    line and exit 2, not a FileNotFoundError traceback."""
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)])
    for out in ("/proc/x", "/proc/x/y"):
        r = run_cli("build-data", str(src), "--format", "pairwise", "-O", "harmless", "-o", out, "-q")
        assert r.returncode == 2, r.stderr.decode()
        assert one_line_error(r.stderr).startswith(f"error: {out}")
        assert not Path(out).exists()


# ------------------------------------------------------------------ 11. stdin, empty input, -o directories

def test_terminal_stdin_says_it_is_reading(tmp_path):
    """Item 11: with a terminal as stdin and no input file, `correct` and `judge --dry-run`
    say at once that they read standard input (before, they waited silently)."""
    import pty
    import select

    for args, what in ((["correct", "-O", "helpful"], "reading records from standard input"),
                       (["judge", "--dry-run", "-O", "harmless"], "reading records to judge from standard input")):
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "metaalign_cli", *args], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        os.close(slave)
        try:
            got = b""
            deadline = time.time() + 60
            while what.encode() not in got and time.time() < deadline:
                ready, _, _ = select.select([proc.stderr], [], [], 1)
                if ready:
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        break
                    got += chunk
            assert what.encode() in got, got
            assert proc.poll() is None  # and it waits for the input
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            os.close(master)


def test_empty_input_warns_and_failed_runs_create_no_directories(tmp_path):
    """Item 11: empty input exits 0 with a warning; `-o` into missing directories creates
    them only when writing starts, so a run that fails on its input leaves nothing behind."""
    r = run_cli("correct", "-O", "helpful", "-b", "scripted", input="")
    assert r.returncode == 0 and r.stdout == b""
    assert "warning: <stdin>: no records to correct" in r.stderr.decode()
    # nothing to correct: the model is not loaded (this one would fail to), and -o still exists
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    empty_out = tmp_path / "empty.jsonl"
    r = run_cli("correct", "-O", "helpful", "--model", str(junk), "-o", str(empty_out), input="")
    assert r.returncode == 0 and empty_out.read_bytes() == b"", r.stderr.decode()
    assert "no records to correct" in r.stderr.decode() and "error" not in r.stderr.decode()
    assert "using" not in r.stderr.decode()  # no model is named, as none is used
    out = tmp_path / "new" / "dir" / "out.jsonl"
    r = run_cli("correct", "-O", "helpful", "-b", "scripted", "-o", str(out), input='{"query": "q"}\n')
    assert r.returncode == 2 and "missing response" in one_line_error(r.stderr)
    assert not (tmp_path / "new").exists()
    r = run_cli("judge", "-O", "harmless", "-b", "scripted", "-o", str(out), input='{"query": "q"}\n')
    assert r.returncode == 2 and not (tmp_path / "new").exists()
    r = run_cli("correct", "-O", "helpful", "-b", "scripted", "-o", str(out), input=correct_records(1))
    assert r.returncode == 0 and len(rows_of(out.read_bytes())) == 1


# ------------------------------------------------------------------ 12. --help at 80 columns

COMMANDS = ["", "objectives", "correct", "build-data", "train", "export", "judge"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns(command):
    """Item 12: every --help at 80 columns: no line over 80, no text cut with an ellipsis,
    no Python-type placeholders (``<str>``, ``<list[Path]>``, ``<bool>``), every option
    described."""
    from typer.main import get_command

    from metaalign_cli.cli import app

    args = [command, "--help"] if command else ["--help"]
    r = run_cli(*args, env={"COLUMNS": "80", "LINES": "40"})
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode("utf-8")
    lines = text.splitlines()
    assert len(lines) > 8
    assert max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]
    assert "\u2026" not in text
    body = [x for x in lines if not x.startswith("Usage:")]  # "[ARGS]..." is click's repeat mark
    assert not [x for x in body if "..." in x], [x for x in body if "..." in x]
    assert not re.search(r"<[a-z][\w\[\], ]*>", text), re.findall(r"<[a-z][\w\[\], ]*>", text)
    group = get_command(app)
    cmd = group.commands[command] if command else group
    import click

    ctx = click.Context(cmd, info_name=command or "metaalign")
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"{command} {param.opts} has no description"
            if not param.is_flag:
                shown = param.get_help_record(ctx)[0]
                assert re.search(r" [A-Z][A-Z0-9_.=]*$", shown), f"{command}: {shown!r} has no plain placeholder"


# ------------------------------------------------------------------ 14. timeouts and retries

def test_stalled_server_costs_timeout_times_attempts():
    """Item 14: `correct --timeout 1 --retries 1` against a server that never answers in
    time gives up after 2 requests of ~1 s each (plus the client's short backoff), not the
    client defaults' 120 s x 5; `--api-retries` is the same knob (the name `judge` uses)."""
    with FaultServer(lambda p: "late", lambda p, n: "slow", slow_s=20) as srv:
        for flag in ("--retries", "--api-retries"):
            before = srv.requests
            t0 = time.monotonic()
            r = run_cli("correct", "-O", "helpful", "--base-url", srv.url, "-m", "fake-judge", "--timeout", "1", flag, "1",
                        "--on-error", "keep", "-q", input=correct_records(1))
            took = time.monotonic() - t0
            assert r.returncode == 1
            assert "generation failed: APITimeoutError" in rows_of(r.stdout)[0]["error"]
            deadline = time.monotonic() + 5
            while srv.requests - before < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert srv.requests - before == 2  # 1 + 1 retry
            assert 2.0 <= took < 30.0, took  # (120 s x 5 before; loaded machines start slowly)
        # judge takes the same two knobs (its --retries are re-asks of unparsable answers).
        src = write_jsonl(Path(os.environ.get("TMPDIR", "/tmp")) / f"stalled-{os.getpid()}.jsonl", judge_records(1))
        before = srv.requests
        t0 = time.monotonic()
        r = run_cli("judge", str(src), "-O", "harmless", "--base-url", srv.url, "-m", "fake-judge", "--timeout", "1",
                    "--api-retries", "1", "--concurrency", "2", "--no-cache", "-q")
        took = time.monotonic() - t0
        src.unlink()
        assert r.returncode == 1, r.stderr.decode()
        deadline = time.monotonic() + 5  # a loaded machine may log a request after the client gave up on it
        while srv.requests - before < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert srv.requests - before == 4  # 2 units x (1 + 1 retry), in parallel
        assert all("APITimeoutError" in x["invalid_reason"] for x in rows_of(r.stdout))
        assert 2.0 <= took < 30.0, took


# ------------------------------------------------------------------ 5. deeply nested JSON

def _nested(depth: int, leaf: str = '"x"') -> str:
    """A record whose 'meta' field nests lists so that the record is ``depth`` levels deep."""
    inner = "[" * (depth - 1) + leaf + "]" * (depth - 1)
    return '{"query": "Deep?", "response": "deep answer", "meta": ' + inner + "}"


def test_deeply_nested_json_is_a_per_record_input_error(tmp_path):
    """Item 5: a record nested 600 or 10,000 levels deep (RecursionError in the surrogate
    scrubber, then in json.loads) is an input error of that record naming file and line:
    exit 2 under --on-error fail before anything is generated, skip/keep apply, and the
    records after it are corrected. 128 levels are read (with a lone surrogate at the
    bottom repaired); 129 are not."""
    from metaalign_cli.records import MAX_DEPTH, read_jsonl

    good = json.dumps({"query": "Fine?", "response": "fine answer"})
    data = "\n".join([_nested(600), good, _nested(10_000), good]) + "\n"
    msg = f"JSON nested deeper than {MAX_DEPTH} levels of arrays and objects"
    args = ("correct", "-O", "helpful", "-b", "scripted", "-q")
    r = run_cli(*args, input=data)
    assert r.returncode == 2 and r.stdout == b""
    assert one_line_error(r.stderr) == f"error: <stdin>:1: {msg}"
    r = run_cli(*args, "--on-error", "keep", input=data)
    out = rows_of(r.stdout)
    assert r.returncode == 1 and [o.get("error") for o in out] == [f"<stdin>:1: {msg}", None, f"<stdin>:3: {msg}", None]
    assert out[1]["corrected"].startswith("fixed-") and out[3]["corrected"] == out[1]["corrected"]
    r = run_cli(*args, "--on-error", "skip", input=data)
    assert r.returncode == 1 and [o["query"] for o in rows_of(r.stdout)] == ["Fine?", "Fine?"]

    f = tmp_path / "edge.jsonl"
    f.write_text("\n".join([_nested(MAX_DEPTH, '"a\\ud800b"'), _nested(MAX_DEPTH + 1),
                            _nested(700, '"\\"]]]]\\""')]) + "\n", encoding="utf-8")
    recs = list(read_jsonl(f))
    assert recs[0].error is None and recs[0].warnings == (
        f"{f}:1: field 'meta{'[0]' * (MAX_DEPTH - 1)}': lone surrogate replaced with U+FFFD",)
    assert [str(r.error) for r in recs[1:]] == [f"{f}:2: {msg}", f"{f}:3: {msg}"]
    bad = tmp_path / "bad-utf8.jsonl"  # invalid UTF-8 inside a deep line: the field finder parses it too
    bad.write_bytes(_nested(5000, '"\xff"').encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff") + b"\n")
    assert str(next(read_jsonl(bad)).error).startswith(f"{bad}:1: invalid UTF-8 at byte")


def test_deeply_nested_json_in_the_other_readers(tmp_path):
    """Item 5, the other readers: build-data counts a deep row as a bad row (JSONL and a
    .json array) and builds from the rest; judge stops on it with exit 2; a --resume file
    holding a line too deep for Python's parser is "not a JSONL record", exit 2."""
    rows = [{"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    deep = '{"prompt": "deep?", "chosen": "c", "rejected": "r", "meta": ' + "[" * 3000 + "]" * 3000 + "}"
    src = tmp_path / "pairs.jsonl"
    src.write_text(deep + "\n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    arr = tmp_path / "pairs.json"
    arr.write_text("[" + '{"prompt": "deep?", "chosen": "c", "rejected": "r", "meta": ' + "[" * 300 + "]" * 300
                   + "}," + ",".join(json.dumps(r) for r in rows) + "]", encoding="utf-8")
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    built = {}
    for f in (plain, src, arr):
        out = tmp_path / f"built-{f.name}"
        r = run_cli("build-data", str(f), "--format", "pairwise", "-O", "harmless", "--validation-ratio", "0",
                    "-o", str(out), "-q")
        assert r.returncode == 0, r.stderr.decode()
        built[f] = (json.loads((out / "stats.json").read_text()),
                    [x["prompt"] for x in rows_of((out / "train" / "preference.jsonl").read_bytes())])
    assert len(built[plain][1]) >= 6
    for f in (src, arr):
        stats, prompts = built[f]
        assert json.dumps(stats).count("nested deeper than 128") == 1, stats
        assert sorted(prompts) == sorted(built[plain][1])  # the rows after it are all there

    jsrc = tmp_path / "judge.jsonl"
    jsrc.write_text(json.dumps(judge_records(1)[0]) + "\n" + _nested(5000) + "\n", encoding="utf-8")
    r = run_cli("judge", str(jsrc), "-O", "harmless", "-b", "scripted", "--no-cache", "-q")
    assert r.returncode == 2 and one_line_error(r.stderr).startswith(f"error: {jsrc}:2: JSON nested deeper than")

    out = tmp_path / "out.jsonl"
    out.write_text(_nested(100_000) + "\n", encoding="utf-8")
    r = run_cli("correct", "-O", "helpful", "-b", "scripted", "-o", str(out), "--resume", "-q",
                input=correct_records(1))
    assert r.returncode == 2 and f"{out}:1: not a JSONL record" in one_line_error(r.stderr)


# ------------------------------------------------------------------ 9, 10. export --install and moved runs

def _fake_run(tiny: Path, run: Path) -> dict:
    """A `metaalign train`-shaped output directory: a (random tiny) full model and its card."""
    import shutil

    shutil.copytree(tiny, run)
    card = {"template": "hh-rlhf", "prompt_format": "raw", "base_model": str(tiny), "trained_with": "metaalign train",
            "merged": True}
    (run / "metaalign.json").write_text(json.dumps(card), encoding="utf-8")
    return card


def test_install_refuses_to_replace_another_runs_corrector_without_overwrite(tmp_path):
    """`export RUN --install NAME` over a corrector installed from another run is refused (exit 2,
    one line, nothing changed) unless --overwrite, which replaces it whole (the old files go);
    the same run installed again (a newer export of it) needs no flag."""
    home = tmp_path / "home"
    env = {"METAALIGN_HOME": str(home)}
    for name in ("a", "b"):
        (tmp_path / name / "gguf").mkdir(parents=True)
        (tmp_path / name / "gguf" / f"{name}.gguf").write_bytes(name.encode() * 10)
        (tmp_path / name / "metaalign.json").write_text(json.dumps({"gguf": f"gguf/{name}.gguf", "template": "hh-rlhf",
                                                                    "merged": True, "adapter": "adapter"}))
    inst = home / "models" / "mine"

    def installed():
        return sorted(p.name for p in inst.iterdir()), json.loads((inst / "metaalign.json").read_text())["installed_from"]

    assert run_cli("export", str(tmp_path / "a"), "--install", "mine", env=env).returncode == 0
    assert installed() == (["a.gguf", "metaalign.json"], str(tmp_path / "a"))
    r = run_cli("export", str(tmp_path / "b"), "--install", "mine", env=env)
    assert r.returncode == 2 and one_line_error(r.stderr) == (
        f"error: {inst}: corrector 'mine' is installed there already (from {tmp_path / 'a'}); "
        "use --overwrite to replace it, or another NAME")
    assert installed() == (["a.gguf", "metaalign.json"], str(tmp_path / "a"))
    r = run_cli("export", str(tmp_path / "b"), "--install", "mine", "--overwrite", env=env)
    assert r.returncode == 0 and r.stdout.decode() == f"installed\t{inst}\n"
    assert installed() == (["b.gguf", "metaalign.json"], str(tmp_path / "b"))
    assert run_cli("export", str(tmp_path / "b"), "--install", "mine", env=env).returncode == 0  # the same run
    assert installed() == (["b.gguf", "metaalign.json"], str(tmp_path / "b"))
    assert sorted(p.name for p in (home / "models").iterdir()) == ["mine"]  # no staging left
    card = json.loads((inst / "metaalign.json").read_text())
    assert "merged" not in card and "adapter" not in card  # the run's layout, not the installed copy's
    r = run_cli("correct", "--model", "mien", "-O", "harmless", "--dry-run", input=correct_records(1), env=env)
    assert ("warning: mien: not a local path or an installed corrector: it is loaded as a hub id (needs the hub or "
            "its cache; did you mean the installed corrector 'mine'?)") in r.stderr.decode(), r.stderr.decode()


@pytest.mark.slow
def test_install_does_not_change_the_run_and_a_moved_run_still_loads(tmp_path, tiny_llama_dir):
    """Item 9: `export RUN --install NAME` after an export installs that export: no new f16
    GGUF in RUN, RUN's metaalign.json byte for byte as it was. Item 10: the card's paths are
    relative to it, so `correct --model` works on the run moved elsewhere (and on a copy);
    an old card holding the absolute path of where the run was still loads."""
    import shutil

    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    run = tmp_path / "runs" / "demo"
    _fake_run(tiny_llama_dir, run)
    r = run_cli("export", str(run), "--type", "q8_0")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    card = json.loads((run / "metaalign.json").read_text())
    assert card["gguf"] == "gguf/demo-q8_0.gguf"  # (was /.../runs/demo/gguf/demo-q8_0.gguf)
    files, card_bytes = sorted(p.name for p in (run / "gguf").iterdir()), (run / "metaalign.json").read_bytes()
    assert files == ["demo-q8_0.gguf"]

    home = tmp_path / "home"
    r = run_cli("export", str(run), "--install", "mine", env={"METAALIGN_HOME": str(home)})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert sorted(p.name for p in (run / "gguf").iterdir()) == files  # no demo-f16.gguf written
    assert (run / "metaalign.json").read_bytes() == card_bytes  # not repointed to an f16
    inst = home / "models" / "mine"
    icard = json.loads((inst / "metaalign.json").read_text())
    assert icard["gguf"] == "demo-q8_0.gguf"
    assert (inst / "demo-q8_0.gguf").read_bytes() == (run / "gguf" / "demo-q8_0.gguf").read_bytes()

    rec = json.dumps({"query": "\n\nHuman: hi\n\nAssistant:", "response": "hello"}) + "\n"
    args = ("correct", "-O", "harmless", "--max-new-tokens", "2", "--threads", "1", "-q")
    moved = tmp_path / "elsewhere" / "demo2"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))  # mv runs/demo elsewhere/demo2
    r = run_cli(*args, "--model", str(moved), input=rec)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert rows_of(r.stdout)[0]["metaalign"]["model"] == str(moved / "gguf" / "demo-q8_0.gguf")
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved)
    r = run_cli(*args, "--model", str(copy), input=rec)
    assert r.returncode == 0 and rows_of(r.stdout)[0]["metaalign"]["model"] == str(copy / "gguf" / "demo-q8_0.gguf")

    # A card written before this fix: the absolute path of where the run was first.
    old = dict(card, gguf=str(run / "gguf" / "demo-q8_0.gguf"))
    (copy / "metaalign.json").write_text(json.dumps(old), encoding="utf-8")
    r = run_cli(*args, "--model", str(copy), input=rec)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert rows_of(r.stdout)[0]["metaalign"]["model"] == str(copy / "gguf" / "demo-q8_0.gguf")
    (copy / "gguf" / "demo-q8_0.gguf").unlink()
    r = run_cli(*args, "--model", str(copy), input=rec)
    assert r.returncode == 2 and f"field 'gguf': {run / 'gguf' / 'demo-q8_0.gguf'} not found" in \
        one_line_error(r.stderr)


# ------------------------------------------------------------------ 13. the first optimizer step; GGUF load bar

def _stage_rows(stage: str) -> list[dict]:
    from metaalign_cli.templates import load_template

    tpl = load_template("hh-rlhf")
    aspects = "Harmless: The response should avoid content that is offensive"
    out = []
    for i, (q, weak, good) in enumerate([("How do I boil an egg?", "Put it in water.", "Boil it for nine minutes."),
                                         ("What is the capital of France?", "France is big.", "Paris."),
                                         ("How many legs does a spider have?", "Many.", "Eight.")]):
        question = f"\n\nHuman: {q}\n\nAssistant:"
        y0, target = (weak, weak) if stage == "warmup" else (weak, good)
        out.append({"id": f"{stage}-{i}", "stage": stage, "split": "train", "query": question, "response": y0,
                    "objectives": [aspects], "target": target, "template": "hh-rlhf", "variant": "equal",
                    "prompt": tpl.render(question, y0, aspects, "equal")})
    return out


def test_warmup_never_runs_an_optimizer_step_at_learning_rate_zero():
    """Item 13: transformers' linear warm-up gives step 0 the factor 0, and a warm-up ratio
    becomes ceil(ratio x steps) >= 1 steps; the trainer's schedule starts at 1/W of the peak."""
    import math

    import torch
    from transformers import get_scheduler

    from metaalign_cli.training import warmup_without_zero_step

    for name, steps, ratio, want in (("cosine", 2, 0.05, [1.0, 1.0]), ("linear", 8, 0.25, [0.5, 1.0, 1.0, 5 / 6]),
                                     ("constant_with_warmup", 4, 0.5, [0.5, 1.0, 1.0, 1.0])):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=2e-4)
        w = math.ceil(steps * ratio)
        sched = warmup_without_zero_step(get_scheduler(name, opt, num_warmup_steps=w, num_training_steps=steps), w)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:len(want)] == pytest.approx([2e-4 * x for x in want]), (name, lrs)
        assert min(lrs[:-1]) > 0


@pytest.mark.slow
def test_smoke_run_trains_on_both_steps_and_logs_no_gguf_bar(tmp_path, tiny_llama_dir):
    """Item 13, end to end: `train --max-steps 2` with the default warm-up ratio (0.05) runs
    both optimizer steps of each stage at the peak learning rate (the first ran at 0), and a
    GGUF base model's "Converting and de-quantizing GGUF tensors" bar stays out of a log
    file (stderr not a terminal)."""
    from metaalign_cli.export import write_llama_gguf

    base = tmp_path / "tiny-f32.gguf"
    write_llama_gguf(tiny_llama_dir, base, "f32")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for stage in ("warmup", "equal"):
        write_jsonl(data / "train" / f"{stage}.jsonl", _stage_rows(stage))
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    with open(log, "wb") as fh:
        p = subprocess.run([sys.executable, "-m", "metaalign_cli", "train", "--data", str(data), "-m", str(base),
                            "-o", str(out), "--stages", "warmup,equal", "--max-steps", "2", "--batch-size", "2",
                            "--lora-r", "4", "--lr", "1e-3", "--logging-steps", "1", "--save-steps", "100"],
                           stdout=subprocess.PIPE, stderr=fh, cwd=REPO, timeout=1200)
    err = log.read_bytes().decode("utf-8", "replace")
    assert p.returncode == 0, err[-3000:]
    assert "de-quantizing" not in err and "GGUF tensors" not in err, err[-3000:]
    rows = rows_of((out / "metrics.jsonl").read_bytes())
    assert [(r["stage"], r["step"]) for r in rows] == [("warmup", 1), ("warmup", 2), ("equal", 1), ("equal", 2)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3] * 4)  # the first step of each stage ran at 0


# ------------------------------------------------------------------ 15. README corrections

def test_readme_says_what_the_commands_do():
    """Item 15: the install time, the train example's objectives (ones its multi-aspect data
    rates: it has no 'harmless'), `objectives` printing JSON when piped, and system turns
    rendered `System: ...`, each checked against what the code does."""
    from conftest import DATA

    from metaalign_cli.objectives import load_objectives

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # (measured by the new-user trials: 10 min 23 s to 19 min 42 s on the 2-core machine)
    assert "10-20 min on 2 cores" in readme and "~9 min" not in readme and "~6 min" not in readme
    m = re.search(r"metaalign correct --model runs/demo -O (\S+)", readme)
    data = DATA / "multi-aspect" / "just-eval-ultrafeedback-160.jsonl"
    objset = load_objectives()
    if data.is_file():
        aspects = {k for line in data.read_text(encoding="utf-8").splitlines()[:20]
                   for c in json.loads(line)["completions"] for k in c["annotations"]}
        rated = {o.name for o in objset.resolve(sorted(aspects))}
    else:
        rated = {"instruction_following", "honest", "truthful", "helpful"}
    assert m and {o.name for o in objset.resolve(m.group(1).split(","))} <= rated, (m and m.group(1), rated)

    assert "piped (or with `--json`) it is one JSON object per line" in readme
    r = run_cli("objectives", "-O", "helpful")  # stdout is not a terminal here
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "helpful"

    assert "a system (or `developer`) turn as `System: ...`" in readme
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]}
    from fakes import ScriptedBackend

    r = run_cli("correct", "-O", "helpful", "-b", "scripted", "-t", "hh-rlhf", "-q", input=json.dumps(rec) + "\n")
    assert r.returncode == 0
    assert "\n\nSystem: Be brief.\n\nHuman: Hi?\n\nAssistant:" in ScriptedBackend.calls[-1][0]

    assert "other roles, `tool` included, are refused at their field" in readme
    rec["messages"][0]["role"] = "tool"
    r = run_cli("correct", "-O", "helpful", "-b", "scripted", "-q", input=json.dumps(rec) + "\n")
    assert r.returncode == 2 and "field 'messages[0].role': unknown role 'tool'" in r.stderr.decode()
