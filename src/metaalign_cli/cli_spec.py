"""Typer commands generated from the config dataclasses of :mod:`metaalign_cli.config`.

Every option of ``correct``, ``judge``, ``build-data`` and ``train`` comes from one config
field (name, flags, help, default, choices, range), so a knob is declared once and the CLI,
the YAML config files and the library cannot drift. Options default to None here: a value
the user did not give is filled in from the config class, so "given on the command line" is
always known. Help is plain text grouped in sections that read well at 80 columns.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand

from metaalign_cli.config import config_fields, field_kind

CONFIG_PANEL = "Config file"
#: Help sections, in this order (others after them, in field order).
PANELS = ("Input", "Data", "Objectives and templates", "Model", "Backend options", "Generation", "Judging",
          "Blind judging", "Algorithm 1", "Splits", "Optimisation", "Precision and memory", "LoRA",
          "Checkpoints, logs, export", "Output", "Run", CONFIG_PANEL, "Options")


class SectionedCommand(TyperCommand):
    """A Typer command whose help lists arguments, then options in sections (the config
    fields' ``panel``), each option as ``--name METAVAR`` with its help wrapped beside it."""

    def format_options(self, ctx, formatter) -> None:
        args, sections = [], {}
        for param in self.get_params(ctx):
            f = _BACKEND_OPTIONS.get((_COMMAND_CLASS.get(self.name), param.name))
            if f is not None and not getattr(param, "backend_defaults_shown", False):
                # per-backend defaults: read (importing every backend) only when help is printed
                param.help = (param.help or "") + _backend_default_text(f)
                param.backend_defaults_shown = True
            if param.param_type_name == "argument":
                args.append(((param.metavar or param.name.upper()), getattr(param, "help", "") or ""))
                continue
            rv = param.get_help_record(ctx)
            if rv is not None:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(rv)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        rank = {p: i for i, p in enumerate(PANELS)}
        for name, rows in sorted(sections.items(), key=lambda kv: rank.get(kv[0], len(PANELS) - 1)):
            with formatter.section(name):
                formatter.write_dl(rows)


def _backend_default_text(f: dataclasses.Field) -> str:
    """`` [llama-cpp; default 4096 | transformers, vllm]`` for a backend option field: which
    backends take it, with each one's default (imports every backend module, so it is called
    only when help is printed)."""
    from metaalign_cli.backends import option_default

    by_default: dict = {}
    for backend, name in f.metadata["backends"].items():
        by_default.setdefault(option_default(backend, name), []).append(backend)
    parts = [", ".join(b) + ("" if d in (None, "") else f"; default {d}") for d, b in by_default.items()]
    return f" [{' | '.join(parts)}]"


#: Backend option fields by (config class, parameter name), whose help gets each backend's
#: default at help time; and each command's config class.
_BACKEND_OPTIONS: dict[tuple[type, str], dataclasses.Field] = {}
_COMMAND_CLASS: dict[str, type] = {}


def _is_backend_option(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("backends")) and not f.metadata.get("forward")


def _default_text(f: dataclasses.Field, cls) -> str:
    """``[default: X]`` for a field whose default says something (not None, False or []);
    backend options get theirs at help time (:func:`_backend_default_text`)."""
    if _is_backend_option(f):
        _BACKEND_OPTIONS[(cls, f.name)] = f
        return ""
    d = f.default
    if d is dataclasses.MISSING or d is None or d is False or d == []:
        return ""
    if d is True:
        return " [default: on]"
    return f" [default: {d}]"


def _parameter(f: dataclasses.Field, cls) -> inspect.Parameter:
    m = f.metadata
    kind = field_kind(f, cls)
    helptext = m["help"] + _default_text(f, cls)
    if m.get("argument"):
        if kind == "list":
            ann = Annotated[list[str], typer.Argument(help=helptext, metavar=m.get("metavar"), show_default=False)]
            return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=ann)
        ann = Annotated[Optional[str], typer.Argument(help=helptext, metavar=m.get("metavar"), show_default=False)]
        return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=ann)
    flags = m.get("flags") or ("--" + f.name.replace("_", "-"),)
    common: dict[str, Any] = dict(help=helptext, show_default=False, rich_help_panel=m.get("panel"))
    if kind == "bool":
        typ: Any = Optional[bool]
    elif kind == "list" and not m.get("split"):
        typ = Optional[list[str]]
        common["metavar"] = m.get("metavar")
    else:
        typ = Optional[{"int": int, "float": float}.get(kind, str)]
        common["metavar"] = m.get("metavar")
        if kind in ("int", "float"):
            if m.get("min") is not None:
                common["min"] = m["min"]
            if m.get("max") is not None:
                common["max"] = m["max"]
    ann = Annotated[typ, typer.Option(*flags, **common)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)


def flag(name: str, *decls: str, help: str) -> inspect.Parameter:
    """An on/off option that is not a config knob (``train --resume``): ``given[name]`` is
    True when set."""
    ann = Annotated[Optional[bool], typer.Option(*decls, help=help, show_default=False, rich_help_panel="Run")]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)


def config_command(cls, handler: Callable[[Any, dict], Any], doc: str,
                   extras: tuple[inspect.Parameter, ...] = ()) -> Callable[..., Any]:
    """A function Typer can register as a command: one option per CLI field of ``cls`` (see
    :func:`metaalign_cli.config.opt`), ``extras`` (see :func:`flag`) and ``--config/-c FILE``;
    when called it builds the config with :func:`metaalign_cli.config.load_config` (YAML file,
    then the flags given; a bad file, key or value is a one-line error, exit 2) and calls
    ``handler(config, given)``, ``given`` holding the values set on the command line (extras
    included)."""
    fields = [f for f in config_fields(cls) if f.metadata.get("cli", True)]
    params = [_parameter(f, cls) for f in fields] + list(extras)
    extra_names = {p.name for p in extras}
    cfg_ann = Annotated[Optional[str], typer.Option("--config", "-c", metavar="FILE", show_default=False,
                                                     rich_help_panel=CONFIG_PANEL,
                                                     help="YAML file setting any of these options (keys are the "
                                                          "option names with '_' for '-'); flags override it.")]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=cfg_ann))
    # Arguments first, as Python requires positional-or-keyword parameters before keyword-only ones.
    params.sort(key=lambda p: p.kind)

    def command(**values):
        from metaalign_cli.cli_common import cli_errors
        from metaalign_cli.config import load_config

        path = values.pop("config", None)
        given = {k: v for k, v in values.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
        with cli_errors():
            cfg = load_config(cls, path, {k: v for k, v in given.items() if k not in extra_names})
        return handler(cfg, given)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = cls.__name__.removesuffix("Config").lower() + "_cmd"
    return command


def register(app: typer.Typer, name: str, cls, handler: Callable[[Any, dict], Any], doc: str, short: str,
             extras: tuple[inspect.Parameter, ...] = ()) -> None:
    """Add command ``name`` to ``app``, generated from config class ``cls`` (see
    :func:`config_command`); ``short`` is its line in ``metaalign --help``."""
    _COMMAND_CLASS[name] = cls
    app.command(name, cls=SectionedCommand, short_help=short)(config_command(cls, handler, doc, extras))
