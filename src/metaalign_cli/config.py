"""Every knob of every command, declared once (TRL's config-class pattern).

A command's knobs are the fields of one dataclass: :class:`CorrectConfig`,
:class:`JudgeConfig`, :class:`BuildConfig` (and ``training.TrainConfig``). Each field carries
its help text, default, allowed values and range in its metadata (:func:`opt`); the CLI's
options are generated from those fields (:mod:`metaalign_cli.cli_spec`), a YAML file with the
same keys can set any of them (``--config FILE``; flags override it), and the library takes
the same object (``run_correct(CorrectConfig(...))``).

Knobs of one backend (``n_ctx`` for llama-cpp, ``device`` for transformers...) default to
None here: their defaults live once, in the backend's ``Options`` class, and a value given
for a backend that does not take it is an error (:func:`metaalign_cli.models.model_spec`).

Heavy imports never happen here: this module is read for ``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaalign_cli.errors import ConfigError
from metaalign_cli.gguf_types import QUANT_CHOICES

_MISSING = dataclasses.MISSING


def opt(default: Any = None, help: str = "", *, flags: tuple[str, ...] | None = None,
        choices: tuple[str, ...] | None = None, min: float | None = None, max: float | None = None,
        metavar: str | None = None, split: bool = False, argument: bool = False, cli: bool = True,
        backends: dict[str, str] | None = None, forward: bool = False, panel: str | None = None,
        default_factory: Any = _MISSING):
    """A config field with everything the CLI, the YAML loader and the docs need.

    ``flags``: option names (default ``--field-name``; a bool field with ``--x/--no-x`` is an
    on/off pair); ``choices``: allowed values (compared in lower case); ``min``/``max``:
    inclusive range; ``split``: a list given as one comma-separated value (``-O a,b``) rather
    than a repeated option; ``argument``: a positional argument; ``cli=False``: config file and
    library only. ``backends``: the backend option this knob sets, per backend name (e.g.
    ``{"llama-cpp": "n_ctx"}``); a value given for another backend is an error, unless
    ``forward`` (a pipeline knob passed on to the backends that take it). ``panel``: the
    help section.
    """
    meta = {"help": help, "flags": flags, "choices": choices, "min": min, "max": max, "metavar": metavar,
            "split": split, "argument": argument, "cli": cli, "backends": backends or {}, "forward": forward,
            "panel": panel}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def config_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass, in declaration order."""
    return list(dataclasses.fields(cls))


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)  # (resolves every annotation of the class: once per class)


def field_kind(f: dataclasses.Field, cls) -> str:
    """``str``, ``int``, ``float``, ``bool`` or ``list`` (of strings): the value type of a
    config field, from its annotation (``X | None`` counts as X)."""
    t = _type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else t
    if typing.get_origin(base) is list or base is list:
        return "list"
    return {str: "str", int: "int", float: "float", bool: "bool", Path: "str"}.get(base, "str")


def coerce(cls, key: str, value: Any, source: str | None) -> Any:
    """A YAML or CLI value as the field's type (``1e-5`` is a string to YAML 1.1; a list may be
    given comma-separated; an empty comma-separated string is refused). Raises ConfigError
    naming the file and key, or the flag when ``source`` is None (a command-line value)."""
    f = {x.name: x for x in dataclasses.fields(cls)}[key]
    kind = field_kind(f, cls)
    if value is None:
        return None
    try:
        if kind == "list":
            if isinstance(value, str):
                out = [v.strip() for v in value.split(",") if v.strip()]
                if not out:
                    raise ValueError("empty: name at least one (comma-separated), or leave it out")
                return out
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list")
            out: list[str] = []
            for v in value:
                out += [x.strip() for x in str(v).split(",") if x.strip()] if f.metadata.get("split") else [str(v)]
            return out
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError("expected an integer") from None
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError("expected a number") from None
        if isinstance(value, (dict, list)):
            raise ValueError("expected a single value")
        return str(value)
    except (TypeError, ValueError) as e:
        where = f"{source}: key '{key}'" if source is not None else flag_of(cls, key)
        raise ConfigError(f"{where}: {e}: {value!r}") from None


class Invalid(ValueError):
    """A bad value of config key ``key``; :func:`load_config` turns it into a ConfigError that
    names the flag (for values given on the command line) or the file and key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def flag_of(cls, key: str) -> str:
    """The first option name of a config field (``--output-field`` for ``output_field``); an
    argument's metavar (``INPUT``), since it has no option name."""
    f = {x.name: x for x in dataclasses.fields(cls)}[key]
    if f.metadata.get("argument"):
        return f.metadata.get("metavar") or key.upper()
    flags = f.metadata.get("flags")
    return flags[0].split("/")[0] if flags else "--" + key.replace("_", "-")


def check_values(cfg) -> None:
    """Check every field against its ``choices`` and ``min``/``max``; raises :class:`Invalid`."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        m = f.metadata
        values = v if isinstance(v, list) else [v]
        for x in values:
            if m.get("choices") and isinstance(x, str) and x.lower() not in m["choices"]:
                raise Invalid(f.name, f"must be one of {', '.join(m['choices'])}, not {x.lower()!r}")
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                if m.get("min") is not None and x < m["min"]:
                    raise Invalid(f.name, f"must be at least {m['min']}, not {x}")
                if m.get("max") is not None and x > m["max"]:
                    raise Invalid(f.name, f"must be at most {m['max']}, not {x}")


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """A config of class ``cls`` from an optional YAML file (``yaml.safe_load``; every key must
    be a field) with ``overrides`` (CLI flags; None values are ignored) applied on top.

    Choices are lower-cased; ``choices``/ranges are checked, then the class's own
    ``validate()`` when it has one (raising :class:`Invalid`). Raises ConfigError for an
    unreadable file, invalid YAML, an unknown key (the closest known key suggested), a value
    of the wrong type, out of range or not allowed: naming the flag when the value came from
    ``overrides`` (``--quant must be one of ...``), else the file, the key's line and the key
    (``t.yaml: line 3: key 'batch_size': expected an integer: 'x'``).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    data: dict[str, Any] = {}
    src = str(path) if path else "config"
    if path:
        from metaalign_cli.yamlfiles import key_where, load_yaml_mapping

        data.update(load_yaml_mapping(path, "config file", empty_ok=True))

        def where(key: str) -> str:  # "file: line N" of a key the file holds
            return key_where(path, key)[:-1]
    else:
        def where(key: str) -> str:
            return src
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where(str(k))}: unknown key '{k}'{hint}")
    data = {k: coerce(cls, k, v, where(k)) for k, v in data.items()}  # checked even where a flag overrides it
    data.update({k: coerce(cls, k, v, None) for k, v in (overrides or {}).items() if v is not None})
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    for k, v in list(data.items()):
        if meta[k].get("choices") and isinstance(v, str):
            v = v.lower()
        data[k] = v
    cfg = cls(**data)
    try:
        check_values(cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()
        if path and hasattr(cfg, "files"):  # no output may replace the config file either
            check_distinct_files(cfg, *cfg.files(), config=str(path), read_dirs=("objectives_dir",))
    except Invalid as e:
        if not path or (e.key in (overrides or {}) and overrides[e.key] is not None):
            raise ConfigError(f"{flag_of(cls, e.key)} {e.message}") from None
        raise ConfigError(f"{where(e.key)}: key '{e.key}': {e.message}") from None
    return cfg


# ------------------------------------------------------------------------------------ shared knobs

ON_LOOP = ("trim", "keep")
ON_ERROR = ("fail", "skip", "keep")
PROMPT_FORMATS = ("raw", "chat")
INPUT_FORMATS = ("jsonl", "csv")


@dataclass
class ObjectiveFiles:
    """Where objectives come from besides the built-in and user directories."""

    objectives_dir: list[str] = opt([], "Extra directory of objective YAML files (repeatable).", metavar="DIR",
                                    panel="Objectives and templates")
    objective_file: list[str] = opt([], "Extra objective YAML file (repeatable).", metavar="FILE",
                                    panel="Objectives and templates")


@dataclass
class ModelKnobs:
    """The model and backend knobs `correct` and `judge` share (see :func:`metaalign_cli.models.model_spec`)."""

    backend: str | None = opt(None, "llama-cpp, transformers, vllm, openai or anthropic. Default: guessed "
                                    "(.gguf: llama-cpp; --base-url: openai; a directory or hub id: transformers).",
                              flags=("--backend", "-b"), metavar="NAME", panel="Model")
    base_url: str | None = opt(None, "OpenAI-compatible server (vLLM, llama.cpp, Ollama); the key comes from "
                                     "$OPENAI_API_KEY.", metavar="URL", panel="Model")
    n_ctx: int | None = opt(None, "Context tokens.", min=256, metavar="N", backends={"llama-cpp": "n_ctx"},
                            panel="Backend options")
    threads: int | None = opt(None, "CPU threads. Default: the cores other jobs leave idle (cores minus the "
                                    "1-minute load average, at least 1).",
                              min=1, metavar="N", backends={"llama-cpp": "threads"}, panel="Backend options")
    n_gpu_layers: int | None = opt(None, "Layers on the GPU; -1 = all.", min=-1, metavar="N",
                                   backends={"llama-cpp": "n_gpu_layers"}, panel="Backend options")
    quant: str | None = opt(None, "Re-quantize the GGUF once (cached) before loading: q8_0, f16, f32 or none; "
                                  "auto = q8_0 for the embedded SmolLM2 (prefills ~1.7x faster on CPU than its "
                                  "Q4_1), the file as it is otherwise.", choices=QUANT_CHOICES, metavar="TYPE",
                            backends={"llama-cpp": "quant"}, panel="Backend options")
    device: str | None = opt(None, "auto, cuda, mps or cpu.", choices=("auto", "cuda", "mps", "cpu"),
                             metavar="DEVICE", backends={"transformers": "device"}, panel="Backend options")
    dtype: str | None = opt(None, "auto (transformers: bf16 on a GPU with native bf16, fp32 elsewhere; vllm: the "
                                  "checkpoint's), bf16, fp16 or fp32.",
                            choices=("auto", "bf16", "fp16", "fp32"), metavar="DTYPE",
                            backends={"transformers": "dtype", "vllm": "dtype"}, panel="Backend options")
    timeout: float | None = opt(None, "Seconds per API request.", min=0.1, metavar="S",
                                backends={"openai": "timeout", "anthropic": "timeout"}, panel="Backend options")
    api_retries: int | None = opt(None, "Client retries of a failed API request (429, 5xx, timeouts), with "
                                        "exponential backoff honouring Retry-After.", min=0, metavar="N",
                                  backends={"openai": "retries", "anthropic": "retries"}, panel="Backend options")
    tokenizer: str | None = opt(None, "HF directory or hub id of the served model's tokenizer: prompts are fitted to "
                                      "the context before sending and the loop guard counts real tokens.",
                                metavar="PATH", backends={"openai": "tokenizer"}, panel="Backend options")
    max_model_len: int | None = opt(None, "Context tokens (vllm; openai with --tokenizer). Default: the model's, or "
                                          "what the server lists.", min=16, metavar="N",
                                    backends={"vllm": "max_model_len", "openai": "max_model_len"},
                                    panel="Backend options")
    tensor_parallel_size: int | None = opt(None, "GPUs one model is split across (tensor parallelism).", min=1,
                                           metavar="N", backends={"vllm": "tensor_parallel_size"},
                                           panel="Backend options")
    data_parallel_size: int | None = opt(None, "Model replicas (more than 1 needs `vllm serve`; see README, "
                                               "Correcting at scale).", min=1, metavar="N",
                                         backends={"vllm": "data_parallel_size"}, panel="Backend options")
    gpu_memory_utilization: float | None = opt(None, "Share of GPU memory vLLM may use.", min=0.01, max=1.0,
                                               metavar="X", backends={"vllm": "gpu_memory_utilization"},
                                               panel="Backend options")
    prefix_caching: bool | None = opt(None, "Reuse the KV cache of the prompts' shared opening (the template's).",
                                      flags=("--prefix-caching/--no-prefix-caching",),
                                      backends={"vllm": "prefix_caching"}, panel="Backend options")
    executor: str | None = opt(None, "mp (one node) or ray (several nodes).", choices=("mp", "ray"),
                               metavar="NAME", backends={"vllm": "executor"}, panel="Backend options")
    enforce_eager: bool | None = opt(None, "No graph capture or compilation: starts faster, decodes slower.",
                                     flags=("--enforce-eager/--no-enforce-eager",),
                                     backends={"vllm": "enforce_eager"}, panel="Backend options")
    quiet: bool = opt(False, "No progress bar or summary.", flags=("--quiet", "-q"), panel="Output")


@dataclass
class CorrectConfig(ModelKnobs, ObjectiveFiles):
    """Every knob of ``metaalign correct`` (MetaAligner inference, paper section 3.4)."""

    input: str = opt("-", "Input JSONL or CSV file; '-' reads stdin.", argument=True, metavar="INPUT")
    output: str = opt("-", "Output JSONL file; '-' writes stdout.", flags=("--output", "-o"), metavar="FILE",
                      panel="Output")
    objectives: list[str] | None = opt(None, "Objectives by name or alias, comma-separated, in order (e.g. "
                                             "harmless,helpful). A record's own 'objectives' list overrides them.",
                                       flags=("--objectives", "-O"), split=True, metavar="NAMES",
                                       panel="Objectives and templates")
    template: str | None = opt(None, "Correction template: hh-rlhf, ultrafeedback, imhi or a YAML path. Default: "
                                     "the corrector's own, else ultrafeedback.", flags=("--template", "-t"),
                               metavar="NAME", panel="Objectives and templates")
    model: str | None = opt(None, "Corrector: a .gguf file, a `metaalign train` output directory, an HF directory "
                                  "or hub id, an installed corrector's name, `smollm2` (the prompted demo) or a "
                                  "served model name. Default: the installed 'default' corrector, else the shipped "
                                  "one.", flags=("--model", "-m"), metavar="MODEL", panel="Model")
    lora: str | None = opt(None, "LoRA adapter applied to the model: a GGUF file (llama-cpp) or a peft directory "
                                 "(vllm).", metavar="PATH",
                           backends={"llama-cpp": "lora_path", "vllm": "lora_path"}, panel="Backend options")
    prompt_format: str | None = opt(None, "raw or chat. Default: the corrector's, else the template's.",
                                    choices=PROMPT_FORMATS, metavar="FORMAT", panel="Objectives and templates")
    system: str | None = opt(None, "System message for chat prompts.", metavar="TEXT",
                             panel="Objectives and templates")
    input_format: str | None = opt(None, "jsonl or csv. Default: csv for *.csv, else jsonl.", choices=INPUT_FORMATS,
                                   metavar="FORMAT", panel="Input")
    query_field: str | None = opt(None, "Field holding the query. Default: the first of query, prompt, "
                                        "instruction, question, input.", metavar="FIELD", panel="Input")
    response_field: str | None = opt(None, "Field holding the response to correct. Default: the first of "
                                           "response, answer, output, generated_text, completion.",
                                     metavar="FIELD", panel="Input")
    output_field: str = opt("corrected", "Field for the corrected text.", metavar="FIELD", panel="Output")
    on_error: str = opt("fail", "fail (stop: exit 2 for bad input, 1 when a generation failed), skip (log and "
                                "drop) or keep (emit the record with an 'error' field).", choices=ON_ERROR,
                        metavar="POLICY", panel="Output")
    resume: bool = opt(False, "With -o FILE: skip the records already in FILE.", panel="Output")
    overwrite: bool = opt(False, "Replace a non-empty -o FILE (without it, or --resume, the run refuses to).",
                          panel="Output")
    dry_run: bool = opt(False, "Write each record's prompt (id, line, prompt, chat, system, objectives) instead of "
                               "correcting it; no model loads, so the query is not yet cut to fit the context.",
                        panel="Output")
    max_new_tokens: str = opt("auto", "Cap on generated tokens per record: a number, or auto = 64 + 1.5 x the "
                                      "response's tokens, at least 128 and at most 1024 (the paper's cap). Never "
                                      "more than half the context.", metavar="N|auto", panel="Generation")
    temperature: float = opt(0.0, "0 = greedy.", min=0.0, metavar="T", panel="Generation")
    top_p: float = opt(1.0, "Nucleus sampling.", min=0.0, max=1.0, metavar="P", panel="Generation")
    top_k: int = opt(0, "0 = off.", min=0, metavar="K", panel="Generation")
    repeat_penalty: float | None = opt(None, "1.0 = none. Default: the corrector card's generation.repeat_penalty "
                                             "(the shipped corrector's sets one), else 1.0.",
                                       min=0.01, metavar="X", panel="Generation")
    seed: int = opt(0, "Seed of sampling.", metavar="N", backends={"llama-cpp": "seed", "vllm": "seed"}, forward=True,
                    panel="Generation")
    loop_guard: bool = opt(True, "Stop a generation whose tail repeats (finish_reason 'loop').",
                           flags=("--loop-guard/--no-loop-guard",), panel="Generation")
    on_loop: str = opt("trim", "What the output keeps of a generation the loop guard stopped: trim (what it said "
                               "before it began repeating, to its last whole sentence; provenance 'loop_trimmed') "
                               "or keep (the text as the guard cut it).", choices=ON_LOOP, metavar="POLICY",
                       panel="Generation")
    batch_size: int = opt(1, "Records per generation call: one padded batch (transformers), one llama.cpp batch "
                             "when greedy (llama-cpp).", min=1, metavar="N",
                          backends={"transformers": "batch_size"}, forward=True, panel="Generation")
    concurrency: int = opt(4, "Requests in flight (openai, anthropic).", min=1, metavar="N",
                           backends={"openai": "concurrency", "anthropic": "concurrency"}, forward=True,
                           panel="Generation")
    # `correct` retries nothing but API requests, so `--retries` names them (issue 11's name);
    # `judge --retries` is its re-asks after an unparsable answer, hence `--api-retries` there.
    api_retries: int | None = opt(None, "Retries of a failed API request (429, 5xx, timeouts), with exponential "
                                        "backoff honouring Retry-After: a stalled server costs about --timeout x "
                                        "(N + 1) per record.", flags=("--retries", "--api-retries"),
                                  min=0, metavar="N", backends={"openai": "retries", "anthropic": "retries"},
                                  panel="Backend options")

    def validate(self) -> None:
        """Cross-field checks (ranges and choices are checked from the metadata). Raises Invalid."""
        def bad(key: str, msg: str):
            raise Invalid(key, msg)

        if not self.output_field.strip():
            bad("output_field", "must not be empty")
        for key in ("query_field", "response_field"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                bad(key, "must not be empty (leave it out for the default fields)")
        if self.output_field in ("metaalign", "error"):
            bad("output_field", f"'{self.output_field}' is reserved for the provenance object and errors; "
                                "choose another name")
        from metaalign_cli.records import QUERY_FIELDS, RESPONSE_FIELDS

        read = {*((self.query_field,) if self.query_field else QUERY_FIELDS),
                *((self.response_field,) if self.response_field else RESPONSE_FIELDS), "id", "messages"}
        if self.output_field in read:
            bad("output_field", f"'{self.output_field}' would overwrite the input's query, response or id field "
                                f"(read from: {', '.join(sorted(read))}); choose another name")
        if self.resume and self.output == "-":
            bad("resume", "needs -o FILE")
        if self.dry_run and self.resume:
            bad("dry_run", "writes prompts, not corrections: it cannot resume a file of corrections")
        mnt = str(self.max_new_tokens).strip().lower()
        if mnt != "auto" and not (mnt.isdigit() and int(mnt) >= 1):
            bad("max_new_tokens", f"must be a number >= 1 or auto, not {self.max_new_tokens!r}")
        self.max_new_tokens = mnt
        if self.resume and self.overwrite:
            bad("overwrite", "replaces -o FILE and --resume continues it: give one of them")
        check_distinct_files(self, *self.files(), read_dirs=("objectives_dir",))

    def files(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the fields naming files this run reads, those naming files it writes)."""
        return ("input", "objective_file", "template"), ("output",)


def _identity(p: Path) -> tuple:
    """What makes two paths one file: (device, inode) for an existing file, so a hard link or a
    symlink is the file it names; the resolved path for one that does not exist yet."""
    try:
        st = p.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(p.resolve()))


def check_distinct_files(cfg, reads: tuple[str, ...], writes: tuple[str, ...], config: str | None = None,
                         read_dirs: tuple[str, ...] = ()) -> None:
    """Raise :class:`Invalid` when a file a command writes (the fields ``writes`` of ``cfg``) is a
    file it reads (the fields ``reads``, each a path or a list of paths, and the ``--config`` file
    ``config``), lies in a directory it reads objectives from (``read_dirs`` fields, and
    ``$METAALIGN_HOME/objectives``), or is another file it writes: a judge's ``--summary`` given
    the input's name (or a verdict file's) replaced it, ``-o`` with ``--overwrite`` replaced an
    objective, template or config file (a broken objective YAML then stopped every command), and
    ``--blind-tasks`` and ``--blind-key`` on one path left only the key. ``--overwrite``
    replaces an old output, never a file the run reads. Files are compared by device and inode
    (hard links and symlinks are the file they name). ``-`` and unset fields are skipped; a
    template given by name (not a path) is not a file."""
    from metaalign_cli.objectives import user_objectives_dir

    def paths(key: str) -> list[Path]:
        v = getattr(cfg, key)
        vals = v if isinstance(v, (list, tuple)) else [v]
        out = [Path(x) for x in vals if isinstance(x, str) and x not in ("", "-")]
        if key == "template":  # a built-in template's name is no file
            out = [q for q in out if q.suffix in (".yaml", ".yml") or q.exists()]
        return out

    def name(key: str) -> str:
        return "the input file" if key == "input" else "the --config file" if key == "config" else \
            f"the {flag_of(type(cfg), key)} file"

    seen: dict[tuple, str] = {_identity(p): k for k in reads for p in paths(k)}
    if config:
        seen.setdefault(_identity(Path(config)), "config")
    dirs = [(Path(d).resolve(), flag_of(type(cfg), k)) for k in read_dirs for d in (getattr(cfg, k) or [])]
    dirs.append((user_objectives_dir().resolve(), "$METAALIGN_HOME/objectives"))
    stdin = None
    if any(getattr(cfg, k) == "-" for k in reads):
        try:  # `-o FILE < FILE`: standard input is the file to be written
            stdin = os.fstat(0)
        except OSError:
            stdin = None
    for key in writes:
        for p in paths(key):
            shown = p if isinstance(getattr(cfg, key), list) else getattr(cfg, key)
            if stdin is not None and stdin.st_size and p.is_file() and os.path.samestat(stdin, p.stat()):
                raise Invalid(key, f"{shown}: is the file standard input reads; give each output its own file")
            ident = _identity(p)
            if ident in seen:
                other = seen[ident]
                what = name(other) if other in reads or other == "config" else f"also {name(other)}"
                raise Invalid(key, f"{shown}: is {what}; give each output its own file")
            for d, flag in dirs:
                if d in p.resolve().parents and p.suffix in (".yaml", ".yml"):
                    raise Invalid(key, f"{shown}: is in {flag}, where objectives are read from; "
                                       "give each output its own file")
            seen[ident] = key


PAIRWISE, SCORE = "pairwise", "score"


@dataclass
class JudgeConfig(ModelKnobs, ObjectiveFiles):
    """Every knob of ``metaalign judge`` (Algorithm 2 win rates, Appendix E scores)."""

    input: str = opt("-", "JSONL (e.g. what `correct` writes) or CSV; '-' reads stdin.", argument=True,
                     metavar="INPUT")
    output: str = opt("-", "JSONL, one row per judgment; '-' writes stdout.", flags=("--output", "-o"),
                      metavar="FILE", panel="Output")
    mode: str = opt(PAIRWISE, "pairwise (win rate vs the golden, Algorithm 2) or score (0-10, Appendix E).",
                    choices=(PAIRWISE, SCORE), metavar="MODE", panel="Judging")
    objectives: list[str] | None = opt(None, "Objectives to judge on, comma-separated. Default: each record's "
                                             "own (objectives, or metaalign.objectives).",
                                       flags=("--objectives", "-O"), split=True, metavar="NAMES",
                                       panel="Objectives and templates")
    template: str | None = opt(None, "Judge template name or YAML path. Default: judge-pairwise or judge-score.",
                               flags=("--template", "-t"), metavar="NAME", panel="Objectives and templates")
    golden_field: str | None = opt(None, "Field of the golden response. Default: golden, else goldens.",
                                   metavar="FIELD", panel="Input")
    candidate_field: list[str] = opt([], "Candidate field (repeatable; the first is the baseline of the "
                                         "advantage). Default: the original response and 'corrected'.",
                                     metavar="FIELD", panel="Input")
    query_field: str | None = opt(None, "Field holding the query.", metavar="FIELD", panel="Input")
    id_field: str = opt("id", "Record id field (the alignment key); without ids, line numbers are used.",
                        metavar="FIELD", panel="Input")
    input_format: str | None = opt(None, "jsonl or csv. Default: csv for *.csv, else jsonl.", choices=INPUT_FORMATS,
                                   metavar="FORMAT", panel="Input")
    model: str | None = opt(None, "Judge: a served model name, a .gguf file, an HF directory or hub id, or "
                                  "`smollm2`. Default: the embedded SmolLM2 demo model (too small to judge).",
                            flags=("--model", "-m"), metavar="MODEL", panel="Model")
    prompt_format: str | None = opt(None, "chat or raw. Default: the template's (chat).", choices=PROMPT_FORMATS,
                                    metavar="FORMAT", panel="Objectives and templates")
    system: str | None = opt(None, "System message for chat prompts.", metavar="TEXT",
                             panel="Objectives and templates")
    seed: int = opt(0, "Seeds the candidate-position draw (and sampling).", metavar="N",
                    backends={"llama-cpp": "seed", "vllm": "seed"}, forward=True, panel="Judging")
    both_orders: bool = opt(False, "Ask both positions; a disagreement counts as a tie.", panel="Judging")
    retries: int = opt(2, "Re-asks after an unparsable answer (none for a greedy local judge: it would answer the "
                          "same).", min=0, metavar="N", panel="Judging")
    max_invalid: float = opt(0.1, "Exit 1 when the share of invalid judgments is above this.", min=0.0, max=1.0,
                             metavar="X", panel="Judging")
    concurrency: int = opt(4, "Judge calls in flight (openai, anthropic).", min=1, metavar="N",
                           backends={"openai": "concurrency", "anthropic": "concurrency"}, forward=True,
                           panel="Judging")
    batch_size: int = opt(1, "Judge prompts per generation call of a local judge: one llama.cpp batch when greedy, "
                             "one padded batch (transformers); vllm takes its scheduler's batch.", min=1, metavar="N",
                          backends={"transformers": "batch_size"}, forward=True, panel="Judging")
    rpm: float | None = opt(None, "At most this many judge calls per minute.", min=0.0, metavar="N",
                            panel="Judging")
    max_new_tokens: int = opt(16, "Cap on the judge's answer tokens.", min=1, metavar="N", panel="Judging")
    temperature: float = opt(0.0, "0 = greedy.", min=0.0, metavar="T", panel="Judging")
    stop: list[str] = opt([], "Stop string (repeatable), e.g. $'\\n' for raw prompts.", metavar="TEXT",
                          panel="Judging")
    cache: str | None = opt(None, "Judge cache (SQLite). Default: $METAALIGN_HOME/cache/judge.sqlite, else "
                                  "~/.cache/metaalign/judge.sqlite.", metavar="FILE", panel="Output")
    no_cache: bool = opt(False, "Neither read nor write the cache.", panel="Output")
    dry_run: bool = opt(False, "Print the calls, cached calls and estimated input tokens as JSON; call nothing.",
                        panel="Output")
    resume: bool = opt(False, "With -o FILE: keep FILE's rows and judge only what is missing (failed calls are "
                              "asked again).", panel="Output")
    overwrite: bool = opt(False, "Replace a non-empty -o FILE, --blind-tasks or --blind-key file (without it, or "
                                 "--resume for -o, the run refuses to).", panel="Output")
    summary: str | None = opt(None, "Write the summary (win rates, intervals, counts) as JSON.", metavar="FILE",
                              panel="Output")
    plot: str | None = opt(None, "Score mode: a PNG with one histogram panel per objective (needs matplotlib).",
                           metavar="FILE", panel="Output")
    blind_tasks: str | None = opt(None, "Write blind tasks for people or any outside judge (query, RESPONSE 1, "
                                        "RESPONSE 2, one objective; no candidate names; shuffled) to this JSONL "
                                        "file instead of calling a judge; needs --blind-key.", metavar="FILE",
                                  panel="Blind judging")
    blind_key: str | None = opt(None, "The key mapping blind tasks back to records and candidates: written with "
                                      "--blind-tasks, read with --blind-verdicts. Keep it from the judges.",
                                metavar="FILE", panel="Blind judging")
    blind_verdicts: list[str] = opt([], "A JSONL file of verdicts {\"task\", \"verdict\": 1|2|0} (repeatable: one "
                                        "per judge, each judging a disjoint part of the tasks; a task judged twice "
                                        "is refused); with --blind-key it gives the rows and summary an LLM judge "
                                        "would.", metavar="FILE", panel="Blind judging")

    def validate(self) -> None:
        """Cross-field checks. Raises Invalid."""
        def bad(key: str, msg: str):
            raise Invalid(key, msg)

        if self.resume and self.output == "-":
            bad("resume", "needs -o FILE")
        if self.plot and self.mode != SCORE:
            bad("plot", "draws score histograms: use it with --mode score")
        if (self.blind_tasks or self.blind_verdicts) and not self.blind_key:
            bad("blind_tasks" if self.blind_tasks else "blind_verdicts", "needs --blind-key FILE")
        if self.blind_tasks and self.blind_verdicts:
            bad("blind_tasks", "writes tasks and --blind-verdicts reads verdicts: give one of them")
        if self.blind_key and not (self.blind_tasks or self.blind_verdicts):
            bad("blind_key", "goes with --blind-tasks (export) or --blind-verdicts (import)")
        if (self.blind_tasks or self.blind_verdicts) and self.mode != PAIRWISE:
            bad("mode", "must be pairwise for blind tasks and verdicts (a candidate against the golden)")
        if (self.blind_tasks or self.blind_verdicts) and self.resume:
            bad("resume", "continues an LLM judge's calls; a blind import writes every row from the verdicts "
                          "(use --overwrite to replace an earlier import)")
        if self.blind_tasks and (self.output != "-" or self.summary or self.plot):
            bad("output" if self.output != "-" else "summary" if self.summary else "plot",
                "goes with judging or an import: an export writes only --blind-tasks and --blind-key")
        if self.blind_tasks or self.blind_verdicts:
            knobs = ["model", "backend", "base_url"] + [f.name for f in dataclasses.fields(ModelKnobs)
                                                        if f.metadata.get("backends") and f.default is None]
            used = next((k for k in knobs if getattr(self, k, None) is not None), None)
            if used:
                bad(used, "chooses the judge model, and blind tasks and verdicts call none: leave it out")
        if self.dry_run and (self.blind_tasks or self.blind_verdicts):
            bad("dry_run", "previews judge calls, and blind tasks or verdicts call no judge: leave it out")
        if self.resume and self.overwrite:
            bad("overwrite", "replaces -o FILE and --resume continues it: give one of them")
        for key in ("query_field", "golden_field", "id_field"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                bad(key, "must not be empty")
        if any(not c.strip() for c in self.candidate_field):
            bad("candidate_field", "must not be empty")
        if self.golden_field and self.golden_field in self.candidate_field:
            bad("candidate_field", f"'{self.golden_field}' is also --golden-field: a text judged against itself")
        check_distinct_files(self, *self.files(), read_dirs=("objectives_dir",))

    def files(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the fields naming files this run reads, those naming files it writes): the key is
        written by an export and read by an import."""
        if self.blind_verdicts:
            return ("input", "objective_file", "template", "blind_verdicts", "blind_key"), ("output", "summary",
                                                                                          "plot", "cache")
        return ("input", "objective_file", "template"), ("output", "summary", "plot", "blind_tasks", "blind_key",
                                                         "cache")


@dataclass
class BuildConfig(ObjectiveFiles):
    """Every knob of ``metaalign build-data`` (paper Algorithm 1)."""

    inputs: list[str] = opt([], "Input files (.jsonl, .jsonl.gz, .json, .csv); several allowed.", argument=True,
                            metavar="INPUT")
    output: str | None = opt(None, "Output directory (split/stage JSONL files and stats.json).",
                             flags=("--output", "-o"), metavar="DIR", panel="Output")
    format: list[str] = opt([], "Input format: ultrafeedback, scored, pairwise or hh-rlhf (guessed from the fields "
                                "when omitted); add 'sharegpt' (e.g. -f ultrafeedback,sharegpt) to also write "
                                "FastChat conversations.", flags=("--format", "-f"), split=True, metavar="NAMES",
                            panel="Input")
    template: str | None = opt(None, "Correction template rendering the prompts (the same as `correct`'s). "
                                     "Default: hh-rlhf for hh-rlhf input, else ultrafeedback.",
                               flags=("--template", "-t"), metavar="NAME", panel="Objectives and templates")
    objectives: list[str] | None = opt(None, "pairwise/hh-rlhf rows without labels: the objectives the chosen "
                                             "response is better on (hh-rlhf default: harmless). ultrafeedback/"
                                             "scored: use only these.", flags=("--objectives", "-O"), split=True,
                                       metavar="NAMES", panel="Objectives and templates")
    objective_map: list[str] = opt([], "Rename a source aspect or score field: ASPECT=OBJECTIVE (repeatable, or "
                                       "comma-separated).", metavar="A=O", panel="Objectives and templates")
    tie_margin: float = opt(0.0, "Scores within this margin count as equal (scored, ultrafeedback).", min=0.0,
                            metavar="X", panel="Algorithm 1")
    seed: int = opt(0, "Seed of the objective shuffles and the warm-up sample.", metavar="N", panel="Algorithm 1")
    split_seed: int = opt(0, "Seed of the per-query split hash.", metavar="N", panel="Splits")
    warmup_ratio: float = opt(0.1, "Share of equal-preference items copied into the warm-up stage.", min=0.0,
                              max=1.0, metavar="X", panel="Algorithm 1")
    validation_ratio: float = opt(0.05, "Share of queries in the validation split.", min=0.0, max=1.0, metavar="X",
                                  panel="Splits")
    test_ratio: float = opt(0.0, "Share of queries in a test split (0: no test split).", min=0.0, max=1.0,
                            metavar="X", panel="Splits")
    exclude_queries: list[str] = opt([], "CSV/JSONL file (or quoted glob) whose query column lists queries to keep "
                                         "out (repeatable), e.g. the paper's test queries.", metavar="FILE",
                                     panel="Splits")
    exclude_field: str = opt("query", "Column or field of the --exclude-queries files.", metavar="FIELD",
                             panel="Splits")
    tokenizer: str | None = opt(None, "GGUF file or local HF tokenizer directory: report token-length "
                                      "percentiles.", metavar="PATH", panel="Output")
    strict: bool = opt(False, "Stop at the first bad row with a one-line error (exit 2).", panel="Input")
    limit: int | None = opt(None, "Read at most this many rows per input file.", min=1, metavar="N", panel="Input")
    overwrite: bool = opt(False, "Replace the files of an earlier build in --output.", panel="Output")
    quiet: bool = opt(False, "No progress or summary.", flags=("--quiet", "-q"), panel="Output")

    def validate(self) -> None:
        """Cross-field checks. Raises Invalid."""
        if not self.inputs:
            raise Invalid("inputs", "is missing: give at least one input file (metaalign build-data FILE... -o DIR)")
        if not self.output:
            raise Invalid("output", "is required: the output directory")
        if self.validation_ratio + self.test_ratio > 1.0:
            raise Invalid("test_ratio", "+ --validation-ratio must be at most 1")


@dataclass
class ObjectivesConfig(ObjectiveFiles):
    """The knobs of ``metaalign objectives`` (list the objectives and their texts)."""

    objectives: list[str] | None = opt(None, "Only these, in this order (comma-separated).",
                                       flags=("--objectives", "-O"), split=True, metavar="NAMES",
                                       panel="Objectives and templates")
    template: str | None = opt(None, "Show the text rendered for this template.", flags=("--template", "-t"),
                               metavar="NAME", panel="Objectives and templates")
    json: bool = opt(False, "JSON lines on stdout instead of a table (also what a pipe gets).", panel="Output")
