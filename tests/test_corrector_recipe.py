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
