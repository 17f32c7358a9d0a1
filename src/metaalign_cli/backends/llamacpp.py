"""llama.cpp backend (llama-cpp-python): quantized GGUF models on the local CPU (or GPU)."""

from __future__ import annotations

import os
from pathlib import Path

from metaalign_cli.backends.base import Backend, Generation, GenerationSettings, Prompt, is_looping
from metaalign_cli.errors import MetaAlignError


class LlamaCppBackend(Backend):
    """A GGUF model through llama-cpp-python.

    Options: ``n_ctx`` (context tokens, default 4096), ``threads`` (default: all cores, not
    llama.cpp's single thread), ``n_gpu_layers`` (0 = CPU), ``lora_path`` (a GGUF LoRA
    adapter), ``seed``. Chat prompts are formatted with the GGUF's own
    ``tokenizer.chat_template`` so prompt token counts are exact. Sequences are decoded one
    after another (llama-cpp-python's high-level API decodes one sequence at a time).

    Raises MetaAlignError when the file is missing or cannot be loaded.
    """

    name = "llama-cpp"

    def __init__(self, model: str | None, n_ctx: int = 4096, threads: int | None = None,
                 n_gpu_layers: int = 0, lora_path: str | None = None, seed: int = 0, **_ignored):
        from metaalign_cli.backends import default_model_path

        path = Path(model) if model else default_model_path()
        if not path.is_file():
            raise MetaAlignError(f"{path}: GGUF model file not found")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MetaAlignError("the llama-cpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        self.threads = threads or os.cpu_count() or 1
        self.model_id = str(path)
        self.options = {"n_ctx": n_ctx, "threads": self.threads, "n_gpu_layers": n_gpu_layers,
                        "lora_path": lora_path}
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self.threads,
                             n_threads_batch=self.threads, n_gpu_layers=n_gpu_layers,
                             lora_path=lora_path, seed=seed, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise MetaAlignError(f"{path}: cannot load GGUF model: {e}") from None
        self._formatter = None
        tpl = self.llm.metadata.get("tokenizer.chat_template")
        if tpl:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def tok_text(tid: int) -> str:
                return self.llm._model.token_get_text(tid) if tid != -1 else ""

            self._formatter = Jinja2ChatFormatter(
                template=tpl, eos_token=tok_text(self.llm.token_eos()),
                bos_token=tok_text(self.llm.token_bos()), stop_token_ids=[self.llm.token_eos()])

    def context_length(self) -> int:
        return self.llm.n_ctx()

    def _tokens(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        if not prompt.chat:
            return self.llm.tokenize(prompt.text.encode("utf-8"), add_bos=True, special=False), []
        if self._formatter is None:
            raise MetaAlignError(f"{self.model_id}: this GGUF has no chat template; use a raw-prompt template")
        res = self._formatter(messages=prompt.messages())
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        text = res.prompt
        # The template may already start with BOS; llama.cpp would add a second one.
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        bos = self.llm.token_bos()
        if len(toks) > 1 and toks[0] == bos and toks[1] == bos:
            toks = toks[1:]
        return toks, stop

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._tokens(prompt)[0])

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        out: list[Generation | Exception] = []
        for p in prompts:
            try:
                toks, stop = self._tokens(p)
                looped = []
                criteria = None
                if settings.loop_guard:
                    from llama_cpp import StoppingCriteriaList

                    start = len(toks)

                    def guard(ids, _logits, start=start, looped=looped):
                        gen = ids[start:]
                        if len(gen) % 8 == 0 and is_looping(gen):
                            looped.append(True)
                            return True
                        return False

                    criteria = StoppingCriteriaList([guard])
                r = self.llm.create_completion(
                    prompt=toks, max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p,
                    top_k=settings.top_k, min_p=0.0, repeat_penalty=settings.repeat_penalty,
                    seed=settings.seed, stop=list(settings.stop) + stop or None,
                    stopping_criteria=criteria)
                ch = r["choices"][0]
                out.append(Generation(ch["text"], r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"],
                                      "loop" if looped else ch.get("finish_reason")))
            except Exception as e:  # one failed prompt never takes another's result
                out.append(e)
        return out

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, **{k: v for k, v in self.options.items() if v}}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
