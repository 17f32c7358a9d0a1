"""Secrets never recorded: URLs as they may be written into outputs, logs and summaries."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters that carry credentials (compared in lower case, '-' and '_' alike).
# A name that ends in one of these is a secret (``x-api-key``, ``subscription-key``, ``private_key``).
_SECRET_PARAMS = re.compile(r"(key|token|auth|authorization|password|passwd|pwd|secret|sig|signature|code|credential"
                            r"|credentials|session)$", re.IGNORECASE)
MASK = "REDACTED"


def redact_url(url: str | None) -> str | None:
    """``url`` with its credentials masked: the ``user:password@`` part dropped and the value
    of every query parameter that names a secret (``api-key``, ``key``, ``token``,
    ``password``, ``sig``...) replaced by ``REDACTED``. Anything that does not parse as a URL
    is returned with every ``user:password@`` pattern masked. None stays None."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return _mask_query_text(re.sub(r"//[^/@\s]*@", "//", url))
    if not parts.netloc:  # no scheme: 'user:password@host/v1' parses as a scheme and a path
        return _mask_query_text(re.sub(r"^[^/@\s]*@", "", re.sub(r"//[^/@\s]*@", "//", url)))
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe=MASK)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_query_text(text: str) -> str:
    """Secret query parameters masked in text that does not parse as a URL (``?api-key=K`` ->
    ``?api-key=REDACTED``)."""
    return re.sub(r"([?&;])([^=&#?;]*)=([^&#;]*)",
                  lambda m: f"{m.group(1)}{m.group(2)}={MASK if _SECRET_PARAMS.search(m.group(2)) else m.group(3)}",
                  text)


# An Authorization header's credentials quoted in a server's error text.
_AUTH_HEADER = re.compile(r"\b(Bearer|Basic|Token)(\s+)[A-Za-z0-9._~+/=:-]{6,}", re.IGNORECASE)


def url_secrets(url: str | None) -> list[str]:
    """The secret values a ``url`` carries, as a server may quote them back: its
    ``user:password@`` part (as written and base64-encoded, as an HTTP Basic header sends it),
    the password alone, and the value of every query parameter that names a secret."""
    if not url:
        return []
    import base64
    from urllib.parse import unquote

    out: list[str] = []
    try:
        parts = urlsplit(url if "//" in url else "//" + url)
    except ValueError:
        return []
    if "@" in parts.netloc:
        cred = parts.netloc.rsplit("@", 1)[0]
        password = unquote(cred).partition(":")[2]
        out += [cred, unquote(cred), base64.b64encode(unquote(cred).encode()).decode(), password]
    out += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAMS.search(k)]
    return [s for s in out if s]


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` (an error message, a server's answer to a failed request) with every secret
    masked: each value of ``secrets`` (an API key, :func:`url_secrets` of the base URL) of at
    least 4 characters, wherever it stands, and the credentials of any quoted ``Bearer``,
    ``Basic`` or ``Token`` authorization. Longer secrets are masked first."""
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
