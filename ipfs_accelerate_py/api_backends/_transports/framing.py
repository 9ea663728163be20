"""Reply framing rules and the body-size cap, shared by the transports (RFC 9112 section 6).

Why one module: ``AioTransport`` and ``RequestsTransport`` must refuse the same hostile
replies with the same typed errors, so the rules live once:

* ``Content-Length`` must be one decimal number; a list of identical values (``42, 42``,
  or the field sent twice with the same value) is that number (RFC 9110 section 8.6); two
  different values, a sign, or anything that is not a digit is an unrecoverable framing
  error (RFC 9112 section 6.3, rule 5): ``ResponseError``, and the connection is closed.
* With ``Transfer-Encoding`` present, ``Content-Length`` is ignored (6.3 rule 3: chunked
  wins); such a reply is read, but its connection is closed afterwards, never pooled,
  because the disagreement may be a response-splitting attempt.
* The body may not pass ``max_response_bytes``: a declared length over the cap is refused
  before anything is allocated, an undeclared body (chunked or close-delimited) is counted
  as it arrives. Either way ``ResponseTooLargeError``.
"""

from __future__ import annotations

from typing import Optional

from ..errors import ResponseError, ResponseTooLargeError

__all__ = ["NO_CAP", "declared_length", "too_large", "check_size"]

#: The limit of a 2xx stream's total size: none (its SSE events are capped one by one).
NO_CAP = 1 << 62


def declared_length(value: Optional[str], limit: int, status: Optional[int] = None) -> Optional[int]:
    """The length ``Content-Length`` declares (``None`` when absent), checked against ``limit``.

    ``value`` is the field as received, repeated fields joined with ``", "``."""
    if value is None:
        return None
    if value.isascii() and value.isdigit() and len(value) <= 20:  # the usual case: one number
        n = int(value)
        if n > limit:
            raise too_large(limit, f"Content-Length {n}", status)
        return n
    lengths = {v.strip() for v in value.split(",")}
    if len(lengths) != 1:
        raise ResponseError(f"reply has conflicting Content-Length values {value[:80]!r} "
                            "(RFC 9112 section 6.3); the connection was closed",
                            status_code=status)
    text = lengths.pop()
    # str.isdigit accepts non-ASCII digits and int() accepts "+5" and "1_0": be exact.
    if not text or not text.isascii() or not text.isdigit():
        raise ResponseError(f"reply has an invalid Content-Length {value[:80]!r} "
                            "(RFC 9112 section 6.3); the connection was closed",
                            status_code=status)
    if len(text) > 20:  # no int() of a 200 kB number; far above any cap anyway
        raise too_large(limit, f"Content-Length of {len(text)} digits", status)
    n = int(text)
    if n > limit:
        raise too_large(limit, f"Content-Length {n}", status)
    return n


def too_large(limit: int, what: str, status: Optional[int] = None) -> ResponseTooLargeError:
    """The error for a body over ``limit``; ``what`` says what gave it away."""
    return ResponseTooLargeError(
        f"reply body over the max_response_bytes cap of {limit} bytes ({_human(limit)}): "
        f"{what}; the connection was closed. Raise the max_response_bytes setting "
        "(<backend prefix>MAX_RESPONSE_BYTES in the environment) if "
        "replies this large are expected", limit=limit, status_code=status)


def check_size(seen: int, limit: int, status: Optional[int] = None) -> None:
    """Raise once ``seen`` bytes of a body that declared no length pass ``limit``."""
    if seen > limit:
        raise too_large(limit, f"more than {limit} bytes arrived without a Content-Length",
                        status)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"
