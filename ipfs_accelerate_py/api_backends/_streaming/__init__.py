"""Streaming's parts: concurrent compatible streams sharing one prompt-list stream
(``stream_batching.py``), and the hand-over of a stream's chunks between the client's loop
and its caller (``pump.py``). ``TextStream`` and the face, ``stream()``, are in
``streaming.py``; SSE decoding in ``sse.py``.
"""
