"""Prompt templates: editable YAML, validated at load, rendered in one pass.

One source of truth for prompt building: :meth:`CorrectionTemplate.render` builds the
MetaAligner prompt T(q, y, O, t) (paper section 3.1 and Appendix B) for ``build-data``,
``train`` and ``correct`` alike; :class:`JudgeTemplate` holds the judge prompts E (Appendix
C.1) and S (Appendix E.1).

Rendering is a single regex pass over the template text: only the placeholders the template
kind declares (``{aspects}``, ``{question}``...) are replaced, and the user text put in their
place is never read again, so text containing ``{aspects}``, ``{}``, ``${x}`` or ``| Edit:``
comes out verbatim.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from metaalign_cli.errors import ConfigError, UnknownNameError
from metaalign_cli.yamlfiles import key_where, load_yaml_mapping, schema_error

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HUMAN_TURN = re.compile(r"(?:^|\n)Human:")  # a dialogue: some line opens a Human turn

CORRECTION_FIELDS = ("aspects", "question", "answer")
PAIRWISE_FIELDS = ("question", "response_1", "response_2", "aspect")
SCORE_FIELDS = ("question", "response", "aspect")


def fill(text: str, values: Mapping[str, str], allowed: tuple[str, ...]) -> str:
    """Replace ``{name}`` for each name in ``allowed`` in one pass; other text is literal.

    Raises KeyError (listing them) when a placeholder of ``allowed`` has no value.
    """
    missing = [n for n in allowed if "{" + n + "}" in text and n not in values]
    if missing:
        raise KeyError(f"missing template values: {', '.join(missing)}")

    def sub(m: re.Match) -> str:
        name = m.group(1)
        return values[name] if name in allowed else m.group(0)

    return _PLACEHOLDER.sub(sub, text)


def _check_placeholders(text: str, allowed: tuple[str, ...], key: str, required: tuple[str, ...]) -> None:
    used = set(_PLACEHOLDER.findall(text))
    for n in required:
        if n not in used:
            raise ValueError(f"'{key}' lacks the placeholder {{{n}}}")


class _TemplateBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    description: str = ""
    prompt_format: Literal["raw", "chat"] = "raw"
    system: str | None = None
    source: str = ""


# `` | Helpful:``: a label in the style of the correction prompts' own (``| Answer:``)
_LABEL = re.compile(r" \| ?[A-Z][A-Za-z]*(?: [A-Za-z]+){0,2}[:!]")


class CorrectionTemplate(_TemplateBase):
    """A MetaAligner correction template with a ``better`` and an ``equal`` variant.

    ``prompt_format``: ``raw`` sends the rendered text as-is (released MetaAligner
    checkpoints); ``chat`` wraps it as a user turn in the model's chat template (instruct
    models used zero-shot). ``context``: how an OpenAI-style ``messages`` history becomes the
    question text (``dialogue``: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, as in HH-RLHF).
    ``plain_query``: what a question that is not a dialogue (no ``Human:`` turn) becomes:
    ``as-is``, or ``human-turn``, one turn ``"\\n\\nHuman: <question>\\n\\nAssistant:"``
    (hh-rlhf: the form its checkpoints and `metaalign train`'s data see every query in).
    ``markers``: the prompt's own field labels (``"| Answer:"``, ``"| Edit:"``), the last
    being the one the edit follows; a generation that writes them is cut
    (:meth:`cut_markers`).
    """

    kind: Literal["correction"] = "correction"
    better: str
    equal: str
    context: Literal["dialogue"] = "dialogue"
    plain_query: Literal["as-is", "human-turn"] = "as-is"
    markers: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self):
        for key in ("better", "equal"):
            _check_placeholders(getattr(self, key), CORRECTION_FIELDS, key, CORRECTION_FIELDS)
        return self

    def cut_markers(self, text: str) -> str:
        """``text`` (a generation) without the prompt's field labels it went on to write: a
        small corrector sometimes echoes the answer and then writes ``| Edit: <edit>`` (the edit
        is what follows the last edit label), or ends a correction with ``| Context:``, a label
        of its own in the same style (``| Helpful:``, ``| Explanation:``, ``| Helpful!``: a
        capitalised word or up to three after `` | ``, then ``:`` or ``!``) or a lone ``|``
        (cut there). A label of its own, or a trailing start of one, is only cut when it is its
        line's one ``|`` (so a Markdown table row keeps its pipes). Returns ``text`` unchanged when
        the template has no ``markers`` or the text holds none."""
        if not self.markers:
            return text
        edit = self.markers[-1]
        if edit in text:
            after = text.rsplit(edit, 1)[1].strip()
            text = after or text
        for m in self.markers:
            if m in text:
                text = text[:text.index(m)]
        for found in _LABEL.finditer(text):  # a label of its own making, in the prompt's style
            line = text[text.rfind("\n", 0, found.start()) + 1:].split("\n", 1)[0]
            if line.count("|") == 1:
                text = text[:found.start()]
                break
        text = text.rstrip()
        last_line = text.rsplit("\n", 1)[-1]
        for m in self.markers:
            for k in range(len(m) - 1, 0, -1):
                part = m[:k].rstrip()
                if part and text.endswith(" " + part) and last_line.count("|") == 1:
                    return text[:-len(part)].rstrip()
        return text.strip()

    def render(self, question: str, answer: str, aspects: str,
               variant: Literal["better", "equal"] = "better") -> str:
        """T(q, y, O, t) of paper section 3.1: ``question`` q (query or dialogue context),
        ``answer`` y (the response to correct), ``aspects`` O (from
        :func:`metaalign_cli.objectives.render_objectives`), ``variant`` t. A question with no
        ``Human:`` turn is framed as one when ``plain_query`` is ``human-turn``."""
        if variant not in ("better", "equal"):
            raise ValueError(f"variant must be 'better' or 'equal', not {variant!r}")
        text = self.better if variant == "better" else self.equal
        if self.plain_query == "human-turn" and not _HUMAN_TURN.search(question):
            question = dialogue_to_text([("user", question)])
        return fill(text, {"aspects": aspects, "question": question, "answer": answer},
                    CORRECTION_FIELDS)


class JudgeTemplate(_TemplateBase):
    """A judge prompt: ``judge-pairwise`` (E(q, r1, r2, <r>), Appendix C.1) with
    ``{question} {response_1} {response_2} {aspect}``, or ``judge-score`` (S(q, a, <r>),
    Appendix E.1) with ``{question} {response} {aspect}``."""

    kind: Literal["judge-pairwise", "judge-score"]
    prompt: str
    prompt_format: Literal["raw", "chat"] = "chat"

    @model_validator(mode="after")
    def _check(self):
        fields = PAIRWISE_FIELDS if self.kind == "judge-pairwise" else SCORE_FIELDS
        _check_placeholders(self.prompt, fields, "prompt", fields)
        return self

    @property
    def fields(self) -> tuple[str, ...]:
        return PAIRWISE_FIELDS if self.kind == "judge-pairwise" else SCORE_FIELDS

    def render(self, **values: str) -> str:
        """Fill the judge prompt in one pass; raises KeyError for a missing value."""
        return fill(self.prompt, values, self.fields)


Template = CorrectionTemplate | JudgeTemplate


def builtin_templates_dir() -> Path:
    """The templates shipped inside the package (``metaalign_cli/data/templates``)."""
    return Path(str(resources.files("metaalign_cli") / "data" / "templates"))


def load_template_file(path: str | Path) -> Template:
    """Load and validate one template YAML file (kind ``correction``, ``judge-pairwise`` or
    ``judge-score``). Raises ConfigError naming the file and the key or YAML line."""
    path = Path(path)
    data = load_yaml_mapping(path, "template file")
    data.setdefault("name", path.stem)
    data.setdefault("kind", "correction")
    cls = CorrectionTemplate if data["kind"] == "correction" else JudgeTemplate
    unknown = [k for k in data if k not in cls.model_fields or k == "source"]
    if unknown:
        raise ConfigError(f"{key_where(path, unknown[0])} unknown key '{unknown[0]}'")
    try:
        return cls(**data, source=str(path))
    except ValidationError as e:
        raise schema_error(path, e) from None


def _kind_of(path: Path) -> str | None:
    """The ``kind`` a template file declares (``correction`` when it declares none), or None
    when it does not load (it is then left out of the names offered)."""
    try:
        return str(load_yaml_mapping(path, "template").get("kind", "correction"))
    except ConfigError:
        return None


def load_template(name_or_path: str, dirs: tuple[str | Path, ...] = (),
                  kind: str | None = None) -> Template:
    """A template by name (searched in ``dirs``, then ``$METAALIGN_HOME/templates``, then the
    built-in set) or by path to a YAML file. ``kind`` checks the template's kind.

    Raises UnknownNameError (with the known names) or ConfigError.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"{p}: template file not found")
        tpl = load_template_file(p)
    else:
        from metaalign_cli.objectives import user_objectives_dir

        search = [Path(d) for d in dirs] + [user_objectives_dir().parent / "templates",
                                             builtin_templates_dir()]
        tpl = None
        for d in search:
            for ext in (".yaml", ".yml"):
                f = d / f"{name_or_path}{ext}"
                if f.is_file():
                    tpl = load_template_file(f)
                    break
            if tpl is not None:
                break
        if tpl is None:
            known = sorted({f.stem for d in search if d.is_dir() for f in d.glob("*.y*ml")
                            if kind is None or _kind_of(f) == kind})
            what = f"{kind} template" if kind else "template"
            close = difflib.get_close_matches(str(name_or_path).lower(), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UnknownNameError(f"unknown {what} '{name_or_path}'{hint} (known: {', '.join(known) or 'none'})")
    if kind is not None and tpl.kind != kind:
        raise ConfigError(f"{tpl.source}: template '{tpl.name}' is of kind '{tpl.kind}', expected '{kind}'")
    return tpl


def dialogue_to_text(turns: list[tuple[str, str]]) -> str:
    """Render (role, content) turns the HH-RLHF way: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``,
    ending with ``"\\n\\nAssistant:"`` after the last user turn (as in the reference samples).
    A system turn (or OpenAI's ``developer`` turn, its newer name) is kept as
    ``"\\n\\nSystem: ..."``."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System", "developer": "System"}
    out = []
    for role, content in turns:
        out.append(f"\n\n{names.get(role, role.capitalize())}: {content}")
    out.append("\n\nAssistant:")
    return "".join(out)
