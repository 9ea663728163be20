"""Batching's public face: ``batch_enabled``, ``max_batch_size``, ``batch_timeout``.

A thin facade: the batcher (``_core/batcher.py``) is the part each endpoint's dispatcher
hands its jobs to; this mixin makes it, from what it needs of the client (the call with its
retries, how a job is finished and recorded, the sleeps ``close()`` cuts short, the shared
streams' part, ``stream_batching.SharedStreams``, which it makes too), and sets the batching
settings on every endpoint.
"""

from __future__ import annotations

from .._core.batcher import Batcher
from .._streaming.stream_batching import SharedStreams
from ._host import HostBase

__all__ = ["BatchingMixin"]


class BatchingMixin(HostBase):
    """README surface: ``batch_enabled``, ``max_batch_size``, ``batch_timeout``."""

    #: what every endpoint's dispatcher runs for each job (``Batcher.handle_job``)
    _batcher: Batcher
    #: the shared streams the batcher opens (``SharedStreams.open_shared``)
    _shared_streams: SharedStreams

    def _init_batching(self) -> None:
        self._shared_streams = SharedStreams(self._loop, self._clock, self._metrics,
                                             self._opener, self._new_request_id, self._adapter)
        self._batcher = Batcher(
            self._clock, self._closing, self._loop, self._metrics, self._call, self._requests.finish,
            self._asleep, self._shared_streams.open_shared, self._adapter)

    @property
    def batch_enabled(self) -> bool:
        return self._settings.batch_enabled

    @batch_enabled.setter
    def batch_enabled(self, value: bool) -> None:
        self._set_on_all_endpoints(batch_enabled=bool(value))

    @property
    def max_batch_size(self) -> int:
        return self._settings.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._set_on_all_endpoints(max_batch_size=value)

    @property
    def batch_timeout(self) -> float:
        return self._settings.batch_timeout

    @batch_timeout.setter
    def batch_timeout(self, value: float) -> None:
        self._set_on_all_endpoints(batch_timeout=value)
