"""The double's "model": a fixed pseudo-word vocabulary, a tokenizer, generation and logprobs.

Why it is like this: clients need text and token counts that are deterministic (in prompt,
seed and choice index) and close to the tiny real model's (GPT-2 byte-level pre-tokens), with
no model or tokenizer installed. Nothing here knows about HTTP.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

#: The real tiny model's padded vocabulary size; ``logprobs=-1`` asks for all of it.
VOCAB_SIZE = 3520

_BOS = 1
_IM_START, _IM_END, _NEWLINE = 3, 4, 203
# Fixed ids for the ChatML markers and roles, so /tokenize of messages gives stable ids that
# /detokenize turns back into the template text.
_ROLE_IDS = {"user": 2248, "system": 1900, "assistant": 719, "developer": 1901, "tool": 1902}
_GEN_PROMPT = (_IM_START, _ROLE_IDS["assistant"], _NEWLINE)


def _build_vocab() -> tuple[str, ...]:
    """A fixed table of printable pseudo-word pieces, the same in every process."""
    rng = random.Random(20261125)  # int seeds are stable across Python versions
    syllables = [c + v for c in "bdghkmnprstvyz" for v in "aeiou"]
    pieces: list[str] = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    reserved = {_NEWLINE: "\n", **{i: r for r, i in _ROLE_IDS.items()}}
    seen = set(pieces) | set(reserved.values())
    while len(pieces) < VOCAB_SIZE:
        if len(pieces) in reserved:
            pieces.append(reserved[len(pieces)])
            continue
        if rng.random() < 0.08:
            piece = str(rng.randint(0, 999))
        else:
            piece = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5:
            piece = " " + piece
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return tuple(pieces)


_VOCAB = _build_vocab()
_PIECE_IDS = {p: i for i, p in enumerate(_VOCAB)}
_SPECIAL_IDS = frozenset({0, 1, 2, 3, 4, _NEWLINE, *_ROLE_IDS.values()})
#: Ids the generator may emit: printable, no specials, no newline (like the tiny model).
_GEN_IDS = tuple(i for i in range(VOCAB_SIZE) if i not in _SPECIAL_IDS)
_MASK64 = (1 << 64) - 1


def _piece_id(piece: str) -> int:
    known = _PIECE_IDS.get(piece)
    if known is not None:
        return known
    return _GEN_IDS[zlib.crc32(piece.encode("utf-8")) % len(_GEN_IDS)]


# GPT-2 byte-level pre-tokenization (the tiny model's tokenizer uses it): contractions, words
# with their leading space, digit runs, punctuation runs, whitespace runs. The double counts one
# token per pre-token; the real BPE splits rare words further.
_PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _text_pieces(text: str) -> list[str]:
    return _PRETOKEN.findall(text)


def _text_token_count(text: str, add_bos: bool = True) -> int:
    return len(_PRETOKEN.findall(text)) + (1 if add_bos else 0)


def _content_text(content: Any) -> str:
    """Chat message content as plain text: a string or a list of ``{"type":"text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _chat_token_count(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> int:
    # ChatML: <|im_start|> role \n content <|im_end|> \n per message; 3 more to prompt the reply.
    total = sum(5 + _text_token_count(_content_text(m.get("content")), False) for m in messages)
    return total + (len(_GEN_PROMPT) if add_generation_prompt else 0)


def _token_str(piece: str) -> str:
    """A piece as a byte-level BPE tokenizer prints it (space -> \u0120, newline -> \u010a)."""
    return piece.replace(" ", "\u0120").replace("\n", "\u010a")


def _tokenize_text(text: str, add_bos: bool) -> tuple[list[int], list[str]]:
    pieces = _text_pieces(text)
    ids = [_piece_id(p) for p in pieces]
    strs = [_token_str(p) for p in pieces]
    if add_bos:
        ids.insert(0, _BOS)
        strs.insert(0, _VOCAB[_BOS])
    return ids, strs


def _tokenize_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    for m in messages:
        role = str(m.get("role", "user"))
        ids += [_IM_START, _ROLE_IDS.get(role, _piece_id(role)), _NEWLINE]
        ids.extend(_piece_id(p) for p in _text_pieces(_content_text(m.get("content"))))
        ids += [_IM_END, _NEWLINE]
    strs = [_token_str(_VOCAB[i]) for i in ids]
    # Content pieces print as themselves, not as whatever vocabulary entry their id names.
    pos = 0
    for m in messages:
        pieces = _text_pieces(_content_text(m.get("content")))
        pos += 3
        strs[pos:pos + len(pieces)] = [_token_str(p) for p in pieces]
        pos += len(pieces) + 2
    if add_generation_prompt:
        ids += _GEN_PROMPT
        strs += [_token_str(_VOCAB[i]) for i in _GEN_PROMPT]
    return ids, strs


def _detokenize(ids: Iterable[int]) -> str:
    return "".join(_VOCAB[i] if 0 <= i < VOCAB_SIZE else "" for i in ids)


@dataclass
class _Choice:
    """One generated sequence: its pieces (the last one cut at a stop string) and outcome."""

    pieces: list[str]
    ids: list[int]
    finish_reason: str
    stop_reason: str | None
    logprobs: list[float]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _generate(key: str, max_tokens: int, stop: Sequence[str], min_tokens: int, include_stop: bool) -> _Choice:
    """Deterministic pseudo-sampling: a 64-bit LCG seeded from ``key`` picks each piece."""
    state = (zlib.crc32(key.encode("utf-8")) << 16) ^ 0x9E3779B97F4A7C15
    pieces: list[str] = []
    ids: list[int] = []
    lps: list[float] = []
    text = ""
    n_gen = len(_GEN_IDS)
    for k in range(max_tokens):
        state = (state * 6364136223846793005 + 1442695040888963407) & _MASK64
        tid = _GEN_IDS[(state >> 33) % n_gen]
        piece = _VOCAB[tid]
        ids.append(tid)
        lps.append(-0.25 - ((state >> 12) & 0xFFFF) / 8192.0)
        if stop and k + 1 > min_tokens:
            start = len(text)
            text += piece
            for s in stop:
                if not s:
                    continue
                pos = text.find(s, max(0, start - len(s) + 1))
                if pos >= 0:
                    # The match may begin in an earlier piece: cut every piece at ``end``.
                    end = pos + len(s) if include_stop else pos
                    pieces.append(piece)
                    cut, acc = [], 0
                    for p in pieces:
                        keep = max(0, min(len(p), end - acc))
                        cut.append(p[:keep])
                        acc += len(p)
                    return _Choice(cut, ids, "stop", s, lps)
        else:
            text += piece
        pieces.append(piece)
    return _Choice(pieces, ids, "length", None, lps)


_GEN_INDEX = {tid: i for i, tid in enumerate(_GEN_IDS)}


def _top(tid: int, lp: float, k: int) -> list[tuple[int, float]]:
    out = [(tid, lp)]
    base = _GEN_INDEX.get(tid, 0)
    for j in range(1, k):
        out.append((_GEN_IDS[(base + 7 * j) % len(_GEN_IDS)], lp - 0.5 * j))
    return out


def _prompt_scores(prompt: Sequence[tuple[int, str]], k: int) -> list[list[tuple[int, str, float, int]] | None]:
    """Per prompt position (the first is unscored): the actual token and the ``k`` tokens the
    "model" liked better, as (id, text, logprob, rank), the actual token first, as vLLM lists them."""
    out: list[list[tuple[int, str, float, int]] | None] = [None]
    for pid, text in prompt[1:]:
        lp = -3.0 - (pid % 97) / 16.0
        entries = [(pid, text, lp, k + 1 + pid % 100)]
        base = _GEN_INDEX.get(pid, pid)
        for j in range(1, k + 1):
            alt = _GEN_IDS[(base + 11 * j) % len(_GEN_IDS)]
            entries.append((alt, _VOCAB[alt], -0.5 - 0.25 * j, j))
        out.append(entries)
    return out


def _prompt_logprobs(prompt: Sequence[tuple[int, str]], k: int) -> list[dict[str, dict[str, Any]] | None]:
    """The ``prompt_logprobs`` field vLLM adds when ``echo`` and ``logprobs`` are both set."""
    return [
        None if pos is None else {
            str(tid): {"logprob": lp, "rank": rank, "decoded_token": text} for tid, text, lp, rank in pos
        }
        for pos in _prompt_scores(prompt, k)
    ]


def _completion_logprobs(
    choice: _Choice, first: int, last: int, k: int, offset0: int, prompt: Sequence[tuple[int, str]] | None
) -> dict[str, Any]:
    """The completions ``logprobs`` object for tokens ``first:last`` of a choice (and the
    prompt's tokens before them when echoing)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    off = offset0
    if prompt is not None:
        for (_, text), scores in zip(prompt, _prompt_scores(prompt, k)):
            tokens.append(text)
            offsets.append(off)
            off += len(text)
            token_lps.append(None if scores is None else scores[0][2])
            tops.append(None if scores is None else {t: lp for _, t, lp, _ in scores})
    for i in range(first, last):
        tid, lp = choice.ids[i], choice.logprobs[i]
        tok = _VOCAB[tid]
        tokens.append(tok)
        offsets.append(off)
        off += len(tok)
        token_lps.append(lp)
        tops.append({_VOCAB[t]: v for t, v in _top(tid, lp, max(k, 1))})
    return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def _chat_logprob_entries(choice: _Choice, first: int, last: int, k: int) -> list[dict[str, Any]]:
    entries = []
    for i in range(first, last):
        tid, lp = choice.ids[i], choice.logprobs[i]
        tok = _VOCAB[tid]
        top = [
            {"token": _VOCAB[t], "logprob": v, "bytes": list(_VOCAB[t].encode("utf-8"))} for t, v in _top(tid, lp, k)
        ] if k > 0 else []
        entries.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
    return entries
