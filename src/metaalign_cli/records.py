"""Reading and writing records: JSONL/CSV in, JSONL out, with file/line/field in every error.

Each input line becomes a :class:`SourceRecord` holding either the parsed record or the
:class:`~metaalign_cli.errors.InputError` that explains why it could not be parsed, so a
caller can decide per record (``--on-error fail|skip|keep``) and nothing is lost silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from metaalign_cli.errors import InputError
from metaalign_cli.templates import dialogue_to_text

QUERY_FIELDS = ("query", "prompt", "instruction", "question", "input")
RESPONSE_FIELDS = ("response", "answer", "output", "generated_text", "completion")

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (valid in JSON as ``"\\ud800"``, not encodable as
    UTF-8) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)

_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
               list: "array", dict: "object"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``null``, ``number``, ``array``...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)




#: Deepest nesting of arrays and objects a JSON record may have (serde_json's default recursion
#: limit). Python's json and the code that walks a record recurse once per level; a hostile line
#: nested thousands deep would raise RecursionError and stop the whole run (issue 14).
MAX_DEPTH = 128

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def text_too_deep(text: str) -> bool:
    """Whether arrays and objects in the JSON ``text`` nest deeper than :data:`MAX_DEPTH`,
    found without parsing it and without recursion (brackets inside strings do not count).
    Linear in the length; a line with at most MAX_DEPTH opening brackets in all is answered
    at once."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def too_deep(value: Any) -> bool:
    """Whether a parsed JSON value nests deeper than :data:`MAX_DEPTH` (walked with a stack,
    not recursion)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d + 1 > MAX_DEPTH:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def depth_error(source: str, line: int | None) -> InputError:
    """The error of a record nested deeper than :data:`MAX_DEPTH`."""
    return InputError(f"JSON nested deeper than {MAX_DEPTH} levels of arrays and objects", source=source, line=line)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """``parse_float``: a number too large for a double (``1e999``) would come back out as
    ``Infinity``, which is not JSON; it is refused like ``NaN``."""
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text} is out of range (it would be written back as Infinity, not JSON)")
    return v


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook``: a key twice in one object is an error (json would keep the last
    value silently, and the record would not come out unchanged)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


@dataclass
class SourceRecord:
    """One input record: ``line`` is 1-based in ``source``; ``data`` is the parsed mapping,
    or None with ``error`` set. ``warnings`` lists repairs made (e.g. lone surrogates)."""

    source: str
    line: int
    data: dict | None
    error: InputError | None = None
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identity used by ``--resume``: the record's ``id`` when it has one, else its line."""
        if self.data is not None and self.data.get("id") is not None:
            return f"id:{self.data['id']}"
        return f"line:{self.line}"


def _scrub(value: Any, path: str, found: list[str]) -> Any:
    """Replace lone UTF-16 surrogates (valid JSON, invalid Unicode) with U+FFFD. Recurses once
    per level: :func:`read_jsonl` refuses records nested deeper than :data:`MAX_DEPTH` first."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            found.append(path)
            return replace_surrogates(value)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def check_record_id(rec: SourceRecord, field: str = "id") -> Any:
    """The record's id (``rec.data[field]``, or None when it has none); ``--resume`` and the
    judge's alignment key on it. Raises InputError naming the field for an id that is not a
    string or an integer (an object, list, boolean or float)."""
    rid = rec.data.get(field) if rec.data else None
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise InputError(f"expected a string or integer id, got {type(rid).__name__}", rec.source, rec.line, field)
    return rid


def id_problem(records: Iterable[SourceRecord], field: str = "id") -> tuple[SourceRecord, str] | None:
    """The id rule ``judge`` aligns records by: when any record has an id (``field``), every
    record must have one, and no id may be on two records. Returns the first record in line
    order that breaks it, with why ("missing id (...)" or "duplicate id 'a' (first on line 1)"),
    or None. ``judge`` refuses such input with it (:func:`metaalign_cli.judging.items.load_judge_items`),
    ``correct`` warns with it (:func:`id_warning`)."""
    recs = [r for r in records if isinstance(r.data, dict)]
    if not any(r.data.get(field) not in (None, "") for r in recs):
        return None
    seen: dict[str, int] = {}
    for r in recs:
        rid = r.data.get(field)
        if rid in (None, ""):
            return r, "missing id (other records have one: alignment is by id)"
        k = json.dumps(rid)
        if k in seen:
            return r, f"duplicate id {rid!r} (first on line {seen[k]})"
        seen[k] = r.line
    return None


def id_warning(records: Iterable[SourceRecord], field: str = "id") -> str | None:
    """Why ``judge`` would refuse these records' output (:func:`id_problem`), as one line naming
    the record; None when nothing. ``correct`` warns with it before it runs, not after (each
    record is still corrected)."""
    found = id_problem(records, field)
    if found is None:
        return None
    r, why = found
    return (f"{r.source}:{r.line}: {why}: `judge` aligns records by id and will refuse the output "
            "(give each record its own id, or none)")


def messages_warning(records: Iterable[SourceRecord], query_field: str | None = None,
                     response_field: str | None = None) -> str | None:
    """One line when records hold both a ``messages`` list and a response field, which
    :func:`extract_query_response` reads (the ``messages`` are left as they are): the count and
    the first record. None when no record does, or when the fields are named by flags."""
    if query_field or response_field:
        return None
    both = [r for r in records if isinstance(r.data, dict) and "messages" in r.data
            and any(f in r.data for f in RESPONSE_FIELDS)]
    if not both:
        return None
    r = both[0]
    rf = next(f for f in RESPONSE_FIELDS if f in r.data)
    return (f"{r.source}:{r.line}: {len(both)} record(s) hold both 'messages' and '{rf}': the query and "
            f"'{rf}' fields are corrected, not the messages (drop one, or name them with --query-field/"
            "--response-field)")


def source_name(path: str | os.PathLike | None) -> str:
    return "<stdin>" if path in (None, "-") else str(path)


def _open_binary(path: str | os.PathLike | None) -> IO[bytes]:
    if path in (None, "-"):
        if sys.stdin is None or sys.stdin.closed:
            raise InputError("standard input is closed", source="<stdin>")
        return sys.stdin.buffer
    p = Path(path)
    if p.is_dir():
        raise InputError("is a directory, not a file", source=str(p))
    if not p.exists():
        raise InputError("input file not found", source=str(p))
    try:
        if str(p).endswith(".gz"):
            return gzip.open(p, "rb")
        return open(p, "rb")
    except OSError as e:  # unreadable (permissions, a socket...): one line naming the file
        raise read_error(str(p), e) from None


# What reading an input can raise besides decoding: I/O errors, a truncated gzip stream
# (EOFError), a corrupt one (zlib.error; gzip.BadGzipFile is an OSError).
READ_ERRORS = (EOFError, OSError, zlib.error)


def read_error(src: str, e: BaseException) -> InputError:
    """One of :data:`READ_ERRORS` raised while reading input ``src``, as one InputError."""
    if isinstance(e, EOFError):
        return InputError("truncated gzip stream (the file ends early)", source=src)
    if isinstance(e, (zlib.error, gzip.BadGzipFile)):
        return InputError(f"not a valid gzip file: {e}", source=src)
    return InputError(f"cannot read input: {getattr(e, 'strerror', None) or e}", source=src)


def _raw_lines(fh: IO[bytes], src: str) -> Iterator[bytes]:
    """The lines of ``fh``; :data:`READ_ERRORS` become InputError (see :func:`read_error`)."""
    while True:
        try:
            raw = fh.readline()
        except READ_ERRORS as e:
            raise read_error(src, e) from None
        if not raw:
            return
        yield raw


# Bytes that are not UTF-8, as decoding with errors="surrogateescape" keeps them (U+DC80-U+DCFF).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_MARK = "\uf8ff"  # a private-use character standing in for the first bad byte


def _byte_message(value: str, at: int, escaped: str, what: str = "the field") -> str:
    """"invalid UTF-8 (byte 0x.. after N bytes of <what>)" for the bad byte ``escaped`` (its
    surrogateescape character) found at index ``at`` of ``value``."""
    before = len(value[:at].encode("utf-8", "surrogateescape"))
    return f"invalid UTF-8 (byte 0x{ord(escaped) - 0xDC00:02x} after {before} bytes of {what})"


def _find_mark(value: Any, path: str) -> tuple[str, str] | None:
    """(field path, string) of the first string in a parsed record holding ``_MARK``."""
    if isinstance(value, str):
        return (path, value) if _MARK in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _find_mark(v, f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{k}" if path else str(k)))
        if found:
            return found
    return None


def _utf8_error(raw: bytes, e: UnicodeDecodeError, src: str, lineno: int) -> InputError:
    """The error for a JSONL line that is not UTF-8, naming the field that holds the first bad
    byte when the line is otherwise valid JSON (else the byte offset in the line)."""
    text = raw.decode("utf-8", "surrogateescape")
    m = _ESCAPED_BYTE.search(text)
    if m is not None and _MARK not in text and not text_too_deep(text):
        try:
            found = _find_mark(json.loads(text[:m.start()] + _MARK + text[m.end():]), "")
        except ValueError:
            found = None
        if found:
            field_path, value = found
            return InputError(_byte_message(value, value.index(_MARK), m.group()), source=src, line=lineno,
                              field=field_path)
    return InputError(f"invalid UTF-8 at byte {e.start}", source=src, line=lineno)


def read_jsonl(path: str | os.PathLike | None) -> Iterator[SourceRecord]:
    """Yield a :class:`SourceRecord` per non-blank line of a JSONL file (``-``/None: stdin,
    ``.gz``: gzip). Invalid UTF-8, invalid JSON, non-object lines and lines nested deeper
    than :data:`MAX_DEPTH` become records with ``error`` set (so ``--on-error`` applies and
    the lines after them are read); lone surrogates are replaced with U+FFFD and reported in
    ``warnings``."""
    src = source_name(path)
    fh = _open_binary(path)
    try:
        for lineno, raw in enumerate(_raw_lines(fh, src), start=1):
            if not raw.strip():
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors) is not part of the JSON
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # so an error at the end has this line's column
            except UnicodeDecodeError as e:
                yield SourceRecord(src, lineno, None, _utf8_error(raw, e, src, lineno))
                continue
            if text_too_deep(text):
                yield SourceRecord(src, lineno, None, depth_error(src, lineno))
                continue
            try:
                data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                                  object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                yield SourceRecord(src, lineno, None, InputError(
                    "duplicate key in a JSON object (which value is meant?)", source=src, line=lineno, field=e.key))
                continue
            except json.JSONDecodeError as e:
                looks_csv = lineno == 1 and not text.lstrip().startswith(("{", "[")) and ("," in text or "\t" in text)
                hint = " (it looks like CSV: JSONL is read here; an input file in CSV takes --input-format csv)" \
                    if looks_csv else ""
                yield SourceRecord(src, lineno, None, InputError(
                    f"invalid JSON: {e.msg} (column {e.colno}){hint}", source=src, line=lineno))
                continue
            except ValueError as e:
                yield SourceRecord(src, lineno, None, InputError(f"invalid JSON: {e}", source=src, line=lineno))
                continue
            if not isinstance(data, dict):
                yield SourceRecord(src, lineno, None, InputError(
                    f"expected a JSON object, got {json_type(data)}", source=src, line=lineno))
                continue
            found: list[str] = []
            data = _scrub(data, "", found)
            warns = tuple(f"{src}:{lineno}: field '{f}': lone surrogate replaced with U+FFFD" for f in found)
            yield SourceRecord(src, lineno, data, None, warns)
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def _bad_utf8(value: str, what: str = "the field") -> str | None:
    """The message for the first byte of ``value`` that was not UTF-8, or None."""
    m = _ESCAPED_BYTE.search(value)
    return None if m is None else _byte_message(value, m.start(), m.group(), what)


def read_csv(path: str | os.PathLike | None) -> Iterator[SourceRecord]:
    """Yield a :class:`SourceRecord` per CSV row (header row gives the field names; ``line``
    is the line where the row starts; a CRLF inside a quoted cell reads as "\n"). A row with invalid UTF-8, or with more or fewer cells
    than the header, becomes a record with ``error`` set (file, line and field named); the
    other rows are read. Invalid UTF-8 or a repeated name in the header, and CSV the parser
    rejects (strict: a quote never closed, text after a closing quote), fail the whole file
    (InputError naming the line)."""
    src = source_name(path)
    fh = _open_binary(path)
    try:
        try:
            # -sig: a BOM is no header; surrogateescape: a bad byte fails its row, not the file
            text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            reader = csv.reader(text, strict=True)
            header: list[str] | None = None
            prev = 0  # reader.line_num after the previous record: a record starts on prev + 1
            for cells in reader:
                start, prev = prev + 1, reader.line_num
                if not cells:
                    continue  # a blank line is no record (and not the header)
                if header is None:
                    header = cells
                    for i, name in enumerate(header, start=1):
                        bad = _bad_utf8(name, f"column {i}'s name")
                        if bad:
                            raise InputError(f"header: {bad}", source=src, line=start)
                    sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
                    if sep is not None:  # a semicolon-separated export read as one column
                        raise InputError(f"the header is one column {header[0][:60]!r}: the file looks "
                                         f"{'tab' if sep == chr(9) else repr(sep)}-separated; CSV input is "
                                         "comma-separated", source=src, line=start)
                    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
                    if dup is not None:
                        raise InputError(f"the header names column '{dup}' twice", source=src, line=start)
                    continue
                if len(cells) != len(header):
                    yield SourceRecord(src, start, None, InputError(
                        f"row has {len(cells)} field{'s' if len(cells) != 1 else ''}, the header {len(header)}", source=src, line=start))
                    continue
                # a line break inside a quoted cell is "\n", as in JSONL (a Windows export has "\r\n")
                row = dict(zip(header, (c.replace("\r\n", "\n") for c in cells)))
                bad = next(((k, m) for k, v in row.items() if (m := _bad_utf8(v))), None)
                if bad:
                    yield SourceRecord(src, start, None, InputError(bad[1], source=src, line=start, field=bad[0]))
                else:
                    yield SourceRecord(src, start, row)
        except csv.Error as e:
            if "unexpected end of data" in str(e):  # the parser read to the end inside quotes
                raise InputError("invalid CSV: a quoted field in the row that starts here is never closed",
                                 source=src, line=prev + 1) from None
            raise InputError(f"invalid CSV: {e}", source=src, line=reader.line_num) from None
        except READ_ERRORS as e:
            raise read_error(src, e) from None
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def read_records(path: str | os.PathLike | None, input_format: str | None = None) -> Iterator[SourceRecord]:
    """JSONL by default; CSV when ``input_format == 'csv'`` or the path ends in ``.csv``."""
    fmt = input_format or ("csv" if str(path or "").lower().endswith(".csv") else "jsonl")
    if fmt == "csv":
        return read_csv(path)
    if fmt == "jsonl":
        return read_jsonl(path)
    raise InputError(f"unknown input format '{fmt}' (use jsonl or csv)", source=source_name(path))


def text_value(value: Any, source: str | None, line: int | None, field: str, allow_empty: bool = False) -> str:
    """``value`` when it is a string (non-blank unless ``allow_empty``); raises InputError
    naming ``source``, ``line`` and ``field`` (a field path such as ``completions[1].response``)
    otherwise."""
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {json_type(value)}", source, line, field)
    if not allow_empty and not value.strip():
        raise InputError("empty text", source, line, field)
    return value


def string_field(rec: SourceRecord, name: str, allow_empty: bool = False) -> str:
    """``rec.data[name]`` as a string; raises InputError (source, line, field) when it is not a
    string, or is blank and ``allow_empty`` is False (see :func:`text_value`)."""
    return text_value(rec.data[name], rec.source, rec.line, name, allow_empty)


def extract_query_response(rec: SourceRecord, query_field: str | None = None,
                           response_field: str | None = None) -> tuple[str, str]:
    """(question, response) of a record.

    Query: ``query_field`` or the first of :data:`QUERY_FIELDS`; response: ``response_field``
    or the first of :data:`RESPONSE_FIELDS`; or an OpenAI-style ``messages`` list whose last
    turn must be the assistant's (the response) and whose earlier turns, system included,
    become the context, rendered ``"\\n\\nHuman: ...\\n\\nAssistant:"`` (HH-RLHF).

    Raises InputError naming source, line and field (missing, non-string, empty, bad turns).
    """
    assert rec.data is not None
    d = rec.data
    if query_field is None and response_field is None and "messages" in d and not any(
            f in d for f in RESPONSE_FIELDS):
        return _from_messages(rec)
    qf = query_field or next((f for f in QUERY_FIELDS if f in d), None)
    rf = response_field or next((f for f in RESPONSE_FIELDS if f in d), None)
    if rf is None or rf not in d:
        raise InputError(f"missing response{_fields_hint(d, '--response-field')}", rec.source, rec.line,
                         rf or "/".join(RESPONSE_FIELDS))
    if qf is None or qf not in d:
        raise InputError(f"missing query{_fields_hint(d, '--query-field')}", rec.source, rec.line,
                         qf or "/".join(QUERY_FIELDS))
    return string_field(rec, qf), string_field(rec, rf)


def _fields_hint(d: dict, flag: str) -> str:
    """`` (the record has: a, b; name yours with --query-field)``: what a record missing a field
    holds instead (the first 8 keys), so a file with other names says how to read it."""
    keys = [str(k) for k in d][:8]
    more = ", ..." if len(d) > 8 else ""
    return f" (the record has: {', '.join(keys)}{more}; name yours with {flag})" if keys else " (the record is {})"


#: The turn roles a ``messages`` record may hold (any case): OpenAI's chat roles without tool
#: turns, which have no text to correct against. ``developer`` is ``system``'s newer name.
TURN_ROLES = ("user", "assistant", "system", "developer")


def _from_messages(rec: SourceRecord) -> tuple[str, str]:
    msgs = rec.data["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise InputError("expected a non-empty list of {role, content} turns", rec.source, rec.line, "messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), (str, list)):
            raise InputError("each turn needs a string 'role' and a 'content' string or list of content parts",
                             rec.source, rec.line, f"messages[{i}]")
        role = m["role"].lower()
        if role not in TURN_ROLES:
            import difflib

            near = difflib.get_close_matches(role, TURN_ROLES, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise InputError(f"unknown role '{m['role']}' (use {', '.join(TURN_ROLES)}){hint}",
                             rec.source, rec.line, f"messages[{i}].role")
        turns.append((role, _content_text(m["content"], rec, f"messages[{i}].content")))
    role, content = turns[-1]
    if role != "assistant":
        raise InputError(f"last turn is '{role}', not 'assistant': no response to correct",
                         rec.source, rec.line, f"messages[{len(turns) - 1}].role")
    if not content.strip():
        raise InputError("empty text", rec.source, rec.line, f"messages[{len(turns) - 1}].content")
    context = turns[:-1]
    if not any(r == "user" for r, _ in context):
        raise InputError("no user turn before the response", rec.source, rec.line, "messages")
    return dialogue_to_text(context), content


def _content_text(content: str | list, rec: SourceRecord, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of content parts, whose ``text`` parts are
    joined with newlines (as OpenAI-compatible servers such as vLLM do). Raises InputError for
    an empty list or a part that is not text (an image cannot be corrected)."""
    if isinstance(content, str):
        return content
    if not content:
        raise InputError("empty list of content parts", rec.source, rec.line, where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else json_type(part)
            raise InputError(f"only text content parts can be read, got {kind!r}", rec.source, rec.line,
                             f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def dumps(record: dict) -> str:
    """One JSONL line (no newline): UTF-8 text kept as is (``ensure_ascii=False``). Input
    records are scrubbed of lone surrogates when read (:func:`_scrub`), server answers when
    received (:func:`metaalign_cli.backends.server.guard_remote`)."""
    return json.dumps(record, ensure_ascii=False)


class JsonlWriter:
    """Writes one whole line per record and flushes, so a kill never leaves a half line.

    ``path`` None or ``-`` writes to stdout; ``append`` continues an existing file (resume),
    first cutting off a partial last line left by a kill.
    """

    def __init__(self, path: str | os.PathLike | None, append: bool = False):
        self.path = None if path in (None, "-") else Path(path)
        if self.path is None:
            if sys.stdout is None or sys.stdout.closed:
                raise InputError("standard output is closed", source="<stdout>")
            self.fh = sys.stdout
        else:
            try:
                if self.path.is_dir():
                    raise IsADirectoryError(21, "is a directory")
                if append and self.path.exists():
                    _truncate_partial_line(self.path)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.path, "a" if append else "w", encoding="utf-8", newline="\n")
            except OSError as e:
                raise InputError(f"cannot write output: {e.strerror or e}", source=str(self.path)) from None
        self.count = 0

    def write(self, record: dict) -> None:
        self.fh.write(dumps(record) + "\n")
        self.fh.flush()
        self.count += 1

    def close(self) -> None:
        if self.path is not None:
            self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_partial_line(path: Path) -> None:
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            fh.seek(cut)
            fh.truncate()


def output_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or None when it does not parse) for each complete line of an
    output file, for `--resume`; a partial last line (a killed run's) is not read.

    Raises InputError for a path that is not a regular file (a device such as /dev/full
    would be read forever)."""
    if not Path(path).is_file():
        raise InputError("--resume continues a file metaalign wrote; this is not a regular file", source=str(path))
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                continue  # a blank line is no record
            try:
                yield lineno, json.loads(raw)
            except (ValueError, RecursionError):  # (nested too deep for Python's parser: not ours)
                yield lineno, None


@dataclass
class DoneRecords:
    """What an output file already holds, for ``--resume``: ``keys``, how many records of
    each key (``id:<id>`` or ``line:<n>``; a count, so repeated ids resume correctly), and
    ``failed_lines``, the output lines of records an earlier ``--on-error keep`` run kept as
    failed (an ``error`` field and our provenance object, no output field), and of rows whose
    output field is not a text (null, an edited file's number). Those are not done:
    a failure is never kept as a result, so ``--resume`` drops those lines
    (:func:`drop_lines`) and redoes the records, and :func:`restore_input_order` puts the
    finished file back in input order."""

    keys: Counter[str]
    failed_lines: list[int] = dc_field(default_factory=list)
    source: str = ""  # the output file
    rows: dict[str, list[tuple[str, int]]] = dc_field(default_factory=dict)  # key -> (input_digest, output line)

    @property
    def kept_failures(self) -> int:
        """How many records the earlier run kept as failed (redone by this run)."""
        return len(self.failed_lines)


def text_sha(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text`` (UTF-8): what ``--resume`` compares when a
    name alone does not say what was sent (a template's or an objective's edited text, an input
    record, a judged pair's texts)."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_digest(data: dict, output_field: str = "corrected", key_field: str = "metaalign") -> str:
    """:func:`text_sha` of an input record as it is echoed in an output row: the record without
    the fields a run adds (``output_field``, ``key_field``, ``error``), so an output row and the
    input record it was made from give the same digest (what ``--resume`` checks)."""
    rest = {k: v for k, v in data.items() if k not in (output_field, key_field, "error")}
    return text_sha(json.dumps(rest, sort_keys=True, ensure_ascii=False))


def done_records(path: str | os.PathLike, output_field: str = "corrected",
                 key_field: str = "metaalign") -> DoneRecords:
    """Read an output file once for ``--resume`` (see :class:`DoneRecords`); an absent file
    holds nothing. Only complete lines count; a partial last line is ignored.

    Raises InputError when a complete line is not a JSON object: the file is not our output.
    """
    p = Path(path)
    done = DoneRecords(Counter(), source=str(p))
    if not p.exists():
        return done
    for lineno, rec in output_records(p):
        if not isinstance(rec, dict):
            raise InputError("not a JSONL record: --resume only continues a file metaalign wrote",
                             source=str(p), line=lineno)
        if not isinstance(rec.get(key_field), dict):
            raise InputError(f"no '{key_field}' provenance object: --resume only continues a file metaalign wrote "
                             "(is -o the input file?)", source=str(p), line=lineno)
        if ("error" in rec and output_field not in rec) or not isinstance(rec.get(output_field), str):
            done.failed_lines.append(lineno)  # not done (a failure, or no correction text): redone
            continue
        key = None
        if rec.get("id") is not None:
            key = f"id:{rec['id']}"
        else:
            line = (rec.get(key_field) or {}).get("input_line")
            if line is not None:
                key = f"line:{line}"
        if key is not None:
            done.keys[key] += 1
            done.rows.setdefault(key, []).append((input_digest(rec, output_field, key_field), lineno))
    return done


def _rewrite(path: Path, lines: list[bytes]) -> None:
    """Replace ``path`` by ``lines`` at once (a temporary file beside it, then ``os.replace``):
    a kill leaves either the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def drop_lines(path: str | os.PathLike, lines: Iterable[int]) -> None:
    """Remove the (1-based) ``lines`` from the output file ``path`` (a partial last line, a
    killed run's, goes too), replacing the file at once. Used by ``--resume`` for the records an
    earlier run kept as failed, which it redoes."""
    drop = set(lines)
    if not drop:
        return
    p = Path(path)
    with open(p, "rb") as fh:
        keep = [raw for n, raw in enumerate(fh, start=1) if n not in drop and raw.endswith(b"\n")]
    _rewrite(p, keep)


def restore_input_order(path: str | os.PathLike, key_field: str = "metaalign") -> bool:
    """Put the output file ``path`` back in input order when records redone by ``--resume``
    were appended after later ones: a stable sort of its lines by the provenance's
    ``input_line``. Nothing is rewritten when the file is already in order, or when a line has
    no ``input_line`` (not ours to reorder). Returns True when the file was rewritten."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        raws = [raw for raw in fh if raw.strip()]
    at: list[int] = []
    for raw in raws:
        try:
            line = json.loads(raw).get(key_field, {}).get("input_line")
        except (ValueError, AttributeError, RecursionError):
            return False
        if not isinstance(line, int) or not raw.endswith(b"\n"):
            return False
        at.append(line)
    if all(a <= b for a, b in zip(at, at[1:])):
        return False
    order = sorted(range(len(raws)), key=lambda i: at[i])
    _rewrite(p, [raws[i] for i in order])
    return True
