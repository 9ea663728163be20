"""Does a reply answer what was asked? Checked before a reply is split among callers.

A prompt list (or a chat batch) is answered with choice ``index = prompt_i * n + j``; the
batcher hands each caller the choices of its prompt. A server, or a proxy in front of one,
that mishandles lists (answers only the first prompt, numbers every choice 0, drops the
``index``, ends a stream early, reports usage that does not add up) would otherwise hand a
caller another caller's text, or an empty or short text, as a success. So a reply is split
only when it carries exactly the choices asked for, each once; else ``ReplyMismatchError``
names what was expected and what came (the batcher then re-sends each member alone).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence

from .errors import ReplyMismatchError
from .models import CompletionResult, Usage

if TYPE_CHECKING:
    from ._core.endpoint import Endpoint

__all__ = ["check_choices", "check_usage_adds_up", "describe_indexes", "note_list_mismatch",
           "share_tokens"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")


def describe_indexes(indexes: Iterable[int], want: int) -> str:
    """What came, in words: the count, and which indexes were missing, repeated or extra."""
    seen = list(indexes)
    counts = Counter(seen)
    parts = [f"{len(seen)} choice{'s' if len(seen) != 1 else ''}"]
    missing = [i for i in range(want) if i not in counts]
    repeated = sorted(i for i, k in counts.items() if k > 1)
    extra = sorted(i for i in counts if not 0 <= i < want)
    if missing:
        parts.append("missing " + _short(missing))
    if repeated:
        parts.append("repeated " + _short(repeated))
    if extra:
        parts.append("out of range " + _short(extra))
    return ", ".join(parts)


def _short(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return f"index {shown}" + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")


def check_choices(result: CompletionResult, prompts: int, n: int) -> None:
    """``result`` must carry choices ``0 .. prompts * n - 1``, each once; in a list reply
    (``prompts`` > 1) each must also be finished (a ``finish_reason``): an unfinished
    choice in a complete reply is a truncated answer. Raises ``ReplyMismatchError``."""
    want = prompts * n
    indexes = [c.index for c in result.choices]
    if len(indexes) != want or sorted(indexes) != list(range(want)):
        raise ReplyMismatchError(
            f"the reply does not answer the {prompts} prompt{'s' if prompts != 1 else ''} "
            f"x n={n} asked for", expected=f"choices 0..{want - 1}, each once",
            received=describe_indexes(indexes, want))
    if prompts > 1:
        unfinished = [c.index for c in result.choices if c.finish_reason is None]
        if unfinished:
            raise ReplyMismatchError(
                "a prompt list's reply has unfinished choices",
                expected="a finish_reason on every choice",
                received="none on " + _short(unfinished))


def check_usage_adds_up(parts_in: List[int], parts_out: List[int], total: Usage,
                        what: str = "the reply") -> None:
    """The members' token counts (each reported by the server per prompt) must add up to
    the call's ``usage`` when the server reported one: else the per-prompt counts (and so
    the split) cannot be trusted."""
    if not _reported(total):
        return
    ins, outs = sum(parts_in), sum(parts_out)
    if ins != total.prompt_tokens or outs != total.completion_tokens:
        raise ReplyMismatchError(
            f"the per-prompt usage of {what} does not add up to its total",
            expected=f"prompt_tokens {total.prompt_tokens}, completion_tokens "
                     f"{total.completion_tokens}",
            received=f"prompt_tokens {ins}, completion_tokens {outs} summed over the prompts")


def _reported(usage: Optional[Usage]) -> bool:
    return usage is not None and bool(usage.prompt_tokens or usage.completion_tokens
                                       or usage.total_tokens)


def note_list_mismatch(endpoint: "Endpoint", metrics: Any, model: Optional[str],
                       exc: ReplyMismatchError) -> None:
    """A shared call's reply did not match: count it; unless ``batch_prompt_lists`` forces
    sharing, the endpoint stops sharing calls, said once at WARNING. (Streams and complete
    requests both land here.)"""
    metrics.record_batch_mismatch(endpoint.id, model)
    if endpoint.settings.batch_prompt_lists is None and endpoint.list_sharing_ok:
        endpoint.list_sharing_ok = False
        log.warning("endpoint %s answered a shared prompt-list call with a reply that does not "
                    "match it (%s); its callers were re-sent alone, and calls to it are no "
                    "longer shared (set batch_prompt_lists=True to force sharing)",
                    endpoint.id, exc)


def share_tokens(total: int, count: int) -> List[int]:
    """Split an integer total over ``count`` callers so the parts add up exactly."""
    base, rest = divmod(total, count)
    return [base + (1 if i < rest else 0) for i in range(count)]
