"""The resilience mixins of ``BaseApiBackend``, one concern per module."""

from .batching import BatchingMixin
from .circuit_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitBreakerMixin
from .circuit_wait import CircuitWaitMixin
from .metrics import MetricsMixin, MetricsRecorder
from .queue import Dispatcher, PriorityRequestQueue, QueueMixin
from .retry import RetryMixin, RetryPolicy, acall_with_retries
from .multiplexing import MultiplexingMixin
from .routing import RoutingMixin

__all__ = ["BatchingMixin", "CircuitBreaker", "CircuitBreakerMixin", "CircuitWaitMixin", "CLOSED", "OPEN", "HALF_OPEN",
           "MetricsMixin", "MetricsRecorder", "PriorityRequestQueue", "QueueMixin", "Dispatcher",
           "RetryMixin", "RetryPolicy", "acall_with_retries", "MultiplexingMixin", "RoutingMixin"]
