"""Reading the YAML files users edit (objectives, templates, train configs) with errors that
name the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml

from metaalign_cli.errors import ConfigError


def load_yaml_mapping(path: str | Path, what: str, empty_ok: bool = False) -> dict:
    """``yaml.safe_load`` of ``path``, which must hold a mapping (``{}`` for an empty file
    when ``empty_ok``). ``what`` names the kind of file in messages ("objective file").

    Raises ConfigError: unreadable file, invalid UTF-8, invalid YAML (with its line), or not
    a mapping.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: {what} is not valid UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{line} invalid YAML: {problem}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ConfigError(f"{p}: {article} {what} must be a YAML mapping")
    return data
