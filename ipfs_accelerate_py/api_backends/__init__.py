"""API backends for ipfs_accelerate_py. The public surface, in one place.

Files, by concern: ``_core/`` (the pipeline's parts: endpoint, queue, dispatcher, batcher,
retry, breaker, in-flight limit, attempt, loop), ``_routing/`` and ``_streaming/`` (theirs),
``_transports/`` (aiohttp behind the seam, the header, TLS and framing rules) and
``_observability/`` (the metrics recorder and request log, OpenTelemetry's providers);
``base`` (the client) and ``mixins/`` (each concern's public face: queue, circuit_breaker,
retry, batching, metrics, multiplexing, routing); ``hookspecs`` and ``plugins`` (discovery);
``adapter`` (what a plugin supplies) and ``default_plugins/`` (the built-in vLLM plugin);
``models`` (typed requests and results); ``errors`` (the error tree); ``settings``;
``transport`` (the ``AsyncTransport`` seam), ``mock_transport`` (one for unit tests) and
``sse`` (bytes on the wire); ``tracing`` (OpenTelemetry), ``prometheus_export`` (the client's
metrics for prometheus-client) and ``server_metrics`` (a server's ``/metrics``); ``vllm`` (the vLLM client and the framework's ``vllm`` backend).

``from ipfs_accelerate_py.api_backends import vllm`` gives the framework's backend class;
``import ipfs_accelerate_py.api_backends.vllm`` gives the module.
"""

from . import errors
from .adapter import BackendAdapter, decode_stream_event, load_json, parse_model_list, wire_body
from .base import BaseApiBackend, TextStream, build_request
from .clock import Clock, FakeClock, SystemClock
from .errors import *  # noqa: F401,F403 - the error tree is part of the public surface
from .handlers import make_endpoint_handler
from .hookspecs import hookimpl
from .models import (ChatBatchRequest, ChatMessage, ChatRequest, Choice, CompletionRequest, CompletionResult,
                     Request, StreamChunk, Usage, validate_request)
from .plugins import get_backend, get_backends, get_plugin_manager
from .prometheus_export import register_prometheus
from .settings import ClientSettings
from .mock_transport import MockTransport
from .transport import AsyncTransport, HttpRequest, HttpResponse, RequestsTransport, Transport
from .vllm import VllmClient, vllm  # noqa: F811 - the class shadows the submodule on purpose

__all__ = ["BackendAdapter", "BaseApiBackend", "TextStream", "build_request", "Clock", "FakeClock",
           "SystemClock", "ChatBatchRequest", "ChatMessage", "ChatRequest", "Choice", "CompletionRequest",
           "CompletionResult", "StreamChunk", "Usage", "get_backend", "get_backends",
           "get_plugin_manager", "ClientSettings", "HttpRequest", "HttpResponse",
           "RequestsTransport", "Transport", "AsyncTransport", "MockTransport", "VllmClient", "vllm", "errors", "register_prometheus",
           # what a backend plugin needs (plugins/openai_compat imports nothing else)
           "hookimpl", "make_endpoint_handler", "decode_stream_event", "load_json",
           "parse_model_list", "wire_body", "Request", "validate_request"] + list(errors.__all__)
