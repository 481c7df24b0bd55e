#!/usr/bin/env python3
"""test_openai.py — the official `openai` Python package against duet-coordinator.

Why: shape checks written by us can agree with our own mistakes; the official client's parsers
and stream helpers are what users run (server-api §14). Two CPU workers + the coordinator
(tests/http/test_gen.py's cluster), then: models, non-streamed chat, a streamed chat through
client.chat.completions.stream(...).get_final_completion(), a streamed named call of a strict
zero-parameter tool (when the engine honours forced tokens), completions, and error mapping
with max_retries=0 (BadRequestError, NotFoundError, APIStatusError 503 while draining).
A missing `openai` package is a failure (tools/requirements-ci.txt pins it), never a skip.

  test_openai.py WORKER COORDINATOR MODEL_DIR
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "http"))
sys.argv = [sys.argv[0], "openai"] + sys.argv[1:]
try:
    import openai
except ImportError:
    print("FAIL: the openai package is missing: pip install -r tools/requirements-ci.txt")
    sys.exit(1)
import test_gen as G  # noqa: E402
import test_http as T  # noqa: E402

check = T.check
MSGS = [{"role": "user", "content": "Hi"}]


def case_openai():
    t0 = time.monotonic()
    c, port, sock = G.start_cluster2(["--max-seq-len", "512"])
    client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="unused",
                           max_retries=0, timeout=120)
    models = client.models.list()
    check(models.data[0].id == "deepseek-v4-flash", "models.list: served id first")
    check(client.models.retrieve("deepseek-v4-flash").id == "deepseek-v4-flash",
          "models.retrieve")
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                       max_tokens=6, temperature=0)
    ch = r.choices[0]
    check(r.id.startswith("chatcmpl-") and ch.message.role == "assistant" and
          ch.finish_reason in ("stop", "length") and
          r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
          "non-streamed chat: %s" % r)
    r1 = client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                        max_completion_tokens=1)
    check(r1.choices[0].finish_reason == "length" and r1.usage.completion_tokens == 1,
          "max_completion_tokens 1 → length, 1 token")
    # streamed chat through the helper (the Python helper raises on "length", so the
    # stream ends on a stop token id: the 6th greedy token)
    pre = client.chat.completions.create(
        model="deepseek-v4-flash", messages=MSGS, max_tokens=8, temperature=0,
        extra_body={"thinking": {"type": "disabled"}, "return_token_ids": True,
                    "ignore_eos": True})
    stop_id = pre.choices[0].model_extra["token_ids"][5]
    deltas = []
    usage_chunk = None
    with client.chat.completions.stream(
            model="deepseek-v4-flash", messages=MSGS, max_tokens=8, temperature=0,
            extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True,
                        "stop_token_ids": [stop_id]},
            stream_options={"include_usage": True}) as stream:
        for ev in stream:
            if ev.type == "content.delta":
                deltas.append(ev.delta)
            if ev.type == "chunk" and ev.chunk.usage:
                usage_chunk = ev.chunk.usage
        final = stream.get_final_completion()
    check(final.choices[0].message.content == "".join(deltas) and
          final.choices[0].finish_reason == "stop",
          "stream helper: final content equals the deltas: %r" % final)
    check(usage_chunk is not None and final.usage == usage_chunk,
          "stream helper: usage equals the usage chunk")
    # n = 2 both ways
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                       max_tokens=3, n=2)
    check([x.index for x in r.choices] == [0, 1], "n=2 non-streamed")
    # a streamed named call of a strict zero-parameter tool
    if G.engine_constrains(port):
        tools = [{"type": "function", "function": {
            "name": "ping", "parameters": {"type": "object", "properties": {},
                                           "additionalProperties": False},
            "strict": True}}]
        with client.chat.completions.stream(
                model="deepseek-v4-flash", messages=MSGS, max_tokens=64, tools=tools,
                tool_choice={"type": "function", "function": {"name": "ping"}},
                extra_body={"thinking": {"type": "disabled"}}) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        calls = final.choices[0].message.tool_calls or []
        check(final.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and
              calls[0].function.name == "ping" and calls[0].function.arguments == "{}" and
              calls[0].type == "function" and calls[0].id,
              "streamed strict tool call: %s" % final)
    else:
        check(False, "streamed tool call: the engine ignored the forced tool-call tokens")
    # completions
    r = client.completions.create(model="deepseek-v4-flash", prompt="Hello", max_tokens=4,
                                  temperature=0)
    check(r.object == "text_completion" and isinstance(r.choices[0].text, str) and
          r.usage.completion_tokens <= 4, "completions: %s" % r)
    chunks = list(client.completions.create(model="deepseek-v4-flash", prompt="Hello",
                                            max_tokens=4, temperature=0, stream=True))
    check("".join(x.choices[0].text for x in chunks if x.choices) == r.choices[0].text,
          "streamed completions equal the JSON one")
    # errors
    try:
        client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                       logprobs=True, top_logprobs=21)
        check(False, "top_logprobs 21 raises")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "top_logprobs" in str(e), "BadRequestError: %s" % e)
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                       max_tokens=2)
    check(r.choices, "the next request succeeds")
    try:
        client.chat.completions.create(model="gpt-4", messages=MSGS)
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "NotFoundError: %s" % e)
    check(T.admin(sock, {"cmd": "drain"})["ok"], "drain")
    try:
        client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS)
        check(False, "draining raises")
    except openai.APIStatusError as e:
        check(e.status_code == 503 and e.response.headers.get("retry-after") == "5",
              "APIStatusError 503 while draining: %s" % e)
    T.admin(sock, {"cmd": "resume"})
    c.stop_clean()
    print("openai %s client tests: %.1f s" % (openai.__version__, time.monotonic() - t0))


def main():
    T.run_cases({"openai": case_openai})


if __name__ == "__main__":
    main()
