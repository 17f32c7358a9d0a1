"""The correction pipeline's logic on the scripted in-process backend (tests/fakes.py): caps,
chunking, ordering. Real models are tested in test_correct.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, cli

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


def test_resume_redoes_rows_whose_correction_is_not_a_text(tmp_path, scripted_backend):
    """A finished row whose output field was edited to null (or a number) is not a result:
    --resume drops it and corrects the record again, in input order."""
    out = tmp_path / "o.jsonl"
    inp = "".join(json.dumps({"id": i, "query": "q", "response": f"a{i}"}) + "\n" for i in range(4))
    assert cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(out), input=inp).returncode == 0
    good = rows(out.read_bytes())
    edited = [dict(o, corrected=None) if o["id"] == 1 else dict(o, corrected=5) if o["id"] == 2 else o for o in good]
    out.write_text("".join(json.dumps(o) + "\n" for o in edited))
    scripted_backend.calls = []
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "-o", str(out), input=inp)
    assert r.returncode == 0, r.stderr.decode()
    assert sum(len(c) for c in scripted_backend.calls) == 2  # ids 1 and 2 corrected again, 0 and 3 kept
    assert [(o["id"], o["corrected"]) for o in rows(out.read_bytes())] == [(o["id"], o["corrected"]) for o in good]


def test_chunks_follow_the_backend_and_output_keeps_input_order(scripted_backend):
    inp = "".join(json.dumps({"id": i, "query": "q", "response": "same length"}) + "\n" for i in range(7))
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--batch-size", "3", input=inp)
    assert r.returncode == 0 and [o["id"] for o in rows(r.stdout)] == list(range(7))
    assert [len(c) for c in scripted_backend.calls] == [3, 3, 1]


def test_resume_refuses_an_edited_objective_or_template(tmp_path, scripted_backend):
    """The provenance fingerprints the objective text and the template text: an objective YAML
    or a template file edited between a run and its `--resume` is refused (before, the file
    silently mixed records corrected toward the old and the new text)."""
    (tmp_path / "objs").mkdir()
    obj = tmp_path / "objs" / "zz.yaml"
    obj.write_text('name: zz\ndescription: "The response should be short."\n', encoding="utf-8")
    tpl = tmp_path / "mine.yaml"
    tpl.write_text('name: mine\nkind: correction\nbetter: "Improve ({aspects}) Q: {question} A: {answer} E: "\n'
                   'equal: "Same ({aspects}) Q: {question} A: {answer} E: "\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    inp = '{"id": 1, "query": "q", "response": "a"}\n{"id": 2, "query": "q", "response": "b"}\n'
    args = ["correct", "-b", "scripted", "-O", "zz", "--objectives-dir", str(tmp_path / "objs"), "-t", str(tpl),
            "-o", str(out)]
    r = cli(*args, input=inp)
    assert r.returncode == 0, r.stderr.decode()
    first = out.read_text().splitlines(keepends=True)[0]
    prov = json.loads(first)["metaalign"]
    assert len(prov["objectives_sha"]) == 16 and len(prov["template_sha"]) == 16
    out.write_text(first)
    obj.write_text('name: zz\ndescription: "The response should be long."\n', encoding="utf-8")
    r = cli(*args, "--resume", input=inp)
    assert r.returncode == 2 and "the text of objectives ['zz'] differs" in r.stderr.decode()
    assert out.read_text() == first  # nothing appended
    obj.write_text('name: zz\ndescription: "The response should be short."\n', encoding="utf-8")
    tpl.write_text(tpl.read_text().replace("Improve", "Better"), encoding="utf-8")
    r = cli(*args, "--resume", input=inp)
    assert r.returncode == 2 and "template_sha" in r.stderr.decode()
    tpl.write_text(tpl.read_text().replace("Better", "Improve"), encoding="utf-8")
    r = cli(*args, "--resume", input=inp)  # both as they were: it resumes
    assert r.returncode == 0 and [o["id"] for o in rows(out.read_bytes())] == [1, 2]


def test_cap_hits_are_counted_and_usage_errors(tmp_path, scripted_backend):
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--max-new-tokens", "8",
            input='{"query": "q", "response": "a"}\n{"query": "q", "response": "LONG"}\n')
    assert r.returncode == 0 and ", 1 at the token cap;" in r.stderr.decode()
    assert [o["metaalign"]["finish_reason"] for o in rows(r.stdout)] == ["stop", "length"]
    # A fixed cap over half the context is lowered, and said (it was silent).
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--max-new-tokens", "5000",
            input='{"query": "q", "response": "a"}\n')
    assert r.returncode == 0 and ("warning: --max-new-tokens 5000 is more than half the model's context "
                                  "(4096 tokens): using 2048") in r.stderr.decode()
    assert rows(r.stdout)[0]["metaalign"]["generation"]["max_new_tokens"] == 2048
    # A --base-url without a scheme is a usage error, not a failed generation.
    r = cli("correct", "-O", "helpful", "--base-url", "localhost:8000", "-m", "x",
            input='{"query": "q", "response": "a"}\n')
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip() == ("error: --base-url 'localhost:8000' needs http:// or https:// "
                                         "(e.g. http://127.0.0.1:8000/v1)")
    # A config file's value of the wrong type is refused even when a flag overrides it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_new_tokens: [1, 2]\n", encoding="utf-8")
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-c", str(cfg), "--max-new-tokens", "8",
            input='{"query": "q", "response": "a"}\n')
    assert r.returncode == 2 and str(cfg) in r.stderr.decode() and "max_new_tokens" in r.stderr.decode()
    # ... in one line that says what was expected and shows the value once
    for text, msg in (("batch_size: abc\n", "line 1: key 'batch_size': expected an integer: 'abc'"),
                      ("temperature: [1]\n", "line 1: key 'temperature': expected a number: [1]")):
        cfg.write_text(text, encoding="utf-8")
        r = cli("correct", "-b", "scripted", "-O", "helpful", "-c", str(cfg), input="")
        assert r.returncode == 2 and r.stderr.decode().strip() == f"error: {cfg}: {msg}"


def test_invalid_json_at_the_end_of_a_line_names_its_column(scripted_backend):
    line = '{"id": "c", "query": "q", "response": "Madrid"'  # the closing brace missing: column 47
    r = cli("correct", "-b", "scripted", "-O", "helpful", input=line + "\r\n")
    assert r.returncode == 2 and r.stderr.decode().strip().endswith(
        ":1: invalid JSON: Expecting ',' delimiter (column 47)"), r.stderr.decode()


def test_resume_refuses_what_is_not_a_metaalign_output(tmp_path, scripted_backend):
    """`--resume -o /dev/full` read the device forever (14.8 GB before the OOM killer); a copy
    of the input as -o counted every record as done. Both are usage errors now."""
    inp = '{"id": 1, "query": "q", "response": "a"}\n{"id": 2, "query": "q", "response": "b"}\n'
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-o", "/dev/full", "--resume", input=inp)
    assert r.returncode == 2 and r.stderr.decode().strip() == (
        "error: /dev/full: --resume continues a file metaalign wrote; this is not a regular file")
    notours = tmp_path / "copy.jsonl"  # (the input file itself as -o is refused before this)
    notours.write_text(inp, encoding="utf-8")
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(notours), "--resume", input=inp)
    assert r.returncode == 2 and f"{notours}:1: no 'metaalign' provenance object" in r.stderr.decode()
    assert notours.read_text(encoding="utf-8") == inp
    r = cli("judge", "-b", "scripted", "-O", "helpful", "-o", "/dev/full", "--resume", input="")
    assert r.returncode == 2 and "not a regular file" in r.stderr.decode()


def test_judge_resume_of_another_input_is_refused_before_the_judge_loads(tmp_path, scripted_backend):
    rec = '{"id": "%s", "query": "q", "response": "a", "corrected": "c", "golden": "g"}\n'
    out = tmp_path / "j.jsonl"
    r = cli("judge", "-b", "scripted", "-O", "helpful", "-o", str(out), "--max-invalid", "1", input=rec % "a")
    assert r.returncode == 0, r.stderr.decode()
    assert scripted_backend.loads == 1 and len(out.read_text().splitlines()) == 2  # response, corrected
    r = cli("judge", "-b", "scripted", "-O", "helpful", "-o", str(out), "--resume", input=rec % "b")
    assert r.returncode == 2 and "resumed rows do not match this run (record 'a'" in r.stderr.decode()
    assert scripted_backend.loads == 1  # refused before the judge loaded
    r = cli("judge", "-b", "scripted", "-O", "helpful", "-o", str(out), "--resume", "--max-invalid", "1", input=rec % "a")
    assert r.returncode == 0 and scripted_backend.loads == 2


def test_malformed_base_urls_are_usage_errors_without_their_secrets():
    for url, why in [("http://u:CANARY@[::1/v1", "is not a valid URL: Invalid IPv6 URL"),
                     ("u:CANARY@127.0.0.1:8000/v1", "needs http:// or https://"),
                     ("u:CANARY@host:8000/v1?x-api-key=CANARY", "'host:8000/v1?x-api-key=REDACTED' needs http://"),
                     ("http://[::1/v1?subscription-key=CANARY&v=1", "'http://[::1/v1?subscription-key=REDACTED&v=1' is not"),
                     ("http://127.0.0.1:99999/v1", "is not a valid URL: Port out of range 0-65535"),
                     ("http:///v1", "names no host")]:
        for cmd in ("correct", "judge"):
            r = cli(cmd, "-O", "helpful", "--base-url", url, "-m", "x",
                    input='{"query": "q", "response": "a", "corrected": "c", "golden": "g"}\n')
            err = r.stderr.decode()
            assert r.returncode == 2 and why in err and "CANARY" not in err and err.count("\n") == 1, (cmd, url, err)


def test_an_id_that_is_not_a_string_or_integer_is_refused_as_judge_does(scripted_backend):
    for rid in ('{"x": 1}', "[1]", "true", "1.5"):
        r = cli("correct", "-b", "scripted", "-O", "helpful", input='{"id": ' + rid + ', "query": "q", "response": "a"}\n')
        assert r.returncode == 2 and r.stdout == b"", rid
        assert ":1: field 'id': expected a string or integer id, got" in r.stderr.decode(), r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", input='{"id": 7, "query": "q", "response": "a"}\n')
    assert r.returncode == 0


def test_the_shipped_corrector_is_a_small_gguf_lora_on_the_embedded_base():
    """The package ships `metaalign train`'s GGUF LoRA (the recipe its card names, in configs/) and its card:
    f16, at most ~10 MB, on the embedded SmolLM2 with the raw hh-rlhf prompts it was trained on."""
    from metaalign_cli.backends import default_model_path
    from metaalign_cli.correctors import read_card, shipped_corrector

    d = shipped_corrector()
    assert d is not None
    card = read_card(d)
    lora = Path(card["lora"])
    assert lora.parent == d and lora.stat().st_size <= 10 * 2**20
    assert lora.read_bytes()[:4] == b"GGUF"
    assert card["gguf"] == str(default_model_path()) and (card["template"], card["prompt_format"]) == ("hh-rlhf", "raw")
    recipe = card["recipe"].split()[0]
    assert (REPO / recipe).is_file() and card["name"].endswith(f"({Path(recipe).stem})")


def test_repeat_penalty_is_the_flag_else_the_cards_else_none(tmp_path, monkeypatch):
    """The shipped card says the penalty it was judged with (1.25); --repeat-penalty overrides it; a
    corrector whose card says none, or a plain model, gets 1.0. A bad card value is one line."""
    from metaalign_cli.config import CorrectConfig, load_config
    from metaalign_cli.correction import correction_options
    from metaalign_cli.correctors import read_card
    from metaalign_cli.errors import MetaAlignError
    from metaalign_cli.models import resolve_config
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.templates import load_template

    monkeypatch.setenv("HOME", str(tmp_path))  # no installed default: the shipped corrector
    objset, tpl = load_objectives(include_user=False), load_template("hh-rlhf")

    def penalty(**flags):
        cfg = load_config(CorrectConfig, None, flags)
        resolved = resolve_config(cfg, "corrector")
        return resolved.kind, correction_options(cfg, objset, tpl, None, resolved.repeat_penalty).settings.repeat_penalty

    assert penalty() == ("shipped", 1.25)
    assert penalty(repeat_penalty="1.0") == ("shipped", 1.0)
    assert penalty(model="smollm2") == ("prompted", 1.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metaalign.json").write_text('{"template": "hh-rlhf"}')
    assert penalty(model=str(run)) == ("run", 1.0)
    (run / "metaalign.json").write_text('{"template": "hh-rlhf", "generation": {"repeat_penalty": 1.3}}')
    assert penalty(model=str(run)) == ("run", 1.3)
    for bad, msg in (('"fast"', "field 'generation': expected an object"),
                     ('{"repeat_penalty": "1.1"}', "field 'generation.repeat_penalty': expected a number > 0, got '1.1'")):
        (run / "metaalign.json").write_text('{"template": "hh-rlhf", "generation": ' + bad + '}')
        with pytest.raises(MetaAlignError, match=re.escape(msg)):
            read_card(run)


def test_trim_loop_hand_worked():
    from metaalign_cli.backends.base import trim_loop

    # the tail repeats a 5-word unit; the last word is cut mid-way: keep the first copy
    assert trim_loop("Sure. I can help with that. I can help with that. I can help with that. I can he") == \
        "Sure. I can help with that."
    # a unit that is not a whole sentence: its first copy, nothing before it cut
    assert trim_loop("No. You are right, and you are right, and you are right, and you") == \
        "No. You are right, and you"
    assert trim_loop("Ideas:\n- apples\n- pears\n- plums\n- plums\n- plums\n- plu") == "Ideas:\n- apples\n- pears\n- plums"
    # list numbers, initials and abbreviations do not end a sentence; a closing » does
    assert trim_loop("Of course! Mr. Smith and Mr. Smith and Mr. Smith and Mr. Sm") == "Of course! Mr. Smith and"
    assert trim_loop("1. First 2. Second 2. Second 2. Second 2. Sec") == "1. First 2. Second"
    # list numbers count as equal: a numbered list whose items repeat keeps its first item
    assert trim_loop("Steps: 1. Boil an egg. 2. Boil an egg. 3. Boil an egg. 4. Bo") == "Steps: 1. Boil an egg."
    assert trim_loop("He replied: «Oui.» and «Oui.» and «Oui.» an") == "He replied: «Oui.»"
    # a repetition with no sentence end at all: the first copy of the unit
    assert trim_loop("very very very very very") == "very"
    # no word-for-word repetition: only back to the last whole sentence ("quoted." ends one)
    assert trim_loop('He said "it is fine." Then he went to the') == 'He said "it is fine."'
    # nothing to cut back to: as it is
    assert trim_loop("no sentence end here") == "no sentence end here" and trim_loop("") == ""
    # (the 11-word unit of a real corrector-f loop, ending in a cut word)
    real = ("I'm so glad you're happy. " + "I'm happy, and I'm happy to share your story with you. " * 3 + "I'm happy")
    assert trim_loop(real) == "I'm so glad you're happy. I'm happy, and I'm happy to share your story with you."


def test_on_loop_trims_by_default_and_keep_leaves_the_guards_cut(tmp_path, scripted_backend):
    inp = '{"id": 1, "query": "q", "response": "LOOP"}\n{"id": 2, "query": "q", "response": "fine"}\n'
    r = cli("correct", "-b", "scripted", "-O", "helpful", input=inp)
    assert r.returncode == 0, r.stderr.decode()
    out = rows(r.stdout)
    assert out[0]["corrected"] == "Sure. I can help with that."
    assert out[0]["metaalign"]["finish_reason"] == "loop" and out[0]["metaalign"]["loop_trimmed"] is True
    assert "loop_trimmed" not in out[1]["metaalign"] and out[0]["metaalign"]["generation"]["on_loop"] == "trim"
    assert "1 stopped in a repetition loop (1 cut back to before the repetition)" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--on-loop", "keep", input=inp)
    out = rows(r.stdout)
    assert out[0]["corrected"].endswith("I can help with that. I can he") and "loop_trimmed" not in out[0]["metaalign"]
    # --resume does not mix the two policies in one file
    f = tmp_path / "o.jsonl"
    f.write_bytes(r.stdout.splitlines(keepends=True)[0])
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "-o", str(f), input=inp)
    assert r.returncode == 2 and "generation.on_loop 'keep' there, 'trim' now" in r.stderr.decode()
    # a file written before --on-loop (no on_loop recorded) kept its loops: it resumes under keep
    old = json.loads(f.read_text())
    del old["metaalign"]["generation"]["on_loop"]
    f.write_text(json.dumps(old) + "\n")
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "-o", str(f), input=inp)
    assert r.returncode == 2 and "generation.on_loop 'keep' there, 'trim' now" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "--on-loop", "keep", "-o", str(f), input=inp)
    assert r.returncode == 0 and [o["id"] for o in rows(f.read_bytes())] == [1, 2]
    # without the loop guard the policy does nothing and is not recorded
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--no-loop-guard", input=inp)
    assert "on_loop" not in rows(r.stdout)[0]["metaalign"]["generation"]


def test_a_finished_file_resumed_with_other_settings_is_still_refused(tmp_path, scripted_backend):
    f = tmp_path / "o.jsonl"
    inp = '{"id": 1, "query": "q", "response": "a"}\n'
    assert cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(f), input=inp).returncode == 0
    r = cli("correct", "-b", "scripted", "-O", "harmless", "--resume", "-o", str(f), input=inp)
    assert r.returncode == 2 and "objectives ['helpful'] there, ['harmless'] now" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--resume", "-o", str(f), input=inp)
    assert r.returncode == 0 and "0 record(s) (0 unchanged), 0 failed, 1 already done" in r.stderr.decode()


def test_dry_run_keep_writes_the_bad_records_error_and_unreadable_input_is_one_line(tmp_path):
    import socket

    src = '{"id": "a", "query": "Q1?", "response": "A1."}\n{"id": "b", "query": "Q2?"}\n'
    r = cli("correct", "--dry-run", "-O", "helpful", "--on-error", "keep", input=src)
    out = rows(r.stdout)
    assert r.returncode == 1 and [o["id"] for o in out] == ["a", "b"] and "prompt" in out[0]
    assert out[1]["line"] == 2 and "missing response" in out[1]["error"] and "prompt" not in out[1]
    sock = tmp_path / "s.jsonl"  # a file open() refuses (ENXIO): one line naming it, exit 2
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        r = cli("correct", "--dry-run", "-O", "helpful", str(sock))
    assert r.returncode == 2 and r.stderr.decode().strip().startswith(f"error: {sock}: cannot read input")


def test_help_shows_backend_defaults_only_for_the_commands_that_take_them():
    build = " ".join(cli("build-data", "--help").stdout.decode().split())
    train = " ".join(cli("train", "--help").stdout.decode().split())
    assert "--tokenizer PATH GGUF file or local HF tokenizer directory" in build and "[openai]" not in build
    assert "[transformers; default auto]" not in train and "[default: auto]" in train


def test_a_kept_bad_record_names_its_objectives_and_unknown_roles_are_refused(scripted_backend):
    """From the third new-user trial: a record failing its input checks under --on-error keep
    records the objectives it asked for (it recorded []), and a turn role outside OpenAI's chat
    roles is refused at its field (it was rendered as 'Wizard:', and a first-turn one was
    reported as 'no user turn')."""
    inp = "".join(json.dumps(r) + "\n" for r in (
        {"id": "a", "query": "q", "objectives": ["harmless"]},
        {"id": "b", "query": "q"},
        {"id": "c", "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "d", "messages": [{"role": "USR", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "e", "messages": [{"role": "Developer", "content": "be brief"}, {"role": "User", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}))
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--on-error", "keep", input=inp)
    assert r.returncode == 1, r.stderr.decode()
    out = rows(r.stdout)
    assert [o["metaalign"]["objectives"] for o in out] == [["harmless"], ["helpful"], ["helpful"], ["helpful"],
                                                            ["helpful"]]
    assert out[0]["error"] == "<stdin>:1: field 'response/answer/output/generated_text/completion': missing response " \
        "(the record has: id, query, objectives; name yours with --response-field)"
    assert out[2]["error"] == ("<stdin>:3: field 'messages[0].role': unknown role 'wizard' "
                               "(use user, assistant, system, developer)")
    assert out[3]["error"].endswith("unknown role 'USR' (use user, assistant, system, developer); did you mean 'user'?")
    assert "error" not in out[4] and out[4]["corrected"].startswith("fixed-")


def test_an_unclosed_csv_quote_names_the_row_it_opens_in(tmp_path):
    """From the third new-user trial: a quote never closed read the rest of the file into one
    cell and was reported as a short row; it fails the file at the row's first line, as does
    text after a closing quote (which was silently glued on)."""
    bad = tmp_path / "b.csv"
    bad.write_text('query,response,id\nx,y,1\na,"unclosed,2\nb,c,3\n')
    r = cli("correct", str(bad), "-O", "helpful", "--dry-run")
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"error: {bad}:3: invalid CSV: a quoted field in the row that starts here is never closed"
    bad.write_text('query,response\nq,"a"x\n')
    r = cli("correct", str(bad), "-O", "helpful", "--dry-run")
    assert r.returncode == 2 and r.stderr.decode().strip() == f"error: {bad}:2: invalid CSV: ',' expected after '\"'"


def test_an_earlier_output_is_never_replaced_without_overwrite(tmp_path, scripted_backend):
    """A rerun, a --dry-run or an empty input used to cut a finished -o file to nothing (a new
    user's trial lost 5 corrections to --dry-run); now each is refused unless --overwrite (or
    --resume, which continues the file). Blind task exports likewise keep their key."""
    out = tmp_path / "o.jsonl"
    inp = '{"id": 1, "query": "q", "response": "a"}\n{"id": 2, "query": "q", "response": "b"}\n'
    assert cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(out), input=inp).returncode == 0
    done = out.read_bytes()
    for extra, stdin in ((["--dry-run"], inp), ([], inp), ([], "")):
        r = cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(out), *extra, input=stdin)
        assert r.returncode == 2 and out.read_bytes() == done, (extra, r.stderr.decode())
        assert f"{out}: holds an earlier run's output (-o); use --resume to continue it, --overwrite to replace " \
               "it, or another file" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(out), "--dry-run", "--overwrite", input=inp)
    assert r.returncode == 0 and [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 2]
    assert "prompt" in json.loads(out.read_text().splitlines()[0])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")  # an empty file holds nothing to lose
    assert cli("correct", "-b", "scripted", "-O", "helpful", "-o", str(empty), input=inp).returncode == 0
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "a", "corrected": "c", "golden": "g"}\n')
    tasks, key = tmp_path / "t.jsonl", tmp_path / "k.json"
    assert cli("judge", str(rec), "-O", "helpful", "--blind-tasks", str(tasks), "--blind-key", str(key)).returncode == 0
    kept = key.read_bytes()
    r = cli("judge", str(rec), "-O", "helpful", "--blind-tasks", str(tasks), "--blind-key", str(key), "--seed", "3")
    assert r.returncode == 2 and "(--blind-tasks); use --overwrite" in r.stderr.decode() and key.read_bytes() == kept
    r = cli("judge", "-b", "scripted", str(rec), "-O", "helpful", "-o", str(out), "--max-invalid", "1")
    assert r.returncode == 2 and "(-o); use --resume to continue it" in r.stderr.decode()


def test_resume_from_another_input_is_refused(tmp_path, scripted_backend):
    """--resume matched done rows by id or line only: an output made from input A, resumed with
    input B, kept A's record as B's line 1; resumed with a shorter input, it kept A's extra rows.
    Now each done row must echo the input record at its place, and every row must have one."""
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text('{"query": "Say hi", "response": "hi"}\n{"query": "Name a color", "response": "blue"}\n')
    b.write_text('{"query": "Capital of France?", "response": "Paris"}\n{"query": "2+2?", "response": "4"}\n')
    out = tmp_path / "o.jsonl"
    assert cli("correct", "-b", "scripted", "-O", "helpful", str(a), "-o", str(out)).returncode == 0
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # killed after line 1
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(b), "-o", str(out), "--resume")
    assert r.returncode == 2 and scripted_backend.loads == 1
    assert f"{b}:1: --resume: output line 1 ({out}) holds another record for line 1" in r.stderr.decode()
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(a), "-o", str(out), "--resume")
    assert r.returncode == 0 and [json.loads(x)["query"] for x in out.read_text().splitlines()] == \
        ["Say hi", "Name a color"]
    short = tmp_path / "short.jsonl"
    short.write_text(a.read_text().splitlines(keepends=True)[0])
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(short), "-o", str(out), "--resume")
    assert r.returncode == 2 and "the output holds 1 record(s) this input does not have (first at output line 2)" \
        in r.stderr.decode()
    # The same record under its id, with a field the run added (corrected) already in the input: still a match.
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"id": "x", "query": "q", "response": "r", "corrected": "old"}\n'
                   '{"id": "y", "query": "q", "response": "s"}\n')
    out2 = tmp_path / "o2.jsonl"
    assert cli("correct", "-b", "scripted", "-O", "helpful", str(ids), "-o", str(out2)).returncode == 0
    out2.write_text(out2.read_text().splitlines(keepends=True)[0])
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(ids), "-o", str(out2), "--resume")
    assert r.returncode == 0 and "1 already done" in r.stderr.decode()


def test_an_unfinished_training_run_names_the_command_that_finishes_it(tmp_path):
    """A run killed before its model card (written last) failed in `correct` with transformers'
    "Unrecognized model" and in `export` with "no config.json"; both now name `train --resume`."""
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "train_config.yaml").write_text("epochs: 1\n")
    want = f"error: {run}: an unfinished `metaalign train` run (no metaalign.json yet: it is written last); " \
           f"finish it with `metaalign train --resume -o {run}`"
    r = cli("correct", "-O", "helpful", "--model", str(run), "--dry-run", input='{"query": "q", "response": "r"}\n')
    assert r.returncode == 2 and r.stderr.decode().startswith(want), r.stderr.decode()
    r = cli("export", str(run))
    assert r.returncode == 2 and r.stderr.decode().startswith(want), r.stderr.decode()


def test_judge_leaves_out_records_correct_kept_as_failed_and_counts_empty_candidates(tmp_path, scripted_backend):
    """`correct --on-error keep` output went into `judge` as a pipeline and stopped it (exit 2,
    "not corrected yet?"): a kept failure has nothing to judge, so it is left out and counted.
    An empty correction is judged as it is, with a warning that counts it."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "query": "q", "response": "fine"}\n{"id": "b", "query": "", "response": "x"}\n'
                   '{"id": "c", "query": "q2", "response": "y"}\n')
    out = tmp_path / "c.jsonl"
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(inp), "-o", str(out), "--on-error", "keep")
    assert r.returncode == 1, r.stderr.decode()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "error" in rows[1] and "corrected" not in rows[1]
    rows[2]["corrected"] = ""
    for x in rows:
        x["golden"] = "g"
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = cli("judge", "-b", "scripted", str(out), "--max-invalid", "1", "-o", str(tmp_path / "j.jsonl"))
    err = r.stderr.decode()
    assert r.returncode == 1, err  # some records failed, as `correct` exits on the same file
    assert err.rstrip().endswith("error: 1 record(s) that failed in `correct` were not judged"), err
    assert f"warning: 1 record(s) failed in `correct` (an 'error' field and no 'corrected'; first: {out}:2): " \
           "not judged" in err
    assert f"warning: 1 candidate response(s) are empty (first: {out}:3, field 'corrected')" in err
    judged = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert sorted({x["record_id"] for x in judged}) == ["a", "c"]


def test_no_output_lands_on_the_input_or_on_another_output(tmp_path, scripted_backend):
    """`judge --summary` given the input's name replaced the input (exit 0), `-o` the input too,
    and `--blind-tasks` and `--blind-key` on one path left only the key (the judges would get
    it). Each is refused before anything is read or written, as are --resume with --overwrite
    and `-o FILE < FILE`."""
    rec = tmp_path / "in.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "r", "corrected": "c", "golden": "g"}\n')
    kept = rec.read_bytes()
    out = tmp_path / "o.jsonl"
    for args, msg in ((["-o", str(out), "--summary", str(rec)], f"--summary {rec}: is the input file"),
                      (["-o", str(rec), "--overwrite"], f"--output {rec}: is the input file"),
                      (["-o", str(out), "--summary", str(out)], f"--summary {out}: is also the --output file"),
                      (["--blind-tasks", str(out), "--blind-key", str(out)],
                       f"--blind-key {out}: is also the --blind-tasks file")):
        judge = [] if "--blind-tasks" in args else ["-b", "scripted"]  # (blind tasks call no judge)
        r = cli("judge", *judge, str(rec), "-O", "helpful", *args)
        assert r.returncode == 2 and msg in r.stderr.decode(), (args, r.stderr.decode())
        assert rec.read_bytes() == kept and not out.exists()
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(rec), "-o", str(out), "--resume", "--overwrite")
    assert r.returncode == 2 and "--overwrite replaces -o FILE and --resume continues it" in r.stderr.decode()
    import subprocess
    import sys

    with open(rec, "rb") as stdin:  # a real process: `metaalign correct -o FILE --overwrite < FILE`
        p = subprocess.run([sys.executable, "-m", "metaalign_cli", "correct", "-O", "helpful", "--dry-run", "-o",
                            str(rec), "--overwrite"], stdin=stdin, capture_output=True, cwd=REPO)
    assert p.returncode == 2 and "is the file standard input reads" in p.stderr.decode() and rec.read_bytes() == kept


def test_judge_resume_refuses_rows_whose_texts_were_edited(tmp_path, scripted_backend):
    """`judge --resume` matched rows by (record, objective, candidate) only: a correction edited
    after it was judged kept its old verdict. Each row now carries a digest of what was judged."""
    rec = '{"id": "a", "query": "q", "response": "a", "corrected": "%s", "golden": "g"}\n'
    inp, out = tmp_path / "in.jsonl", tmp_path / "j.jsonl"
    inp.write_text(rec % "first")
    r = cli("judge", "-b", "scripted", str(inp), "-O", "helpful", "-o", str(out), "--max-invalid", "1")
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(x["texts_sha"]) == 16 for x in rows) and rows[0]["texts_sha"] != rows[1]["texts_sha"]
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # the response's row only
    inp.write_text(rec % "edited")  # the corrected text changed; the response's did not
    r = cli("judge", "-b", "scripted", str(inp), "-O", "helpful", "-o", str(out), "--resume", "--max-invalid", "1")
    assert r.returncode == 0, r.stderr.decode()  # the kept row is still right: only 'corrected' is new
    inp.write_text(rec.replace('"response": "a"', '"response": "b"') % "edited")
    r = cli("judge", "-b", "scripted", str(inp), "-O", "helpful", "-o", str(out), "--resume", "--max-invalid", "1")
    assert r.returncode == 2 and "record 'a''s texts changed since its row was judged (objective 'helpful', " \
        "candidate 'response')" in r.stderr.decode(), r.stderr.decode()


def test_correct_warns_before_it_runs_when_judge_would_refuse_the_ids(tmp_path):
    """`correct` took duplicate ids and records with and without ids, and `judge` refused its
    output only afterwards (after a long run). Each record is still corrected; one warning line
    names the record, before any is."""
    for body, line, why in (
            ('{"id": "a", "query": "q", "response": "r"}\n{"id": "b", "query": "q", "response": "r"}\n'
             '{"id": "a", "query": "q2", "response": "r2"}\n', 3, "duplicate id 'a' (first on line 1)"),
            ('{"id": 1, "query": "q", "response": "r"}\n{"query": "q", "response": "r"}\n',
             2, "missing id (other records have one: alignment is by id)")):
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        inp.write_text(body)
        r = cli("correct", "-b", "scripted", "-O", "helpful", str(inp), "-o", str(out), "--overwrite")
        err = r.stderr.decode()
        assert r.returncode == 0, err
        assert f"warning: {inp}:{line}: {why}: `judge` aligns records by id and will refuse the output" in err, err
        assert len(out.read_text().splitlines()) == body.count("\n")
        j = cli("judge", "-b", "scripted", str(out), "--golden-field", "response", "-o", str(tmp_path / "j.jsonl"),
                "--overwrite")
        # what the warning foretold, in the same words (one rule, records.id_problem)
        assert j.returncode == 2 and f"{out}:{line}: field 'id': {why}" in j.stderr.decode(), j.stderr.decode()
    inp.write_text('{"id": "a", "query": "q", "response": "r"}\n{"id": "b", "query": "q", "response": "r"}\n')
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(inp), "-o", str(out), "--overwrite")
    assert r.returncode == 0 and "aligns records by id" not in r.stderr.decode()


def test_numbers_of_the_input_come_back_as_the_same_json_values(tmp_path):
    """README: each input record comes back unchanged as JSON values; a number is re-written
    in Python's shortest form (1E2 as 100.0, -0 as 0), a big integer exactly."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 7, "query": "q", "response": "r", "score": 1E2, "z": -0, "n": 123456789012345678901234567890, '
                   '"f": 0.1, "nested": {"a": [1, 2.50, true, null]}}\n')
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(inp), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode == 0, r.stderr.decode()
    line = (tmp_path / "o.jsonl").read_text()
    assert line.startswith('{"id": 7, "query": "q", "response": "r", "score": 100.0, "z": 0, '
                           '"n": 123456789012345678901234567890, "f": 0.1, "nested": {"a": [1, 2.5, true, null]}, '
                           '"corrected": '), line


def test_no_output_replaces_a_file_the_run_reads_or_an_earlier_summary(tmp_path, scripted_backend):
    """Seventh new-user trial: `judge --summary V` with V the verdict file being imported
    replaced the verdicts (exit 0); `-o` with `--overwrite` replaced an objective file or the
    --config file; `--summary` replaced any existing file without `--overwrite`."""
    rec = tmp_path / "in.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "r", "corrected": "c", "golden": "g", '
                   '"objectives": ["helpful"]}\n')
    tasks, key = tmp_path / "t.jsonl", tmp_path / "k.json"
    assert cli("judge", str(rec), "--blind-tasks", str(tasks), "--blind-key", str(key)).returncode == 0
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text("".join(json.dumps({"task": json.loads(t)["task"], "verdict": 1}) + "\n"
                                for t in tasks.read_text().splitlines()))
    kept = verdicts.read_bytes()
    imp = ["judge", str(rec), "--blind-key", str(key), "--blind-verdicts", str(verdicts)]
    for args, msg in ((["--summary", str(verdicts)], f"--summary {verdicts}: is the --blind-verdicts file"),
                      (["-o", str(verdicts), "--overwrite"], f"--output {verdicts}: is the --blind-verdicts file"),
                      (["-o", str(key), "--overwrite"], f"--output {key}: is the --blind-key file")):
        r = cli(*imp, *args)
        assert r.returncode == 2 and msg in r.stderr.decode(), (args, r.stderr.decode())
    assert verdicts.read_bytes() == kept
    obj = tmp_path / "emp.yaml"
    obj.write_text("name: empathy\ndescription: Be kind to the reader\n")
    r = cli("correct", "-b", "scripted", "-O", "empathy", "--objective-file", str(obj), str(rec), "-o", str(obj),
            "--overwrite")
    assert r.returncode == 2 and f"--output {obj}: is the --objective-file file" in r.stderr.decode()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"objectives: [helpful]\noutput: {conf}\n")
    r = cli("correct", "-b", "scripted", str(rec), "-c", str(conf), "--overwrite")
    assert r.returncode == 2 and f"key 'output': {conf}: is the --config file" in r.stderr.decode()
    assert obj.read_text().startswith("name: empathy") and conf.read_text().startswith("objectives")
    # An existing summary is an earlier run's output, as -o is: kept unless --overwrite.
    summ = tmp_path / "s.json"
    summ.write_text('{"mine": 1}\n')
    r = cli(*imp, "-o", str(tmp_path / "j.jsonl"), "--summary", str(summ))
    assert r.returncode == 2 and f"{summ}: holds an earlier run's output (--summary); use --overwrite to replace it" \
        in r.stderr.decode()  # (an import: --resume is refused there, so it is not offered)
    assert summ.read_text() == '{"mine": 1}\n'
    r = cli(*imp, "-o", str(tmp_path / "j.jsonl"), "--summary", str(summ), "--overwrite")
    assert r.returncode == 0 and json.loads(summ.read_text())["mode"] == "pairwise"
    # No judge model with blind tasks or verdicts: it would do nothing.
    r = cli(*imp, "-m", "gpt-4o", "-b", "openai")
    assert r.returncode == 2 and "--model chooses the judge model, and blind tasks and verdicts call none" \
        in r.stderr.decode()


def test_blind_export_of_kept_failures_exits_1_and_stdin_export_warns(tmp_path):
    """The export left records that failed in `correct` out with exit 0, while the import of
    the same file exits 1; an export read from a pipe could not be imported again, unsaid."""
    inp = tmp_path / "c.jsonl"
    inp.write_text('{"id": "a", "query": "q", "response": "r", "corrected": "c", "golden": "g"}\n'
                   '{"id": "b", "query": "q", "response": "r", "golden": "g", "error": "x", "metaalign": {}}\n')
    r = cli("judge", str(inp), "-O", "helpful", "--blind-tasks", str(tmp_path / "t.jsonl"), "--blind-key",
            str(tmp_path / "k.json"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "error: 1 record(s) that failed in `correct` were not judged" in err, err
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2  # the other record's two tasks
    r = cli("judge", "-", "-O", "helpful", "--blind-tasks", str(tmp_path / "t2.jsonl"), "--blind-key",
            str(tmp_path / "k2.json"), input=inp.read_bytes().splitlines(keepends=True)[0])
    assert r.returncode == 0 and "warning: the import needs this same input again" in r.stderr.decode()


def test_inputs_that_read_one_way_and_were_meant_another_are_named(tmp_path, scripted_backend):
    """A record with both `messages` and `response` is corrected from `query`/`response`, now
    said once; a CSV on stdin read as JSONL says so; a model name that is no path and no
    installed corrector is said to be tried as a hub id (a misspelling waited ~50 s on retries)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"query": "q", "response": "r", "messages": [{"role": "user", "content": "x"}, '
                   '{"role": "assistant", "content": "y"}]}\n{"query": "q", "response": "r"}\n')
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(inp))
    assert r.returncode == 0 and f"warning: {inp}:1: 1 record(s) hold both 'messages' and 'response': the query " \
        "and 'response' fields are corrected, not the messages" in r.stderr.decode()
    r = cli("correct", "-O", "helpful", "--dry-run", input=b"query,response\nq,r\n")
    assert r.returncode == 2 and "<stdin>:1: invalid JSON: Expecting value (column 1) (it looks like CSV: JSONL is read " \
        "here; an input file in CSV takes --input-format csv)" in r.stderr.decode()
    r = cli("correct", "-O", "helpful", "--dry-run", "-m", "nosuchmodel", str(inp))
    assert r.returncode == 0 and "warning: nosuchmodel: not a local path or an installed corrector: it is loaded " \
        "as a hub id" in r.stderr.decode()


def test_hard_links_templates_objective_dirs_and_blind_resume_cannot_replace_what_is_read(tmp_path, scripted_backend):
    """Eighth new-user trial: a hard link to the input (or the key, or the verdicts) passed the
    "no output on a file the run reads" check, as did a template YAML, a file in --objectives-dir
    or $METAALIGN_HOME/objectives (a broken objective there stopped every later command), and
    `judge --resume` on a blind import replaced an earlier import of another input."""
    import os

    rec = tmp_path / "in.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "r", "corrected": "c", "golden": "g", '
                   '"objectives": ["helpful"]}\n')
    kept = rec.read_bytes()
    os.link(rec, tmp_path / "hard.jsonl")
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--dry-run", str(rec), "-o", str(tmp_path / "hard.jsonl"),
            "--overwrite")
    assert r.returncode == 2 and "hard.jsonl: is the input file" in r.stderr.decode(), r.stderr.decode()
    tpl = tmp_path / "mytpl.yaml"
    from metaalign_cli.templates import builtin_templates_dir

    tpl.write_text((builtin_templates_dir() / "hh-rlhf.yaml").read_text())
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-t", str(tpl), str(rec), "-o", str(tpl), "--overwrite")
    assert r.returncode == 2 and f"--output {tpl}: is the --template file" in r.stderr.decode(), r.stderr.decode()
    objd = tmp_path / "objd"
    objd.mkdir()
    (objd / "emp.yaml").write_text("name: empathy\ndescription: Be kind to the reader\n")
    r = cli("correct", "-b", "scripted", "-O", "helpful", "--objectives-dir", str(objd), str(rec), "-o",
            str(objd / "emp.yaml"), "--overwrite")
    assert r.returncode == 2 and "is in --objectives-dir, where objectives are read from" in r.stderr.decode()
    home = tmp_path / "home"
    (home / "objectives").mkdir(parents=True)
    r = cli("correct", "-b", "scripted", "-O", "helpful", str(rec), "-o", str(home / "objectives" / "x.yaml"),
            env={"METAALIGN_HOME": str(home)})
    assert r.returncode == 2 and "is in $METAALIGN_HOME/objectives" in r.stderr.decode(), r.stderr.decode()
    assert rec.read_bytes() == kept and (objd / "emp.yaml").read_text().startswith("name: empathy")
    # The blind round trip: an import is never resumed, an export takes no -o/--summary, and the
    # key is checked for edits and hard links.
    tasks, key = tmp_path / "t.jsonl", tmp_path / "k.json"
    assert cli("judge", str(rec), "--blind-tasks", str(tasks), "--blind-key", str(key)).returncode == 0
    r = cli("judge", str(rec), "--blind-tasks", str(tmp_path / "t2.jsonl"), "--blind-key", str(tmp_path / "k2.json"),
            "--summary", str(tmp_path / "s.json"))
    assert r.returncode == 2 and "--summary goes with judging or an import" in r.stderr.decode()
    v = tmp_path / "v.jsonl"
    v.write_text("".join(json.dumps({"task": json.loads(t)["task"], "verdict": 1}) + "\n"
                         for t in tasks.read_text().splitlines()))
    imp = ["judge", str(rec), "--blind-key", str(key), "--blind-verdicts", str(v)]
    r = cli(*imp, "-o", str(tmp_path / "j.jsonl"), "--resume")
    assert r.returncode == 2 and "--resume continues an LLM judge's calls; a blind import writes every row" \
        in r.stderr.decode()
    os.link(key, tmp_path / "keyhard.json")
    r = cli(*imp, "-o", str(tmp_path / "keyhard.json"), "--overwrite")
    assert r.returncode == 2 and "keyhard.json: is the --blind-key file" in r.stderr.decode()
    k = json.loads(key.read_text())
    k["tasks"][0]["candidate_position"] = 3 - k["tasks"][0]["candidate_position"]
    (tmp_path / "kedit.json").write_text(json.dumps(k))
    r = cli("judge", str(rec), "--blind-key", str(tmp_path / "kedit.json"), "--blind-verdicts", str(v))
    assert r.returncode == 2 and "the key's tasks were edited since the export" in r.stderr.decode()


def test_blind_import_warns_when_one_pair_got_two_verdicts(tmp_path):
    """An unchanged correction shows its uncorrected answer's pair again; two annotators gave
    the twins different verdicts and an unchanged record moved the advantage, unsaid. An export
    now makes the twins one task; a key of an export made before that still warns."""
    from metaalign_cli.records import text_sha

    rec = tmp_path / "in.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "same", "corrected": "same", "golden": "g", '
                   '"objectives": ["helpful"]}\n')
    tasks, key = tmp_path / "t.jsonl", tmp_path / "k.json"
    assert cli("judge", str(rec), "--blind-tasks", str(tasks), "--blind-key", str(key)).returncode == 0
    k = json.loads(key.read_text())
    assert len(tasks.read_text().splitlines()) == 1 and len({t["task"] for t in k["tasks"]}) == 1
    # the key as an export before this wrote it: the twin (the correction) a task of its own
    twin = next(t for t in k["tasks"] if t["candidate"] == "corrected")
    twin["task"] = k["export"] + "-2"
    k["tasks_sha"] = text_sha(json.dumps(k["tasks"], sort_keys=True, ensure_ascii=False))
    key.write_text(json.dumps(k))
    v = tmp_path / "v.jsonl"  # the response wins, its twin (the correction) loses
    v.write_text("".join(json.dumps({"task": t["task"], "verdict": t["candidate_position"] if t["candidate"] ==
                                     "response" else 3 - t["candidate_position"]}) + "\n" for t in k["tasks"]))
    r = cli("judge", str(rec), "--blind-key", str(key), "--blind-verdicts", str(v), "-o", str(tmp_path / "j.jsonl"))
    assert r.returncode == 0 and "warning: 1 pair(s) shown more than once (a candidate equal to another) got " \
        "different verdicts (first: record 'a', objective 'helpful')" in r.stderr.decode(), r.stderr.decode()


def test_judge_dry_run_makes_no_cache_file(tmp_path, scripted_backend):
    """README: a dry run spends nothing; `judge --dry-run --cache X` created a 12 KB database at X."""
    rec = tmp_path / "in.jsonl"
    rec.write_text('{"id": "a", "query": "q", "response": "r", "corrected": "c", "golden": "g"}\n')
    cache = tmp_path / "c.sqlite"
    r = cli("judge", "-b", "scripted", str(rec), "-O", "helpful", "--dry-run", "--cache", str(cache))
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout.decode().splitlines()[0])["cached"] == 0 and not cache.exists()


def test_a_hub_id_that_cannot_load_fails_at_once(tmp_path):
    """Ninth new-user trial: `-m nosuchmodel` waited ~50 s on five hub retries (each printed)
    before failing. Now one probe of the hub: unreachable, or no such repository, is one line,
    exit 2, in seconds. The hub here is a local server (HF_ENDPOINT): a closed port, then one that
    answers as the hub does for a repository that does not exist."""
    import http.server
    import os
    import subprocess
    import sys
    import threading
    import time

    def run(env):  # a process of its own: huggingface_hub reads HF_ENDPOINT when it is imported
        return subprocess.run([sys.executable, "-m", "metaalign_cli", "correct", "-O", "helpful", "-m", "nosuchmodel",
                               str(inp)], capture_output=True, env={**os.environ, **env}, timeout=120)

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"query": "q", "response": "r"}\n')
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    r = run(env)
    err = r.stderr.decode()
    assert r.returncode == 2 and time.monotonic() - t0 < 40 and "Retrying" not in err, err
    assert "error: nosuchmodel: cannot load model (" in err and "it is not in the hub cache and the hub cannot be " \
        "reached: ConnectError" in err, err

    class NoSuchRepo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")  # what the hub sends
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = run({**env, "HF_ENDPOINT": f"http://127.0.0.1:{srv.server_port}"})
    finally:
        srv.shutdown()
    err = r.stderr.decode()
    assert r.returncode == 2 and "error: nosuchmodel: no such model (" in err and "the hub has no such repository, " \
        "or it is private or gated: `hf auth login`)" in err, err


def test_the_templates_field_labels_are_cut_counted_and_flagged(scripted_backend):
    r = cli("correct", "-b", "scripted", "-O", "helpful", "-t", "hh-rlhf",
            input='{"query": "Say hello in French.", "response": "ECHO"}\n{"query": "q", "response": "a"}\n')
    assert r.returncode == 0, r.stderr.decode()
    got = rows(r.stdout)
    assert got[0]["corrected"] == "Hello!" and got[0]["metaalign"]["markers_cut"] is True
    assert "markers_cut" not in got[1]["metaalign"]
    assert ", 1 cut at the prompt's field labels;" in r.stderr.decode()
