"""The judge cache: parsed judge answers on disk (SQLite), keyed by what identifies the judge
and the exact prompt. Failures and unparsable answers are never stored."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from metaalign_cli.backends.base import GenerationSettings, Prompt
from metaalign_cli.errors import MetaAlignError


def default_cache_path() -> Path:
    """``$METAALIGN_HOME/cache/judge.sqlite`` when METAALIGN_HOME is set, else
    ``~/.cache/metaalign/judge.sqlite``."""
    from metaalign_cli.correctors import cache_dir

    return cache_dir() / "judge.sqlite"


def cache_key(judge: dict, settings: GenerationSettings, prompt: Prompt) -> str:
    """SHA-256 (hex) of what identifies the judge (``judge``: :meth:`Backend.identity
    <metaalign_cli.backends.base.Backend.identity>`: backend, model, server, LoRA,
    re-quantization, dtype, device), its generation settings and the exact prompt (text,
    chat/raw, system message): two servers, or two weights, never share an answer."""
    payload = json.dumps({"judge": judge, "settings": settings.to_dict(),
                          "prompt": prompt.text, "chat": prompt.chat, "system": prompt.system},
                         ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedAnswer:
    answer: str
    prompt_tokens: int | None
    completion_tokens: int | None


class JudgeCache:
    """Parsed judge answers on disk: one SQLite table in WAL mode, so several runs (and the
    threads of one run) can read and write it at once. The first answer stored for a key is
    kept (``INSERT OR IGNORE``). ``hits``/``misses`` count look-ups. Only answers that
    parsed are ever stored (the caller's job, see :func:`judge_units`)."""

    def __init__(self, path: str | os.PathLike):
        """Open (creating when needed) the cache at ``path``. Raises MetaAlignError when the
        path is a directory, not an SQLite file, or cannot be created."""
        self.path = Path(path)
        if self.path.is_dir():
            raise MetaAlignError(f"{self.path}: --cache is a directory; give a file path")
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA busy_timeout=60000")
            self.conn.execute("CREATE TABLE IF NOT EXISTS judge_answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, "
                              "prompt_tokens INTEGER, completion_tokens INTEGER, model TEXT, created REAL)")
        except (sqlite3.Error, OSError) as e:
            raise MetaAlignError(f"{self.path}: cannot use as the judge cache: {e}") from None
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self.conn.execute("SELECT answer, prompt_tokens, completion_tokens FROM judge_answers WHERE key = ?",
                                    (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return CachedAnswer(*row)

    def contains(self, key: str) -> bool:
        """Look-up that does not touch the hit counters (for ``--dry-run``)."""
        with self._lock:
            return self.conn.execute("SELECT 1 FROM judge_answers WHERE key = ?", (key,)).fetchone() is not None

    def put(self, key: str, answer: str, prompt_tokens: int | None, completion_tokens: int | None,
            model: str = "") -> None:
        """Store a parsed answer. Raises MetaAlignError when the cache cannot be written (a full
        disk): the run stops there, everything judged before it kept."""
        try:
            with self._lock:
                self.conn.execute("INSERT OR IGNORE INTO judge_answers VALUES (?, ?, ?, ?, ?, ?)",
                                  (key, answer, prompt_tokens, completion_tokens, model, time.time()))
        except sqlite3.Error as e:
            raise MetaAlignError(f"{self.path}: cannot write the judge cache: {e} (use --no-cache, or another "
                                 "--cache)") from None

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM judge_answers").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
