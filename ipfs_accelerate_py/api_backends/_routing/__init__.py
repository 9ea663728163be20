"""Routing's parts: the state a router keeps (``state.py``: strategies' bookkeeping, tunables,
the load board, the opening order of a routed stream) and cache-aware placement
(``prefix_affinity.py``: prefix keys, rendezvous hashing, the load bound). Its public face
is ``mixins/routing.py`` (and ``mixins/lora_routing.py`` for LoRA adapters).
"""
