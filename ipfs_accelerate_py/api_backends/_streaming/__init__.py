"""Streaming's parts: the opening of a streamed reply that both faces and the shared streams
use (``opening.py``: ``StreamOpener``), concurrent compatible streams sharing one prompt-list
stream (``stream_batching.py``: ``SharedStreams``), and the hand-over of a stream's chunks between the client's loop
and its caller (``pump.py``). ``TextStream`` and the face, ``stream()``, are in
``streaming.py``; SSE decoding in ``sse.py``.
"""
