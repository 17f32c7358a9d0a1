"""The ``metaalign`` command: a thin Typer layer over the library.

Data goes to stdout, progress and logs to stderr. Exit codes: 0 ok, 1 some records failed,
2 usage or input error. Subcommands live in small ``cli_*`` modules.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from metaalign_cli import __version__
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.cli_common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, cli_errors, console, fail,
                                      check_output, check_quant, load_objective_set, make_backend, model_card,
                                      quiet_libraries, split_names)

app = typer.Typer(
    name="metaalign",
    help="MetaAligner from the command line: correct any model's responses toward objectives you "
         "name, and build data for, train and judge such correctors (Yang et al., NeurIPS 2024).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        print(f"metaalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")):
    """MetaAligner from the command line."""


ObjectivesDir = typer.Option(None, "--objectives-dir", help="Extra directory of objective YAML files (repeatable).")
ObjectiveFile = typer.Option(None, "--objective-file", help="Extra objective YAML file (repeatable).")


@app.command("objectives")
def objectives_cmd(
    objectives: Optional[str] = typer.Option(None, "--objectives", "-O", help="Only these, in this order (comma-separated)."),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="Show the text rendered for this template."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout instead of a table."),
    objectives_dir: Optional[list[Path]] = ObjectivesDir,
    objective_file: Optional[list[Path]] = ObjectiveFile,
):
    """List every objective with its aliases, text and source file."""
    import json

    with cli_errors():
        objset = load_objective_set(objectives_dir, objective_file)
        try:
            objs = objset.resolve(objectives) if objectives else list(objset)
        except ValueError as e:
            raise fail(str(e))
        tname = None
        if template:
            from metaalign_cli.templates import load_template

            tname = load_template(template, kind="correction").name
        if as_json or not sys.stdout.isatty():
            for o in objs:
                print(json.dumps({"name": o.name, "aliases": list(o.aliases), "text": o.render(tname),
                                  "source": o.source}, ensure_ascii=False))
            return
        from rich.table import Table
        from rich.console import Console

        table = Table("name", "aliases", "text" + (f" ({tname})" if tname else ""), "source")
        for o in objs:
            table.add_row(o.name, ", ".join(o.aliases), o.render(tname), o.source)
        Console().print(table)


@app.command("correct")
def correct_cmd(
    input: str = typer.Argument("-", help="Input JSONL or CSV file; '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Output JSONL file; '-' writes stdout."),
    objectives: Optional[str] = typer.Option(None, "--objectives", "-O",
                                             help="Objectives by name or alias, comma-separated, in order (e.g. harmless,helpful)."),
    template: Optional[str] = typer.Option(None, "--template", "-t",
                                           help="Correction template: hh-rlhf, ultrafeedback, imhi, or a YAML path. Default: ultrafeedback (or the trained model's)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="GGUF file, HF directory/hub id, or served model name. Default: embedded SmolLM2-135M demo model."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="llama-cpp, transformers, vllm, openai or anthropic. Default: guessed from --model/--base-url."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server URL (key from $OPENAI_API_KEY)."),
    prompt_format: Optional[str] = typer.Option(None, "--prompt-format", help="raw or chat. Default: the template's (raw), chat for the embedded model."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat prompts."),
    input_format: Optional[str] = typer.Option(None, "--input-format", help="jsonl or csv. Default: csv for *.csv, else jsonl."),
    query_field: Optional[str] = typer.Option(None, "--query-field", help="Field holding the query."),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="Field holding the response to correct."),
    output_field: str = typer.Option("corrected", "--output-field", help="Field for the corrected text."),
    on_error: str = typer.Option("fail", "--on-error", help="fail (stop, exit 2), skip (log, drop) or keep (emit with an 'error' field)."),
    resume: bool = typer.Option(False, "--resume", help="With -o FILE: skip records already in FILE."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Cap on generated tokens (capped at half the context)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0, help="0 = off."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", min=0.01, help="1.0 = none."),
    seed: int = typer.Option(0, "--seed"),
    loop_guard: bool = typer.Option(True, "--loop-guard/--no-loop-guard",
                                    help="Stop a generation whose tail repeats (finish_reason 'loop')."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Records per generation call: one padded batch (transformers), one llama.cpp batch when greedy (llama-cpp)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight (openai/anthropic)."),
    n_ctx: int = typer.Option(4096, "--n-ctx", min=256, help="Context tokens (llama-cpp; at least 256)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (llama-cpp). Default: all cores."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers on the GPU (llama-cpp); -1 = all."),
    lora: Optional[str] = typer.Option(None, "--lora", help="LoRA adapter: a GGUF file (llama-cpp) or a peft directory (vllm)."),
    quant: str = typer.Option("auto", "--quant", help="Re-quantize the GGUF once (cached) before loading (llama-cpp): q8_0, f16, f32 or none. auto = q8_0 for the embedded SmolLM2 (prefills ~1.7x faster than its Q4_1 on CPU), the file as it is otherwise."),
    device: str = typer.Option("auto", "--device", help="auto, cuda, mps or cpu (transformers)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (transformers: bf16 on GPU, fp32 on CPU; vllm: the checkpoint's), bf16, fp16, fp32 (transformers, vllm)."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Seconds one request may take before it is retried (openai/anthropic)."),
    retries: int = typer.Option(4, "--retries", min=0, help="Retries per request, with backoff (openai/anthropic)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="HF directory or hub id of the served model's tokenizer: prompts are fitted to --max-model-len before sending (openai)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=16, help="Context tokens (vllm; openai with --tokenizer). Default: the model's, or what the server lists."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1, help="GPUs one model is split across (vllm)."),
    data_parallel_size: int = typer.Option(1, "--data-parallel-size", min=1, help="Model replicas (vllm; more than 1 needs `vllm serve`, see docs/scale.md)."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", min=0.01, max=1.0, help="Share of GPU memory vLLM may use (vllm)."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching", help="Reuse the KV cache of the prompts' shared opening (vllm)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="mp (one node) or ray (several nodes) (vllm)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="No graph capture or compilation: starts faster, decodes slower (vllm)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    objectives_dir: Optional[list[Path]] = ObjectivesDir,
    objective_file: Optional[list[Path]] = ObjectiveFile,
):
    """Correct responses toward the objectives you name (MetaAligner inference, paper section 3.4).

    Each output line is the input record unchanged plus the corrected text and a 'metaalign'
    provenance object, in input order, written as soon as it is done.
    """
    from metaalign_cli.backends.base import GenerationSettings
    from metaalign_cli.correction import CorrectionOptions, RecordFailed, correct_records
    from metaalign_cli.records import JsonlWriter, done_records, read_records
    from metaalign_cli.templates import load_template

    if on_error not in ("fail", "skip", "keep"):
        raise fail(f"--on-error must be fail, skip or keep, not '{on_error}'")
    if executor not in (None, "mp", "ray"):
        raise fail(f"--executor must be mp or ray, not '{executor}'")
    if prompt_format not in (None, "raw", "chat"):
        raise fail(f"--prompt-format must be raw or chat, not '{prompt_format}'")
    try:
        quant = check_quant(quant)  # before any model loads
    except MetaAlignError as e:
        raise fail(str(e))
    if resume and output == "-":
        raise fail("--resume needs -o FILE")
    if output != "-" and input != "-" and Path(output).resolve() == Path(input).resolve():
        raise fail(f"{output}: the output file is the input file; write to another file")
    check_output(output)
    if not output_field.strip():
        raise fail("--output-field must not be empty")
    if output_field in ("metaalign", "error"):
        raise fail(f"--output-field '{output_field}' is reserved for the provenance object and errors; choose another name")
    if output_field in {f for f in (query_field, response_field) if f}:
        raise fail(f"--output-field '{output_field}' would overwrite the input's query or response field")
    quiet_libraries(quiet)
    with cli_errors():
        from rich.markup import escape

        from metaalign_cli.models import PROMPTED_DEFAULT

        card = model_card(model)
        if model == PROMPTED_DEFAULT:
            model = None  # the embedded SmolLM2, zero-shot through its chat template
        objset = load_objective_set(objectives_dir, objective_file)
        objs = objset.resolve(objectives) if split_names(objectives) else None
        tpl = load_template(template or card.get("template") or "ultrafeedback", kind="correction")
        if prompt_format is None:
            prompt_format = card.get("prompt_format") or ("chat" if model is None and backend in (None, "llama-cpp") and not lora else None)
        if model is None and card == {} and lora is None and not quiet:
            console.print("[dim]using the embedded demo model SmolLM2-135M-Instruct, prompted zero-shot "
                          "(tiny; see README for a trained corrector)[/]")
        elif model is None and card and not quiet:
            console.print(f"[dim]using the installed default corrector ({escape(card.get('lora') or card['gguf'])})[/]")
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, repeat_penalty=repeat_penalty, seed=seed,
                                      loop_guard=loop_guard)
        opts = CorrectionOptions(template=tpl, objective_set=objset, objectives=objs, settings=settings,
                                 prompt_format=prompt_format, system=system, query_field=query_field,
                                 response_field=response_field, output_field=output_field,
                                 on_error=on_error, batch_size=batch_size)
        records = read_records(input, input_format)
        done = done_records(output, output_field) if resume else None
        skip, failed_before = (done.keys, done.kept_failures) if done else (None, 0)
        # A trained corrector's directory may hold a GGUF export (and GGUF LoRA) for llama.cpp;
        # the transformers backend loads the HF model at the top of the directory instead.
        use_gguf = bool(card.get("gguf")) and backend in (None, "llama-cpp")
        model_arg = card["gguf"] if use_gguf else model
        if (model_arg and not use_gguf and not base_url and backend in (None, "llama-cpp", "transformers")
                and Path(model_arg).is_file() and not str(model_arg).lower().endswith(".gguf")):
            raise fail(f"{model_arg}: not a model: give a .gguf file, a model directory, a hub id or an installed "
                       "corrector's name")
        be = make_backend(backend, model_arg, base_url, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, quant=quant,
                          lora_path=lora or (card.get("lora") if use_gguf else None), device=device,
                          dtype=dtype, batch_size=batch_size, concurrency=concurrency, seed=seed,
                          timeout=timeout, retries=retries, tokenizer=tokenizer, max_model_len=max_model_len,
                          tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, prefix_caching=prefix_caching,
                          executor=executor, enforce_eager=enforce_eager)
        if resume:
            from metaalign_cli.correction import resume_mismatch

            why = resume_mismatch(output, be, opts)
            if why:
                be.close()
                raise fail(f"{output}: --resume would mix settings in one file ({why}); "
                           "rerun with the same settings, or write to another file")
        progress = _progress(quiet)
        try:
            with JsonlWriter(output, append=resume) as writer, progress as prog:
                task = prog.add_task("correcting", total=None, tokens=0.0, rps=0.0) if prog else None

                def on_progress(n, toks):
                    if prog:
                        el = max(prog.tasks[0].elapsed or 1e-9, 1e-9)
                        prog.update(task, completed=n, tokens=toks / el, rps=n / el)

                def warn(msg):
                    console.print(f"warning: {msg}", markup=False)

                report = correct_records(records, be, opts, writer, skip, on_progress, warn)
        except RecordFailed as e:
            raise fail(str(e.cause), EXIT_USAGE if e.is_input else EXIT_FAILED)
        except BrokenPipeError:
            # The reader went away (`| head -1`): stop quietly, as Unix filters do.
            _silence_stdout()
            raise typer.Exit(EXIT_OK)
        except OSError as e:
            raise fail(f"{output if output != '-' else '<stdout>'}: cannot write output: {e.strerror or e}")
        finally:
            be.close()
    if not quiet:
        rate = report.written / report.seconds if report.seconds else 0.0
        tps = report.generated_tokens / report.seconds if report.seconds else 0.0
        earlier = f" ({failed_before} of them kept as failed)" if failed_before else ""
        console.print(f"corrected {report.corrected} record(s), {report.failed} failed, "
                      f"{report.resumed} already done{earlier}, {report.truncated} with the query cut to fit the context, "
                      f"{report.looped} stopped in a repetition loop, {report.empty} empty; "
                      f"{rate:.2f} records/s, {tps:.1f} generated tokens/s", markup=False)
    raise typer.Exit(EXIT_FAILED if report.failed or failed_before else EXIT_OK)


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return _NoProgress()
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed} records"),
                    TextColumn("{task.fields[rps]:.2f} records/s"),
                    TextColumn("{task.fields[tokens]:.1f} tokens/s"), TimeElapsedColumn(), console=console)


def _register_subcommands() -> None:
    from metaalign_cli import cli_dataset, cli_judging, cli_training

    for mod in (cli_dataset, cli_training, cli_judging):
        mod.register(app)


_register_subcommands()


def main() -> None:
    """Entry point of the ``metaalign`` executable. A usage error that click finds itself (an
    unknown option, a value out of range) is one line on stderr and exit 2, like ours."""
    try:  # typer >= 0.2x vendors click; older versions use click itself
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    try:
        code = app(standalone_mode=False)
    except UsageError as e:
        if e.format_message():  # (none when no arguments were given: typer has printed the help)
            cmd = e.ctx.command_path if e.ctx is not None else "metaalign"
            fail(f"{e.format_message()} (see '{cmd} --help')")
        code = EXIT_USAGE
    except typer.Abort:  # as click's standalone mode does
        print("Aborted!", file=sys.stderr)
        code = EXIT_FAILED
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
