"""The transports' private parts: how bytes move, behind the one seam (``transport.py``:
``AsyncTransport``, the public door, with ``ThreadedTransport`` and ``RequestsTransport``).

``aio.py``: ``AioTransport``, the default transport (aiohttp; one session per endpoint and
event loop; proxies and ``trust_env`` by aiohttp's own support); ``headers.py``: the header
check and ``Headers``, a reply's case-insensitive headers; ``tls.py``: TLS trust from
``verify_tls`` / ``ca_bundle``; ``framing.py``: the framing rules and the
``max_response_bytes`` cap every transport enforces. The public modules beside
``transport.py`` are ``mock_transport.py`` (``MockTransport``, for unit tests) and ``sse.py``
(SSE decoding).
"""
