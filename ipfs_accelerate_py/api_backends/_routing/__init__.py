"""Routing's parts: the router (``router.py``: ``Router``, the order routed calls try the
endpoints in, their loads, the routing statistics; an endpoint lookup, the endpoints and the
clock handed in), the state it keeps (``state.py``: strategies' bookkeeping, tunables, the
load board, the opening order of a routed stream) and cache-aware placement
(``prefix_affinity.py``: prefix keys, rendezvous hashing, the load bound). Its public face
is ``mixins/routing.py``, which sends and fails over routed calls and streams by the
router's order (and ``mixins/lora_routing.py`` for LoRA adapters).
"""
