"""Errors that carry where bad input came from, so the CLI can print one clear line."""

from __future__ import annotations


class MetaAlignError(Exception):
    """Base class of every error metaalign raises on purpose (the CLI exits 2 on these)."""


class InputError(MetaAlignError):
    """Bad input: names the source (file or '<stdin>'), 1-based line and field when known.

    ``str(err)`` is one line: ``"<source>:<line>: field '<field>': <message>"``.
    """

    def __init__(self, message: str, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.source is not None:
            where = str(self.source)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        fld = f"field '{self.field}': " if self.field else ""
        return f"{where}{fld}{self.message}".replace("\n", " ")


class ConfigError(MetaAlignError):
    """A YAML objective, template or config file that does not validate (names file and key)."""


class UnknownNameError(MetaAlignError):
    """An unknown objective/template/backend name; the message lists the closest known names."""
