"""The request pipeline's parts, each with its dependencies handed in at construction.

An ``Endpoint`` (``endpoint.py``) owns its queue (``queue.py``) and the ``Dispatcher`` that
serves it (``dispatcher.py``), its in-flight limit (``inflight.py``) and its circuit (the
breaker with its prober: ``breaker.py``); the dispatcher hands each job to the batcher
(``batcher.py``), which sends it alone or shared through a call with retries (``retry.py``:
the policy and the loop), each try an ``Attempt`` (``attempt.py``). The pipeline's
coroutines run on the client's own event loop (``loop.py``). No part imports the client:
the mixins in ``mixins/`` are each concern's public face, over these parts.
"""
