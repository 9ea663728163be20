"""The API key never leaks; TLS is verified by default and can trust a given CA bundle."""

from __future__ import annotations

import json
import logging

import pytest

from ipfs_accelerate_py.api_backends import VllmClient, errors, vllm
from ipfs_accelerate_py.api_backends.settings import ClientSettings
from ipfs_accelerate_py.api_backends.transport import HttpRequest

CANARY = "sk-canary-7f3a9e1b2c4d"





def test_key_never_appears_in_errors_reprs_metrics_or_logs(echo_server, caplog):
    caplog.set_level(logging.DEBUG)
    client = VllmClient(base_url=echo_server, api_key=CANARY, max_retries=1, retry_delay=0.01)
    texts = [repr(client), str(client.settings), repr(client.settings)]
    with pytest.raises(errors.ServerError) as info:
        client.run_inference("m", "hi", {"max_tokens": 2})
    err = info.value
    texts += [str(err), repr(err), err.message, err.body, json.dumps(err.headers)]
    assert "***" in err.message  # the server echoed the key; we removed it
    texts.append(json.dumps(client.get_metrics(), default=str))
    texts.append(json.dumps(client.get_stats(), default=str))
    texts.append(json.dumps(list(client.recent_requests), default=str))
    texts.append(json.dumps(client.settings.model_dump(mode="json")))
    backend = vllm(metadata={"vllm_api_url": echo_server, "vllm_api_key": CANARY})
    texts.append(repr(backend))
    handler = backend.create_vllm_endpoint_handler(echo_server, "m")
    texts.append(json.dumps(handler("hi")))
    client.close()
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert CANARY not in text, text


def test_key_sent_over_plain_http_to_a_remote_host_warns_once(caplog):
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        c = VllmClient(base_url="http://vllm-remote-host.invalid:8000", api_key=CANARY)
        c.close()
    warnings = [r for r in caplog.records if "plain http" in r.getMessage()]
    assert len(warnings) == 1 and CANARY not in warnings[0].getMessage()
    caplog.clear()
    VllmClient(base_url="http://127.0.0.1:9", api_key=CANARY).close()
    assert not [r for r in caplog.records if "plain http" in r.getMessage()]


def test_settings_dump_hides_the_key():
    s = ClientSettings(api_key=CANARY)
    assert CANARY not in repr(s) and CANARY not in str(s.model_dump())
    assert s.api_key_value == CANARY


# ------------------------------------------------------------------ TLS
def test_tls_is_verified_by_default(tls_server):
    url, _ = tls_server
    with VllmClient(base_url=url, max_retries=0) as c:
        with pytest.raises(errors.ConnectionError) as info:
            c.list_models()
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate" in str(info.value).lower()


def test_tls_trusts_a_given_ca_bundle(tls_server):
    url, cert = tls_server
    with VllmClient(base_url=url, ca_bundle=cert, max_retries=0) as c:
        assert c.request_raw(HttpRequest("GET", "/v1/models")).status == 200
