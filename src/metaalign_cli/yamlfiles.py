"""Reading the YAML files users edit (objectives, templates, train configs) with errors that
name the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from metaalign_cli.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import ValidationError


def load_yaml_mapping(path: str | Path, what: str, empty_ok: bool = False) -> dict:
    """``yaml.safe_load`` of ``path``, which must hold a mapping (``{}`` for an empty file
    when ``empty_ok``). ``what`` names the kind of file in messages ("objective file").

    Raises ConfigError: unreadable file, invalid UTF-8, invalid YAML (with its line), or not
    a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: {what} is not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where, why = yaml_error_where(e, text)
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}{why}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ConfigError(f"{p}: {article} {what} must be a YAML mapping")
    return data


def yaml_error_where(e: "yaml.YAMLError", text: str) -> tuple[str, str]:
    """Where a YAML error in ``text`` is: ``(" line N:", "")``, or ``("", "")`` without a
    position. An error at the end of the file (an unclosed quote or bracket) names the last line
    and, as the second item, what was being read and the line it began on (PyYAML's own mark
    is the empty line after the last newline)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return "", ""
    if mark.index < len(text.rstrip()):
        return f" line {mark.line + 1}:", ""
    last = text.rstrip().count("\n") + 1
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    began = f" {ctx.removeprefix('while ').replace('scanning', 'in').replace('parsing', 'in')} begun on line " \
            f"{cmark.line + 1}" if ctx and cmark is not None else ""
    return f" line {last}:", f" (the file ends{began})"


def key_where(path: str | Path, key: str) -> str:
    """``"<path>: line N:"`` for the top-level ``key`` of the YAML mapping in ``path``, or
    ``"<path>:"`` when the file does not hold that key (or cannot be read)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        node = None
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return f"{path}: line {k.start_mark.line + 1}:"
    return f"{path}:"


def schema_error(path: str | Path, e: "ValidationError", allowed: str = "") -> ConfigError:
    """One line for the first problem pydantic found in the YAML file ``path``: the file, the
    key's line when the file holds the key, the key and what is wrong
    (``t.yaml: line 3: key 'kind': Input should be ...``, ``t.yaml: missing key 'template'``).
    ``allowed`` is appended to an unknown key's message."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc)
    msg = err["msg"].replace("Value error, ", "")
    if err.get("input", "") is None and err["type"].endswith("_type"):  # `key:` with nothing after it
        msg = "no value given"
    if err["type"] == "missing":
        return ConfigError(f"{path}: missing key '{key}'")
    where = key_where(path, loc[0]) if loc else f"{path}:"
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{where} unknown key '{key}'{allowed}")
    return ConfigError(f"{where} key '{key}': {msg}" if loc else f"{where} {msg}")
