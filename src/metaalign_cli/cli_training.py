"""CLI for ``metaalign train`` and ``metaalign export``: flags -> :mod:`metaalign_cli.training`
and :mod:`metaalign_cli.export`. torch/transformers/trl load inside the commands only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from metaalign_cli.cli_common import cli_errors, console, quiet_libraries


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``export`` to app."""
    app.command("train")(train_cmd)
    app.command("export")(export_cmd)


def train_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any TrainConfig key (see configs/train.yaml); flags override it."),
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", metavar="DIR", help="Output directory of `metaalign build-data` (DIR/train/{warmup,equal,preference}.jsonl); repeatable."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of --data to train on. [default: train]"),
    warmup: Optional[str] = typer.Option(None, "--warmup", help="Warm-up stage JSONL (overrides --data's)."),
    equal: Optional[str] = typer.Option(None, "--equal", help="Equal-preference subset JSONL (overrides --data's)."),
    preference: Optional[str] = typer.Option(None, "--preference", help="Preference subset JSONL (overrides --data's)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", "-m", help="Hub id, HF directory or .gguf file. Default: the embedded SmolLM2-135M-Instruct GGUF."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory. [default: metaaligner-out]"),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="Template the data was rendered with (recorded for `correct`). Default: from the rows."),
    prompt_format: Optional[str] = typer.Option(None, "--prompt-format", help="raw or chat. Default: the template's."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to run, comma-separated. [default: warmup,equal,preference]"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs per stage. [default: 2, Table 5]"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs"),
    equal_epochs: Optional[float] = typer.Option(None, "--equal-epochs"),
    preference_epochs: Optional[float] = typer.Option(None, "--preference-epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on optimizer steps per stage (overrides epochs)."),
    warmup_samples: Optional[int] = typer.Option(None, "--warmup-samples", help="Use at most N warm-up rows."),
    equal_samples: Optional[int] = typer.Option(None, "--equal-samples", help="Use at most N equal-preference rows."),
    preference_samples: Optional[int] = typer.Option(None, "--preference-samples", help="Use at most N preference rows."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", "--learning-rate", help="Peak learning rate. [default: 1e-5, Table 5]"),
    lr_scheduler: Optional[str] = typer.Option(None, "--lr-scheduler", help="[default: cosine]"),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="LR warm-up fraction. [default: 0.05, Table 5]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per device per step. [default: 4]"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps. [default: 1]"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest sequence in tokens; longer ones are dropped. [default: 2048]"),
    truncate: Optional[bool] = typer.Option(None, "--truncate/--no-truncate", help="Truncate over-long sequences instead of dropping them."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, bf16 (autocast, fp32 master weights) or fp32."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    packing: Optional[str] = typer.Option(None, "--packing", help="auto, pack, group or none."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cuda or cpu."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (unset: full fine-tuning)."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha. [default: 2 * r]"),
    lora_target: Optional[str] = typer.Option(None, "--lora-target", help="all-linear or module names, comma-separated."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout"),
    qlora: Optional[bool] = typer.Option(None, "--qlora/--no-qlora", help="4-bit base (bitsandbytes, CUDA only)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="LoRA: save the merged model at the top of the output. [default: merge]"),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N steps. [default: 200]"),
    logging_steps: Optional[int] = typer.Option(None, "--logging-steps"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Experiment trackers to log to: none, or tensorboard, wandb, mlflow, trackio (comma-separated; must be installed). [default: none]"),
    export_gguf: Optional[str] = typer.Option(None, "--export-gguf", help="After training, write GGUF files: f16, q8_0, q4_k_m (comma-separated)."),
    plot: Optional[bool] = typer.Option(None, "--plot/--no-plot", help="Write loss.png in the output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
):
    """Train a MetaAligner corrector: warm-up, equal-preference, then preference stages
    (paper section 3.3, Eq. 6), loss on the target tokens only.

    The output directory holds the model, metaalign.json (template and prompt format, read by
    `metaalign correct --model DIR`), train_config.yaml, metrics.jsonl and checkpoints.
    """
    from metaalign_cli.training import load_train_config

    overrides = dict(
        data_dir=data, split=split, warmup_file=warmup, equal_file=equal, preference_file=preference,
        base_model=base_model, output_dir=output, template=template, prompt_format=prompt_format,
        stages=stages, epochs=epochs, warmup_epochs=warmup_epochs, equal_epochs=equal_epochs,
        preference_epochs=preference_epochs, max_steps=max_steps, warmup_samples=warmup_samples,
        equal_samples=equal_samples, preference_samples=preference_samples, learning_rate=learning_rate,
        lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio, batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_length=max_length, truncate=truncate, seed=seed,
        precision=precision, gradient_checkpointing=gradient_checkpointing, packing=packing, device=device,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_target=lora_target, lora_dropout=lora_dropout, qlora=qlora,
        merge=merge, save_steps=save_steps, logging_steps=logging_steps, report_to=report_to,
        export_gguf=export_gguf, plot=plot)
    with cli_errors():
        cfg = load_train_config(config, overrides)
        quiet_libraries(quiet)
        _quiet_libraries()
        from metaalign_cli.training import train_corrector

        def say(msg: str) -> None:
            if not quiet:
                console.print(msg, markup=False)

        with _TrainProgress(quiet) as prog:
            result = train_corrector(cfg, resume=resume, on_event=prog.event, log=say)
    if not result.main_process:
        return  # another rank of a multi-process run: rank 0 reports
    if not quiet:
        for r in result.reports:
            if r.skipped:
                console.print(f"{r.stage}: skipped ({r.skipped})", markup=False)
            else:
                loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
                console.print(f"{r.stage}: {r.kept} of {r.rows} rows ({r.dropped_too_long} dropped, {r.truncated} "
                              f"truncated), {r.steps} steps, final loss {loss}, {r.seconds:.1f}s", markup=False)
        console.print(f"trained corrector written to {result.output_dir} in {result.seconds:.1f}s "
                      f"(template {result.card['template']}, {result.card['prompt_format']} prompts)", markup=False)
        for q, p in result.gguf.items():
            console.print(f"gguf {q}: {p}", markup=False)
    print(str(result.output_dir))


def export_cmd(
    model_dir: Path = typer.Argument(..., help="A `metaalign train` output directory (or any Llama-family HF directory)."),
    types: str = typer.Option("f16", "--type", help="GGUF types, comma-separated: f16, f32, q8_0, q4_k_m, ..."),
    lora: bool = typer.Option(True, "--lora/--no-lora", help="Also convert DIR/adapter (LoRA runs) to a GGUF LoRA adapter."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the .gguf files. [default: DIR/gguf]"),
    install: Optional[str] = typer.Option(None, "--install", metavar="NAME",
                                          help="Then install the corrector as NAME in $METAALIGN_HOME/models "
                                               "('default' makes it `correct`'s default model)."),
):
    """Convert a trained corrector to GGUF for `correct --backend llama-cpp` (the gguf package
    writes f16/f32; llama-cpp-python's quantize API makes q8_0, q4_k_m...). Updates DIR's
    metaalign.json so `correct --model DIR` then uses the GGUF. With --install NAME, the GGUF
    LoRA adapter (or the GGUF) and its card are copied to $METAALIGN_HOME/models/NAME, so
    `correct --model NAME` (and, for NAME 'default', plain `correct`) uses it."""
    from metaalign_cli.cli_common import split_names

    with cli_errors():
        from metaalign_cli.export import export_gguf
        from metaalign_cli.models import check_name, install_corrector

        if install is not None:
            check_name(install)  # before the (slow) export

        out = export_gguf(model_dir, split_names(types), out_dir=output, lora=lora,
                          log=lambda m: console.print(m, markup=False))
        if install:
            out["installed"] = str(install_corrector(model_dir, install))
    for q, p in out.items():
        print(f"{q}\t{p}")


def _quiet_libraries() -> None:
    """transformers/datasets chatter (progress bars, advisory warnings) off stderr."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "datasets", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


class _TrainProgress:
    """Rich bar per stage on stderr (stage, step/total, loss, target tokens/s, ETA); plain
    one-line logs when stderr is not a terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.prog = None
        self.task = None
        self.stage = None

    def __enter__(self):
        if not self.quiet and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.prog = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), console=console)
            self.prog.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)
        return False

    def event(self, ev: dict) -> None:
        if self.quiet:
            return
        kind = ev["event"]
        if self.prog is not None:
            if kind == "begin":
                self.task = self.prog.add_task(ev["stage"], total=ev["max_steps"], completed=ev["step"],
                                               loss="-", tps="-")
            elif kind == "step" and self.task is not None:
                self.prog.update(self.task, completed=ev["step"])
            elif kind == "log" and self.task is not None:
                self.prog.update(self.task, loss=f"{ev['loss']:.4f}", tps=f"{ev['target_tokens_per_s']:.0f}")
            return
        if kind == "begin":
            console.print(f"{ev['stage']}: training {ev['max_steps']} steps", markup=False)
        elif kind == "log":
            console.print(f"{ev['stage']} step {ev['step']}/{ev['max_steps']} loss {ev['loss']:.4f} "
                          f"lr {ev['lr']:.2e} {ev['target_tokens_per_s']:.0f} target tok/s", markup=False)
