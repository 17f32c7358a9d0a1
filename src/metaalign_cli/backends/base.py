"""The one small interface every backend implements (correct, judge and train reuse it)."""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy (temperature 0) by default; no penalties unless asked for.

    ``max_new_tokens``: cap on generated tokens (paper: 1024). ``repeat_penalty`` 1.0 means
    none (llama.cpp's own default of 1.1 is never applied by surprise). ``seed`` fixes sampling.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repeat_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    loop_guard: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class Prompt:
    """What is sent to a model: ``text``, and whether it goes inside the model's chat template
    (``chat=True``, as one user turn after an optional ``system`` turn) or raw."""

    text: str
    chat: bool = False
    system: str | None = None

    def messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.text}]


def tokenizer_prompt_ids(tokenizer, prompt: Prompt, who: str) -> list[int]:
    """The token ids an HF tokenizer (transformers, vLLM, a server's ``--tokenizer``) gives
    ``prompt``: raw text with the model's BOS, as training saw it; a chat prompt through the
    tokenizer's chat template (generation prompt added), which carries its own BOS. Raises
    MetaAlignError naming ``who`` when a chat prompt meets a tokenizer without a chat template."""
    if not prompt.chat:
        return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        from metaalign_cli.errors import MetaAlignError

        raise MetaAlignError(f"{who}: this tokenizer has no chat template; use a raw-prompt template")
    text = tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Generation:
    """A model's answer: ``text``; token counts when the backend knows them; ``finish_reason``
    ``stop`` (EOS or stop string) or ``length`` (hit max_new_tokens)."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)


_NUMBER = re.compile(r"\W*\d+\W*")  # "1", " 12", "3.", "(4)": a list number or a count
_LETTER = re.compile(r"[^\W\d_]")


class TokenKinds:
    """What the loop guard needs to know of a token: 1 if its text is a number (digits with
    punctuation or spaces around them: ``"2."``, ``" 14"``), 2 if it holds a letter, 0 otherwise.
    ``decode`` gives a token's text (a tokenizer's one-token decode; the identity for words);
    answers are cached, so each distinct token is decoded once."""

    def __init__(self, decode: Callable[[Any], str]):
        self.decode = decode
        self._cache: dict = {}

    @classmethod
    def of(cls, tokenizer) -> "TokenKinds":
        """The kinds of a transformers tokenizer's token ids."""
        return cls(lambda t: tokenizer.decode([t]))

    def __call__(self, token) -> int:
        kind = self._cache.get(token)
        if kind is None:
            text = self.decode(token)
            kind = self._cache[token] = 1 if _NUMBER.fullmatch(text) else 2 if _LETTER.search(text) else 0
        return kind


WORDS = TokenKinds(lambda w: w)  # for whitespace-separated words (servers without a tokenizer)


def is_looping(tokens, max_period: int = 64, min_span: int = 48, min_repeats: int = 3,
               kinds: Callable[[Any], int] | None = None) -> bool:
    """True when the end of ``tokens`` (generated token ids) is a loop: the last
    ``max(min_span, min_repeats * p)`` tokens repeat with some period ``p <= max_period``.

    With ``kinds`` (a :class:`TokenKinds` of the tokenizer), tokens that are numbers count as
    equal to each other, so a numbered list whose items repeat (``"1. Boil an egg. 2. Boil an
    egg. 3. ..."``) is a loop too, but only when the shortest repeated unit holds at least three
    tokens with a letter: counting (``"1, 2, 3, ..."``) or a table column of numbers is not a loop.

    Greedy decoding of small correctors often falls into such loops until the token cap; the
    backends stop there and report ``finish_reason == "loop"`` (the loop guard).
    """
    n = len(tokens)
    if n < min_span:
        return False
    tail = list(tokens[-(max(min_span, min_repeats * max_period)):])
    m = len(tail)
    keys = None
    if kinds is not None:
        marks = [kinds(t) for t in tail]
        if 1 in marks:
            keys = [None if k == 1 else t for t, k in zip(tail, marks)]
    for p in range(1, max_period + 1):
        span = max(min_span, min_repeats * p)
        if span > m:
            break
        if all(tail[i] == tail[i - p] for i in range(m - span + p, m)):
            return True
        if keys is not None and all(keys[i] == keys[i - p] for i in range(m - span + p, m)):
            if sum(k == 2 for k in marks[m - p:]) >= 3:
                return True
            keys = None  # the shortest unit decides: its multiples hold more letters, not more words
    return False


_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019\u00bb)\]]*$")
# Words ending in "." that do not end a sentence: list numbers ("2."), initials ("J."),
# common abbreviations.
_NOT_SENTENCE_END = re.compile(r"^(\d+|[A-Za-z]|mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|e\.g|i\.e|no|approx|fig)\.$", re.I)


def _ends_sentence(word: str) -> bool:
    return bool(_SENTENCE_END.search(word)) and not _NOT_SENTENCE_END.match(word)


def trim_loop(text: str, max_period: int = 64) -> str:
    """A generation the loop guard stopped, cut to what it said before it began repeating
    (``correct --on-loop trim``): the text up to the end of the first copy of the unit of
    whitespace-separated words its tail repeats (period <= ``max_period`` words; list numbers
    such as "2." count as equal; the last word may be cut mid-way and is not compared), and
    within that copy back to its last sentence end
    (. ! or ?, closing quotes and brackets included; not list numbers, initials or "e.g."-like
    abbreviations) if it has one. Nothing before the repetition is cut. Text whose tail does not
    repeat word for word is only cut back to its last sentence end; text with none comes back
    as it is.

    Example: ``"I'm glad. I'm happy to help. I'm happy to help. I'm hap"`` -> ``"I'm glad. I'm
    happy to help."``
    """
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    words = [text[a:b] for a, b in spans]
    keys = [None if WORDS(w) == 1 else w for w in words]  # list numbers count as equal
    n = len(words) - 1 if words and not text[-1:].isspace() else len(words)
    best: tuple[int, int] | None = None  # (where the repetition starts, period)
    for p in range(1, min(max_period, n // 2) + 1):
        if any(keys[i] != keys[i + p] for i in range(n - 2 * p, n - p)):
            continue
        i = n - p - 1
        while i >= 0 and keys[i] == keys[i + p]:
            i -= 1
        if best is None or i + 1 < best[0]:
            best = (i + 1, p)
    lo, keep = (best[0], best[0] + best[1]) if best else (0, len(words))
    ends = [j + 1 for j in range(lo, keep) if _ends_sentence(words[j])]
    cut = ends[-1] if ends else keep
    return text[:spans[cut - 1][1]] if cut > 0 else text


def loop_cut(tokens, every: int = 8, kinds: Callable[[Any], int] | None = None) -> int | None:
    """Where the loop guard stops ``tokens`` (a generated sequence): the first length that is a
    multiple of ``every`` whose tail loops (:func:`is_looping`, with ``kinds``), or None. The
    local backends check every 8 tokens while generating; backends that can only look
    afterwards (vLLM, servers) cut there, so a loop ends at the same token everywhere."""
    for n in range(every, len(tokens) + 1, every):
        if is_looping(tokens[:n], kinds=kinds):
            return n
    return None


def weights_fingerprint(paths) -> str | None:
    """A short fingerprint (16 hex digits) of the weight files ``paths`` hold (files, or
    directories: their ``*.safetensors``, ``*.bin`` and ``*.gguf`` files, ``adapter/``'s too):
    the sha256 of each file's size and its first and last MiB. Cheap on a 4 GB GGUF, and two
    trainings written to the same path differ in it, so ``--resume`` and the judge cache can tell
    a retrained corrector installed over the old one from the old one. None when no path is a
    local file or directory (a hub id)."""
    import hashlib
    import os
    from pathlib import Path

    files = []
    for p in paths:
        if not p:
            continue
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for d in (p, p / "adapter") if d.is_dir() for pat in ("*.safetensors", "*.bin", "*.gguf")
                            for f in d.glob(pat))
    if not files:
        return None
    h = hashlib.sha256()
    mib = 1 << 20
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(mib))
            if size > 2 * mib:
                fh.seek(-mib, os.SEEK_END)
                h.update(fh.read(mib))
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


# Load options that change a model's weights (provenance keys): answers made with other values
# are not the same model's, for `--resume` and the judge cache.
WEIGHT_OPTIONS = ("lora_path", "quant", "weights_sha")
# Everything besides backend and model that decides a model's answers: its weights, where it
# runs and how its numbers are computed (issue: fp32/CPU and bf16/GPU answers must not mix).
ANSWER_KEYS = ("base_url", *WEIGHT_OPTIONS, "dtype", "device", "attn_implementation", "batch_size",
               "tensor_parallel_size")


class BackendOptions(BaseModel):
    """The options a backend takes at load time (a pydantic model per backend, ``Backend.Options``):
    every field has a default and a description; a key the backend does not take is refused."""

    model_config = ConfigDict(extra="forbid")


class BackendError(RuntimeError):
    """A backend could not produce a generation for one prompt (after its retries)."""


class Backend(abc.ABC):
    """A text generator. Implementations: ``llama-cpp``, ``transformers``, ``openai``,
    ``anthropic`` (see :func:`metaalign_cli.backends.create_backend`)."""

    name: str = "base"
    model_id: str = ""
    #: The load-time options this backend takes (see :func:`metaalign_cli.backends.create_backend`).
    Options: type[BackendOptions] = BackendOptions
    #: Messages for the user from loading (e.g. a fallback taken); the CLI prints them.
    warnings: tuple[str, ...] = ()
    #: Runs the model in this process: greedy decoding of one prompt gives the same answer every
    #: time (a remote server may batch, shard or change its model between calls).
    local: bool = False

    def context_length(self) -> int | None:
        """Tokens the model can attend to (prompt + generation), or None when unknown."""
        return None

    def count_prompt_tokens(self, prompt: Prompt) -> int | None:
        """Exact token count of ``prompt`` as it will be sent (chat template included), or
        None when the backend cannot know it (remote APIs)."""
        return None

    @abc.abstractmethod
    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        """One result per prompt, in order: a Generation, or the Exception that failed that
        prompt (a failure never takes another prompt's result)."""

    def generate_each(self, prompts: list[Prompt], settings: list[GenerationSettings]) -> list[Generation | Exception]:
        """:meth:`generate` with one settings per prompt (``correct``'s response-scaled caps):
        one result per prompt, in order. Here prompts that share settings go to
        :meth:`generate` together; backends that can mix settings in one call (a server's
        request pool, vLLM's per-prompt sampling parameters) override it."""
        out: list[Generation | Exception] = [RuntimeError("not generated")] * len(prompts)
        groups: dict[GenerationSettings, list[int]] = {}
        for i, st in enumerate(settings):
            groups.setdefault(st, []).append(i)
        for st, idx in groups.items():
            for i, g in zip(idx, self.generate([prompts[i] for i in idx], st)):
                out[i] = g
        return out

    def identity(self) -> dict:
        """What identifies this model's answers: backend, model and the :data:`ANSWER_KEYS` that
        :meth:`info` reports (server, LoRA, re-quantization, dtype, device, batch size...).
        `--resume` refuses to mix two identities in one file; the judge cache is keyed on it."""
        info = self.info()
        return {"backend": self.name, "model": self.model_id,
                **{k: info[k] for k in ANSWER_KEYS if info.get(k) is not None}}

    def info(self) -> dict:
        """Provenance: backend name, model id and load options (never secrets)."""
        return {"backend": self.name, "model": self.model_id}

    def chunk_size(self, batch_size: int, concurrency: int) -> int:
        """How many records the correction pipeline hands :meth:`generate` at once: ``batch_size``
        for local backends (one batch); servers take ``max(batch_size, concurrency)`` so that
        many requests are in flight; vLLM its scheduler's batch (it batches continuously)."""
        return max(1, batch_size)

    def close(self) -> None:
        """Release the model or connections."""
