"""Objectives and templates: the exact strings released checkpoints need, validation errors,
one-pass rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaalign_cli.errors import ConfigError, UnknownNameError
from metaalign_cli.objectives import load_objective_file, load_objectives, render_objectives
from metaalign_cli.templates import load_template

HH = {
    "harmless": "Harmlessness: The response should avoid content that is offensive, discriminatory, or harmful",
    "helpful": "Helpfulness: The response should provide useful resources and suggestions to the user",
    "humor": "Humour: The response should be cheerful and amusing",
}
UF = {
    "instruction_following": "Instruction following: the response should follow the instructions of the query",
    "honest": "Honesty: the response should not tell lies",
    "truthful": "Truthfulness: the response should actively making known all the full truth of a matter",
    "helpful": "Helpfulness: the response should provide useful resources and suggestions to the user",
    "specific": "Specificity: the response should refer to facts and details and avoid vague arguments.",
    "factual": "Factuality: the response should be factually correct and avoid hallucinated statements.",
    "readable": "Readability: the response should be easy to read and understand, not too technical for laymen.",
    "fair": "Fairness: the response should avoid biased or one-sided arguments and consider different points of view.",
    "repeat": "Repetition: the response should avoid repetitive statements of one point.",
    "length": "Length: the response should be concise and avoid redundant content.",
}
IMHI = {
    "correct": "Correctness: the explanations should make correct predictions",
    "informative": "Informative: the response should express clear logic and provide consistent evidence",
    "professional": "Professional: the response should provide evidence with high quality and reliability",
}


@pytest.fixture(scope="module")
def objset():
    return load_objectives(include_user=False)


@pytest.mark.parametrize("template,table", [("hh-rlhf", HH), ("ultrafeedback", UF), ("imhi", IMHI)])
def test_released_checkpoint_strings(objset, template, table):
    for name, text in table.items():
        assert objset.get(name).render(template) == text
    names = list(table)[::-1]  # order given by the user is kept
    joined = render_objectives(objset.resolve(names), template)
    assert joined == "; ".join(table[n] for n in names)


def test_all_fifteen_objectives_and_aliases(objset):
    assert len(objset) == 15
    pairs = {"harmlessness": "harmless", "helpfulness": "helpful", "humour": "humor", "if": "instruction_following",
             "instruction-following": "instruction_following", "honesty": "honest", "truthfulness": "truthful",
             "correctness": "correct", "informative": "informative", "professional": "professional",
             "specificity": "specific", "factuality": "factual", "readability": "readable", "fairness": "fair",
             "repetition": "repeat", "concise": "length"}
    for alias, name in pairs.items():
        assert objset.get(alias).name == name
    # Table 4 wording elsewhere
    assert objset.get("harmless").render("ultrafeedback") == \
        "Harmless: The response should avoid content that is offensive, discriminatory, or harmful."
    assert objset.get("fair").render(None) == \
        "Fair: The response should avoid biased or one-sided arguments and consider different points of view."


def test_unknown_objective_suggests(objset):
    with pytest.raises(UnknownNameError, match=r"unknown objective 'harmles'.*did you mean harmless"):
        objset.resolve("harmles,helpful")
    # A file where a name goes (a new user's `-O objs/polite.yaml`): the flag that loads it.
    with pytest.raises(UnknownNameError, match=r"unknown objective 'objs/polite.yaml'; a YAML file is loaded with "
                                               r"--objective-file objs/polite.yaml, then named by its 'name'"):
        objset.resolve("objs/polite.yaml")


@pytest.mark.parametrize("typed, hint", [
    ("kindness", None),       # shares only "-ness" with fairness: compared as kind / fair
    ("kindnes", None),        # another first letter, not very close
    ("armless", "harmless"),  # another first letter, but very close
    ("helpfullness", "helpful"),
    ("instruction", "instruction_following"),
    ("honsety", "honest"),
])
def test_suggestions_weigh_the_stem_and_the_first_letter(objset, typed, hint):
    with pytest.raises(UnknownNameError) as e:
        objset.get(typed)
    msg = str(e.value).split(" (known:")[0]
    assert msg == f"unknown objective '{typed}'" + (f"; did you mean {hint}?" if hint else "")


def test_objective_file_errors(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\ndescripton: typo\n")
    with pytest.raises(ConfigError, match=r"x.yaml: line 2: unknown key 'descripton' \(did you mean 'description'\?\)$"):
        load_objective_file(bad)
    bad.write_text("name: x\nweight: 2\n")  # nothing close: the keys a file may hold
    with pytest.raises(ConfigError, match=r"x.yaml: line 2: unknown key 'weight' \(allowed: name, description, aliases, "
                                          r"label, renderings\)$"):
        load_objective_file(bad)
    bad.write_text("name: x\n\ndescription: ''\n")  # a schema error names the key's line
    with pytest.raises(ConfigError, match=r"x.yaml: line 3: key 'description': must not be empty$"):
        load_objective_file(bad)
    bad.write_text("name: x\ndescription:\n")  # YAML null, not a string
    with pytest.raises(ConfigError, match=r"x.yaml: line 2: key 'description': no value given$"):
        load_objective_file(bad)
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"x.yaml: missing key 'description'"):
        load_objective_file(bad)
    bad.write_text("name: x\ndescription: [unclosed\n")
    with pytest.raises(ConfigError, match=r"x.yaml: line 2: invalid YAML: .*\(the file ends in a flow sequence begun on line 2\)$"):
        load_objective_file(bad)
    bad.write_text('name: x\ndescription: "The response\n  should be kind.\n\n')  # a quote never closed: 3 lines
    with pytest.raises(ConfigError, match=r"x.yaml: line 3: invalid YAML: found unexpected end of stream "
                                          r"\(the file ends in a quoted scalar begun on line 2\)$"):
        load_objective_file(bad)
    bad.write_text("name: x\n  bad: [\ndescription: y\n")  # not at the end: PyYAML's own line
    with pytest.raises(ConfigError, match=r"x.yaml: line 2: invalid YAML: mapping values are not allowed here$"):
        load_objective_file(bad)


def test_zero_shot_objective_file_overrides_and_adds(tmp_path):
    d = tmp_path / "objs"
    d.mkdir()
    (d / "empathetic.yaml").write_text("name: empathetic\ndescription: The response should acknowledge the user's feelings.\n")
    objset = load_objectives(dirs=[d], include_user=False)
    assert objset.get("empathetic").render("hh-rlhf") == "Empathetic: The response should acknowledge the user's feelings."
    assert len(objset) == 16


def test_user_home_objectives(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "objectives").mkdir(parents=True)
    (home / "objectives" / "polite.yaml").write_text("name: polite\nlabel: Politeness\ndescription: Be polite.\n")
    monkeypatch.setenv("METAALIGN_HOME", str(home))
    assert load_objectives().get("polite").render() == "Politeness: Be polite."


def test_a_broken_user_objective_file_blocks_only_what_it_declares(tmp_path, monkeypatch):
    """Trial finding: one broken YAML file in $METAALIGN_HOME/objectives stopped every command,
    even runs that never use it. It is now skipped with a warning on every run; naming the
    objective it was meant to declare (by its file name, or an alias of the built-in it would
    replace) fails with that file's own error, and the other objectives work."""
    from conftest import cli

    from metaalign_cli.errors import ConfigError

    objs = tmp_path / "home" / "objectives"
    objs.mkdir(parents=True)
    (objs / "helpful.yaml").write_text("name: helpful\ndescripton: Be useful.\n")
    (objs / "kind.yaml").write_text("description: [Be kind\n")
    monkeypatch.setenv("METAALIGN_HOME", str(tmp_path / "home"))
    objset = load_objectives()
    assert objset.get("harmless").source.endswith("data/objectives/harmless.yaml")
    helpful_err = f"{objs / 'helpful.yaml'}: line 2: unknown key 'descripton' (did you mean 'description'?)"
    for name in ("helpful", "helpfulness", "kind"):
        with pytest.raises(ConfigError) as e:
            objset.get(name)
        assert str(e.value).startswith(f"objective '{name}': {objs / (('kind' if name == 'kind' else 'helpful') + '.yaml')}: line ")
    assert str(pytest.raises(ConfigError, objset.get, "helpful").value) == f"objective 'helpful': {helpful_err}"
    notes = objset.notes([])
    assert len(notes) == 2 and notes[0] == f"{helpful_err} (skipped: fix or remove the file)"
    assert notes[1].startswith(f"{objs / 'kind.yaml'}: line 1: invalid YAML: ") and notes[1].endswith("(skipped: fix or remove the file)")
    # the same file given explicitly still fails at load
    with pytest.raises(ConfigError, match="unknown key 'descripton'"):
        load_objectives(files=[objs / "helpful.yaml"])
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"query": "q", "response": "r"}\n{"query": "q", "response": "r", "objectives": ["helpful"]}\n')
    r = cli("correct", str(inp), "-O", "harmless", "-t", "hh-rlhf", "--dry-run", "--on-error", "skip")
    err = r.stderr.decode()
    assert r.returncode == 1 and f"warning: {helpful_err} (skipped: fix or remove the file)" in err, err
    assert f"{inp}:2: field 'objectives': objective 'helpful': {helpful_err}" in err, err
    assert [json.loads(x)["line"] for x in r.stdout.decode().splitlines()] == [1]
    r = cli("objectives", "-O", "helpful")
    assert r.returncode == 2 and f"error: objective 'helpful': {helpful_err}" in r.stderr.decode()


def test_user_files_that_clash_are_skipped_not_fatal(tmp_path, monkeypatch):
    """Trial finding: two files of $METAALIGN_HOME/objectives declaring one name, or one whose
    alias is a built-in's name, stopped every command. Each is skipped with its warning (the
    two of a name both); naming what they declare fails with that error; a broken file's
    declared name (not only its file name) points to it; the rest works."""
    from metaalign_cli.errors import ConfigError

    objs = tmp_path / "home" / "objectives"
    objs.mkdir(parents=True)
    (objs / "dupA.yaml").write_text("name: dup1\ndescription: One.\n")
    (objs / "dupB.yaml").write_text("name: dup1\ndescription: Two.\n")
    (objs / "clash.yaml").write_text("aliases: [helpful]\ndescription: Clash.\n")
    (objs / "typo.yaml").write_text("name: empath\ndescripton: Feel.\n")
    (objs / "fine.yaml").write_text("description: Fine.\n")
    monkeypatch.setenv("METAALIGN_HOME", str(tmp_path / "home"))
    objset = load_objectives()
    assert objset.get("fine").description == "Fine." and objset.get("helpful").source.endswith("data/objectives/helpful.yaml")
    dup = f"{objs / 'dupB.yaml'}: objective 'dup1' is also declared in {objs / 'dupA.yaml'}"
    clash = f"{objs / 'clash.yaml'}: alias 'helpful' is also the name of objective 'helpful' ("
    for name, err in (("dup1", dup), ("dupA", dup), ("clash", clash), ("empath", f"{objs / 'typo.yaml'}: line 2: ")):
        with pytest.raises(ConfigError) as e:
            objset.get(name)
        assert str(e.value).startswith(f"objective '{name}': {err}"), str(e.value)
    notes = objset.notes([])
    assert len(notes) == 3 and f"{dup} (skipped: fix or remove the file)" in notes
    assert any(n.startswith(clash) for n in notes) and any("typo.yaml" in n for n in notes)


def test_an_alias_lost_by_an_override_is_named(tmp_path):
    """Trial finding: a file that replaces a built-in without its aliases answered the old
    alias with a bare 'unknown objective'."""
    from metaalign_cli.errors import UnknownNameError

    d = tmp_path / "objs"
    d.mkdir()
    (d / "helpful.yaml").write_text("description: Be useful.\n")
    objset = load_objectives(dirs=[d], include_user=False)
    with pytest.raises(UnknownNameError) as e:
        objset.get("Helpfulness")
    assert str(e.value) == (
        f"unknown objective 'Helpfulness': it is an alias of 'helpful' in {objset.replaced['helpful'].source}, "
        f"which {d / 'helpful.yaml'} replaces without it (use 'helpful', or add 'Helpfulness' to that file's aliases)")


HH_BETTER = ("You are an assistant to human. You will be provided with a context and an answer. Consider the context, "
             "then edit the answer to improve it considering these aspects: {aspects} | Context: {question} | "
             "Answer: {answer} | Edit: ")
UF_BETTER = ("You are an assistant to human. You will be provided with a query and an answer. Consider the query, "
             "then edit the answer to improve it considering these aspects: {aspects} | Query: {question} | "
             "Answer: {answer} | Edit: ")
IMHI_BETTER = ('Edit the following Question-Answer pair to make it better considering these aspects "{aspects}" | '
               "Question: {question} | Answer: {answer} | Edit: ")


@pytest.mark.parametrize("name,better", [("hh-rlhf", HH_BETTER), ("ultrafeedback", UF_BETTER), ("imhi", IMHI_BETTER)])
def test_templates_byte_identical(name, better):
    t = load_template(name)
    assert t.better == better
    assert t.equal == better.replace("to improve it considering", "to make it equal considering").replace(
        "to make it better considering", "to make it equal considering")
    q = "\n\nHuman: Q\n\nAssistant:"  # an HH dialogue, as every query of the released checkpoints' data
    assert t.render(q, "A", "X", "better") == better.replace("{aspects}", "X").replace("{question}", q).replace("{answer}", "A")
    assert t.render(q, "A", "X").endswith("| Edit: ")
    # A plain query (no Human: turn): as it is, except where the template frames it as one turn
    # (hh-rlhf: the form its checkpoints and the shipped corrector's training data saw).
    assert t.render("Q", "A", "X") == t.render(q if name == "hh-rlhf" else "Q", "A", "X")


def test_hh_rlhf_frames_only_a_query_without_a_human_turn():
    t = load_template("hh-rlhf")
    ctx = lambda q: t.render(q, "A", "X").split(" | Context: ")[1].split(" | Answer: ")[0]  # noqa: E731
    assert ctx("Say hi in Japanese") == "\n\nHuman: Say hi in Japanese\n\nAssistant:"
    assert ctx("Human: hi\n\nAssistant:") == "Human: hi\n\nAssistant:"  # a dialogue is left as it is
    assert ctx("\n\nSystem: Be brief.\n\nHuman: hi\n\nAssistant:") == "\n\nSystem: Be brief.\n\nHuman: hi\n\nAssistant:"
    assert ctx("Is 'Human: x' a dialogue?") == "\n\nHuman: Is 'Human: x' a dialogue?\n\nAssistant:"  # not a turn


def test_template_syntax_in_user_text_is_verbatim():
    cases = [json.loads(l) for l in (Path(__file__).parent / "cases" / "template-syntax-in-text.jsonl").read_text().splitlines()]
    t = load_template("hh-rlhf")
    for c in cases:
        out = t.render(c["query"], c["response"], "ASPECTS")
        assert out.count(c["query"]) == 1 and out.count(c["response"]) == 1
        assert out == HH_BETTER.replace("{aspects}", "ASPECTS", 1).split("{question}")[0] + \
            "\n\nHuman: " + c["query"] + "\n\nAssistant:" + " | Answer: " + c["response"] + " | Edit: "


def test_template_validation(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("name: t\nkind: correction\nbetter: 'no slots'\nequal: '{aspects}{question}{answer}'\n")
    with pytest.raises(ConfigError, match=r"t.yaml: .*'better' lacks the placeholder \{aspects\}"):
        load_template(str(f))
    f.write_text("name: t\nbetter: '{aspects}{question}{answer}'\nequal: '{aspects}{question}{answer}'\nextra: 1\n")
    with pytest.raises(ConfigError, match=r"t.yaml: line 4: unknown key 'extra'$"):
        load_template(str(f))
    f.write_text("name: t\nkind: correction\n\nbetter: 5\nequal: '{aspects}{question}{answer}'\n")
    with pytest.raises(ConfigError, match=r"t.yaml: line 4: key 'better': Input should be a valid string$"):
        load_template(str(f))
    f.write_text("name: t\nequal: '{aspects}{question}{answer}'\n")  # a missing key has no line
    with pytest.raises(ConfigError, match=r"t.yaml: missing key 'better'$"):
        load_template(str(f))
    with pytest.raises(UnknownNameError, match="unknown template 'nope'.*hh-rlhf"):
        load_template("nope")
    with pytest.raises(UnknownNameError, match=r"unknown correction template 'hh-rlfh'; did you mean hh-rlhf\? \(known:"):
        load_template("hh-rlfh", kind="correction")
    with pytest.raises(UnknownNameError, match=r"unknown correction template 'HH-RLHF'; did you mean hh-rlhf\?"):
        load_template("HH-RLHF", kind="correction")
    with pytest.raises(UnknownNameError) as e:  # only names of the kind asked for are offered
        load_template("nope", kind="judge-score")
    assert str(e.value) == "unknown judge-score template 'nope' (known: judge-score)"
    with pytest.raises(UnknownNameError, match=r"\(known: hh-rlhf, imhi, ultrafeedback\)"):
        load_template("nope", kind="correction")


def test_loop_guard_detection():
    from metaalign_cli.backends.base import is_looping

    assert not is_looping(list(range(100)))
    assert is_looping([1, 2] + [7, 8, 9] * 20)  # period 3, span >= 48
    assert not is_looping([7, 8, 9] * 10)  # 30 tokens: below the minimum span
    assert is_looping([5] * 48) and not is_looping([5] * 47)
    cycle = list(range(40))
    assert is_looping([0] * 3 + cycle * 3) and not is_looping(cycle * 2 + [99])


def test_loop_guard_counts_list_numbers_as_equal_only_in_a_unit_of_words():
    """A numbered list whose items repeat is a loop (numbers count as equal), but counting, a
    table column of numbers, or a unit with fewer than three words is not."""
    from metaalign_cli.backends.base import WORDS, is_looping, loop_cut

    def words(unit, n=60):
        return " ".join(unit.format(i=i) for i in range(1, n)).split()

    boil = words("{i}. Boil an egg.")  # 4 words a unit: the 48th word ends unit 12
    assert not is_looping(boil) and loop_cut(boil) is None  # without kinds: no two units alike
    assert is_looping(boil[:48], kinds=WORDS) and not is_looping(boil[:47], kinds=WORDS)
    assert loop_cut(boil, kinds=WORDS) == 48
    assert loop_cut(words("Day {i}: rest at home."), kinds=WORDS) == 48  # 3 words besides the number
    assert loop_cut(words("{i},", 100), kinds=WORDS) is None  # counting
    assert loop_cut(words("| {i} | Yes |"), kinds=WORDS) is None  # one word a row (two rows hold two)
    assert loop_cut(words("{i}. Boil eggs."), kinds=WORDS) is None  # two words a unit
    assert loop_cut(words("Step {i}: boil it for {i} minutes."), kinds=WORDS) == 48  # two numbers a unit


def test_alias_that_names_another_objective_is_rejected(tmp_path):
    f = tmp_path / "kind.yaml"
    f.write_text("name: kind\naliases: [harmless]\ndescription: Be kind.\n")
    with pytest.raises(ConfigError, match=r"kind.yaml: alias 'harmless' is also the name of objective 'harmless' \(.*harmless.yaml\)"):
        load_objectives(files=[f], include_user=False)


def test_objective_clashes_between_files_name_both_files(tmp_path):
    """Two files in one directory declaring one name, and an alias two objectives share, fail
    at load naming both files; a file given twice, and a user file replacing a built-in (with
    its aliases), are fine."""
    d = tmp_path / "objs"
    d.mkdir()
    (d / "a.yaml").write_text("name: brief\ndescription: Be brief.\n")
    (d / "b.yaml").write_text("name: brief\ndescription: Be short.\n")
    with pytest.raises(ConfigError, match=r"b.yaml: objective 'brief' is also declared in .*a.yaml"):
        load_objectives(dirs=[d], include_user=False)
    (d / "b.yaml").write_text("name: terse\naliases: [short]\ndescription: Be terse.\n")
    (d / "c.yaml").write_text("name: snappy\naliases: [Short]\ndescription: Be snappy.\n")
    with pytest.raises(ConfigError, match=r"c.yaml: alias 'Short' is also an alias of objective 'terse' \(.*b.yaml\)"):
        load_objectives(dirs=[d], include_user=False)
    (d / "c.yaml").unlink()
    # 'concise' is the built-in length objective's alias; taking it needs replacing `length`.
    f = tmp_path / "brevity.yaml"
    f.write_text("name: brevity\naliases: [concise]\ndescription: Be brief.\n")
    with pytest.raises(ConfigError, match=r"brevity.yaml: alias 'concise' is also an alias of objective 'length'"):
        load_objectives(dirs=[d], files=[f], include_user=False)
    g = tmp_path / "length.yaml"
    g.write_text("name: length\naliases: [concise]\ndescription: Say it in few words.\n")
    objs = load_objectives(dirs=[d], files=[g, g], include_user=False)
    assert objs.get("concise").source == str(g) and objs.get("short").name == "terse"
    assert [o.name for o in objs.resolve("brief,terse,length")] == ["brief", "terse", "length"]


def test_template_path_not_found():
    with pytest.raises(ConfigError, match=r"nope.yaml: template file not found"):
        load_template("./nope.yaml")


def test_a_replaced_builtin_and_a_misspelt_rendering_key_are_named(tmp_path):
    """Tenth new-user trial: a file named like a shipped objective dropped its aliases and its
    exact hh-rlhf text without a word, and a `renderings` key misspelt as `hh-rlhff` was never
    used, also silently. Both are now warned when the objective is used."""
    from conftest import cli

    from metaalign_cli.objectives import load_objectives

    d = tmp_path / "objs"
    d.mkdir()
    (d / "h.yaml").write_text('name: harmless\ndescription: Be nice.\nrenderings:\n  hh-rlhff: "X: foo"\n')
    objset = load_objectives(dirs=[d], include_user=False)
    h = objset.get("harmless")
    assert h.render("hh-rlhf") == "Harmless: Be nice."
    notes = objset.notes([h], "hh-rlhf")
    assert notes == [
        f"{d / 'h.yaml'}: replaces objective 'harmless' of {objset.replaced['harmless'].source} without its aliases "
        "harmlessness and its exact text for the hh-rlhf template(s) (what released correctors were trained on); "
        "copy them into the file to keep them",
        f"{d / 'h.yaml'}: renderings key 'hh-rlhff' is not the template in use, 'hh-rlhf': its text is not used "
        "(a misspelt template name?)"]
    assert objset.notes([objset.get("helpful")], "hh-rlhf") == []  # untouched objectives: nothing to say
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"query": "q", "response": "r"}\n')
    r = cli("correct", str(inp), "-O", "harmless", "--objectives-dir", str(d), "-t", "hh-rlhf", "--dry-run")
    err = r.stderr.decode()
    assert r.returncode == 0 and f"warning: {notes[0]}" in err and f"warning: {notes[1]}" in err, err


@pytest.mark.parametrize("text, want", [
    ("Hola | Edit: Hello!", "Hello!"),          # echoed the answer, then the edit: the edit
    ("caballo |", "caballo"),                   # a lone start of a label at the end
    ("Sure, here it is. | Ed", "Sure, here it is."),
    ("to help the user | Context:", "to help the user"),
    ("Fine | Edit:", "Fine"),                   # nothing after the edit label: what came before
    ("| a | b |\n| 1 | 2 |", "| a | b |\n| 1 | 2 |"),  # a Markdown table keeps its pipes
    ("Use a | b, then c.", "Use a | b, then c."),
    # labels of its own in the prompt's style (thirteenth new-user trial: 4 of 27 short records)
    ('Kunde | Helpful: Yes, I can say "dog" in German.', "Kunde"),
    ("Buch | Explanation: Book is a written work.", "Buch"),
    ("Konnichiwa | Helpful!", "Konnichiwa"),
    ("| Name | Role: lead |\n| Ann | Dev |", "| Name | Role: lead |\n| Ann | Dev |"),  # a table row
])
def test_a_generation_is_cut_at_the_prompts_field_labels(text, want):
    # The shipped corrector wrote "Hola | Edit: Hello!" and "caballo |" for two short records
    # (twelfth new-user trial); nothing flagged them.
    assert load_template("hh-rlhf").cut_markers(text) == want


def test_idle_cores_leaves_the_busy_ones_to_other_jobs(monkeypatch):
    """llama.cpp's default thread count: cores minus the 1-minute load average, rounded, at
    least 1; all cores where the load cannot be read."""
    import os

    from metaalign_cli.backends import llamacpp

    for cores, load, want in ((2, 1.6, 1), (2, 0.3, 2), (2, 5.0, 1), (16, 4.4, 12), (16, 0.0, 16)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        monkeypatch.setattr(os, "getloadavg", lambda l=load: (l, l, l))
        assert llamacpp.idle_cores() == want, (cores, load)

    def unreadable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    assert llamacpp.idle_cores() == 16
