"""The corrector recipe's data rules (configs/corrector_data.py): what a decline target keeps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "corrector_data", Path(__file__).resolve().parents[1] / "configs" / "corrector_data.py")
corrector_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corrector_data)


def test_decline_target_cuts_the_refusal_sentences_and_keeps_the_reason():
    text = ("I apologize, but I cannot provide any advice about robbing a store. I'm sorry. That would be "
            "unethical and against the law. I suggest finding legal ways to get what you need; if you are "
            "struggling financially, community resources may help.")
    got = corrector_data.decline_target(text)
    assert got == ("That would be unethical and against the law. I suggest finding legal ways to get what you "
                   "need; if you are struggling financially, community resources may help.")
    assert not corrector_data.is_refusal(got)


@pytest.mark.parametrize("text", [
    "Robbery is a serious crime. I would encourage you to find legal and ethical ways to earn money instead.",
    "I'm sorry to hear that Janet punched you. That must have been upsetting; tell a teacher or a counselor.",
    "I apologize, my previous response was misguided. Violence should be avoided, whoever starts it, always.",
    "I apologize, but I cannot help with that. It is illegal.",  # too little left (6 words)
    "I'm sorry, but I can't assist with that.",
])
def test_decline_target_is_none_for_a_plain_answer_sympathy_or_too_little_left(text):
    assert corrector_data.decline_target(text) is None


def test_a_sentence_split_never_breaks_inside_a_name():
    # "Jr." is followed by a lowercase word: no split there, so the cut keeps whole sentences.
    text = ("I apologize, but I do not know when or if JFK Jr. will return. Claims about his return are "
            "conspiracy theories with no credible evidence, so I would suggest reputable news sources for the facts instead.")
    assert corrector_data.decline_target(text).startswith("Claims about his return")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_recipe_config_loads_as_a_train_config(path):
    # A recipe in configs/ is what docs/corrector.md tells people to run; one that drifted from
    # TrainConfig's keys (renamed or removed knob) would fail only after the data step's hour.
    from metaalign_cli.training import load_train_config
    cfg = load_train_config(path)
    # its run directory is the recipe's name in docs/corrector.md (corrector.yaml is corrector-a)
    named = {"corrector.yaml": "runs/corrector-a", "train.yaml": "runs/smollm2-metaaligner"}
    assert cfg.output_dir == named.get(path.name, f"runs/{path.stem}")
    assert cfg.template == "hh-rlhf"


_short_spec = importlib.util.spec_from_file_location(
    "short_answers", Path(__file__).resolve().parents[1] / "bench" / "short_answers.py")
short_answers = importlib.util.module_from_spec(_short_spec)
_short_spec.loader.exec_module(short_answers)


@pytest.mark.parametrize("text, right, wrong, want", [
    ("72", r"72", r"64", True),
    ("9 * 8 = 64", r"72", r"64", False),           # the thirteenth trial's broken sum
    ("8 times 9 is 72.", r"72", r"64", True),
    ("1722", r"72", r"64", False),                 # whole numbers only
    ("13 - 5 = 8", r"8|eight", r"7|seven", True),  # alternatives stay inside the word bounds
    ("eighteen", r"8|eight", r"7|seven", False),
    ("Not Lyon but Paris.", r"paris", r"lyon", False),  # naming the wrong answer at all counts as wrong
    ("Caballo.", r"gato", r"perro", False),
])
def test_a_short_answer_is_right_when_it_holds_the_answer_and_not_the_wrong_one(text, right, wrong, want):
    assert short_answers.is_right(text, right, wrong) is want


def test_short_answer_counts_are_hand_worked():
    rows = [{"response": "72", "answer": "72", "wrong": "64", "corrected": "72"},              # kept, unchanged
            {"response": "Gato.", "answer": "gato", "wrong": "perro", "corrected": "Caballo."},  # broken
            {"response": "Lyon.", "answer": "paris", "wrong": "lyon", "corrected": "Paris."},   # fixed
            {"response": "1939.", "answer": "1945", "wrong": "1939", "corrected": "1938."},     # still wrong
            {"response": "Hund.", "answer": "hund", "wrong": "katze"}]                         # failed record
    assert short_answers.score(rows) == dict(n=5, unchanged=1, right_before=3, right_after=2, kept=1,
                                             broken=2, fixed=1)
    assert len(short_answers.records("right")) == len(short_answers.records("wrong")) == 40
    assert all(short_answers.is_right(r["response"], r["answer"], r["wrong"]) for r in short_answers.records("right"))
    assert not any(short_answers.is_right(r["response"], r["answer"], r["wrong"]) for r in short_answers.records("wrong"))
