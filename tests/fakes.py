"""A scripted in-process backend for pipeline tests (bad input, resume, ordering, errors):
deterministic answers, no model. Real models and servers are tested elsewhere."""

from __future__ import annotations

import hashlib

from pydantic import Field

from metaalign_cli.backends.base import Backend, BackendError, BackendOptions, Generation, GenerationSettings, Prompt


class ScriptedOptions(BackendOptions):
    n_ctx: int = Field(4096, ge=16, description="Context tokens (whitespace-separated words count as tokens).")
    answer: str | None = Field(None, description="Answer every prompt with this text (default: a digest of it).")


class ScriptedBackend(Backend):
    """Answers ``"fixed-<8 hex of the prompt>"`` (or ``answer``), one "token" per word. A
    prompt containing ``FAIL`` fails with a BackendError; ``NULL`` gives a Generation whose
    text is None (a server answering ``"text": null``); ``EMPTY`` an empty text; ``LONG``
    ``max_new_tokens`` words, finish reason ``length``; ``ECHO`` ``"ECHO | Edit: Hello!"`` (the
    template's edit label written out); ``LOOP`` a looping text, finish reason ``loop``. Every
    call's prompts are recorded in ``ScriptedBackend.calls`` and each construction (a model load) counts
    in ``ScriptedBackend.loads`` (class attributes, reset per test)."""

    name = "scripted"
    local = True
    Options = ScriptedOptions
    calls: list[list[str]] = []
    loads: int = 0

    def __init__(self, model: str | None, n_ctx: int = 4096, answer: str | None = None):
        ScriptedBackend.loads += 1
        self.model_id = model or "scripted-model"
        self.n_ctx = n_ctx
        self.answer = answer

    def context_length(self) -> int:
        return self.n_ctx

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(prompt.text.split())

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        ScriptedBackend.calls.append([p.text for p in prompts])
        out: list[Generation | Exception] = []
        for p in prompts:
            if "FAIL" in p.text:
                out.append(BackendError("scripted failure"))
                continue
            if "NULL" in p.text:
                out.append(Generation(None, 1, 0, "stop"))  # type: ignore[arg-type]
                continue
            if "LOOP" in p.text:  # stopped by the loop guard, as a backend cuts it: mid-word
                text = "Sure. I can help with that. I can help with that. I can help with that. I can he"
                out.append(Generation(text, self.count_prompt_tokens(p), len(text.split()), "loop"))
                continue
            if "ECHO" in p.text:  # echoes the answer, then writes the template's edit label and an edit
                out.append(Generation("ECHO | Edit: Hello!", self.count_prompt_tokens(p), 4, "stop"))
                continue
            if "LONG" in p.text:  # runs to the cap
                out.append(Generation(" ".join(["long"] * settings.max_new_tokens), self.count_prompt_tokens(p),
                                      settings.max_new_tokens, "length"))
                continue
            text = "" if "EMPTY" in p.text else (self.answer or "fixed-" + hashlib.sha1(p.text.encode()).hexdigest()[:8])
            out.append(Generation(text, self.count_prompt_tokens(p), len(text.split()), "stop"))
        return out

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "n_ctx": self.n_ctx}
