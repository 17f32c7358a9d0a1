"""`--resume`: one check, for `correct` and `judge`, that an output file's rows were made by
the same run settings as the new run's, so one file never mixes two models' answers."""

from __future__ import annotations

from typing import Any


def _show(v: Any) -> str:
    """A provenance value as the user wrote it (``none`` rather than Python's ``None``)."""
    if v is None:
        return "none"
    return repr(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def provenance_mismatch(then: dict, now: dict) -> str | None:
    """The first difference between the provenance recorded in an output file (``then``) and
    the new run's (``now``), over ``now``'s keys, as ``"<key> <then> there, <now> now"``; None
    when they agree. A key absent from either side counts as none (so an older file, which did
    not record a key, still matches a run that has none); nested dicts (generation settings)
    are compared key by key and named ``<key>.<sub>``."""
    for key, v in now.items():
        old = then.get(key)
        if isinstance(v, dict) and isinstance(old, dict):
            for sub in sorted(set(v) | set(old)):
                if old.get(sub) != v.get(sub):
                    return f"{key}.{sub} {_show(old.get(sub))} there, {_show(v.get(sub))} now"
        elif old != v:
            return f"{key} {_show(old)} there, {_show(v)} now"
    return None
