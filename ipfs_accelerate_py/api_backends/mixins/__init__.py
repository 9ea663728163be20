"""The public faces of ``BaseApiBackend``, one concern per module.

Each mixin is the README surface of one concern (``circuit_state``, ``request_queue``,
``batch_enabled``, ``get_metrics``, ...). Where the concern is a part of an endpoint's
pipeline (the breaker: ``breaker.Circuit``; the queue, its dispatcher, the batcher, the
retry policy and loop: ``_core/``), or a part of the client's (the router:
``_routing/router.py``; the metrics recorder and request log: ``_observability/recorder.py``),
its mixin is a thin facade over that part.
"""

from .batching import BatchingMixin
from .circuit_breaker import CircuitBreakerMixin
from .metrics import MetricsMixin, MetricsRecorder
from .queue import QueueMixin
from .retry import RetryMixin
from .multiplexing import MultiplexingMixin
from .routing import RoutingMixin

__all__ = ["BatchingMixin", "CircuitBreakerMixin", "MetricsMixin", "MetricsRecorder", "QueueMixin",
           "RetryMixin", "MultiplexingMixin", "RoutingMixin"]
