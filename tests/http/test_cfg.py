#!/usr/bin/env python3
"""test_cfg.py — the coordinator's configuration end to end: --config FILE, request policy keys,
and `reload` (admin command and SIGHUP) against a CPU duet-worker on the tiny model.

Why: the config keys only prove themselves on the real binaries: a keep-alive comment has to
reach a client that waits in the queue, a reloaded key file has to lock out the old key while a
stream that was admitted with it finishes undisturbed.

Cases (argv[1]):
  policy  keys set in the file: sse_keepalive_s (a request queued behind another with
          --max-num-seqs 1 gets ": keep-alive" before its first data event, and the openai
          client's stream parser still works through them), strict_request_fields (unknown field
          → 400 naming it; fields the spec lists as ignored still pass), cors_origins (preflight
          204 with the Allow-* headers, Allow-Origin on answers, nothing for other origins),
          tool_stream=buffered (one delta per call with id, name and complete arguments; a call
          cut by max_tokens is never sent), reasoning_field=both, chat min_tokens with stop
          strings (the stop string is not matched in the first min_tokens tokens).
  reload  defaults (no strict: unknown fields logged once per name; no CORS: OPTIONS 405),
          default_max_tokens from the file; then the key file, max_waiting and a default are
          changed and `reload` lists them under applied, a restart-only key under
          restart_required; the old key is refused and the new one accepted while a stream
          admitted before the reload completes; a broken file (wrong type, unknown key) is
          refused naming the key and the old config stays; SIGHUP reloads too.

  test_cfg.py CASE WORKER COORDINATOR MODEL_DIR
"""
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time

sys.argv = [sys.argv[0]] + sys.argv[1:]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_http as T  # noqa: E402  (reads CASE WORKER COORD MODEL from argv)

check, post, req, is_error, admin = T.check, T.post, T.req, T.is_error, T.admin


def sse_events(payload):
    """T.sse_events after the keep-alive comments (this server sends them early: a slow first
    token under the sanitizers gets some)."""
    return T.sse_events(payload.replace(b": keep-alive\n\n", b""))
MSGS = [{"role": "user", "content": "Hi"}]
OFF = {"type": "disabled"}


def write_config(obj):
    path = os.path.join(T.TMP, "duet.json")
    with open(path + ".tmp", "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    os.replace(path + ".tmp", path)
    return path


def start(cfg, extra=()):
    return T.start_cluster(["--fold-prompt-ids", "--config", write_config(cfg)] + list(extra))


def chat(port, body, headers=None):
    return post(port, "/v1/chat/completions", dict({"messages": MSGS}, **body), headers)


def wait_running(sock, n, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:  # a state without an event: polled with a deadline
        if admin(sock, {"cmd": "status"})["result"]["queue"]["running"] >= n:
            return True
        time.sleep(0.01)
    return check(False, "a request was running within %d s" % timeout)


def raw_stream(port, body, headers=b""):
    """Sends a streamed request on a raw socket; returns the socket (headers not yet read)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers +
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def read_until(s, needle, limit=1 << 22):
    got = b""
    while needle not in got and len(got) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def blocker(port, out, headers=None):
    """A long non-streaming request that occupies the only running slot."""
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5, 9], "max_tokens": 1500,
                                                 "ignore_eos": True, "temperature": 0}, headers)
    out.append((st, j))


# ---- policy ------------------------------------------------------------------------------------

def keepalive(port, sock):
    done = []
    t = threading.Thread(target=blocker, args=(port, done))
    t.start()
    wait_running(sock, 1)
    s = raw_stream(port, {"messages": MSGS, "stream": True, "max_tokens": 3, "ignore_eos": True})
    got = read_until(s, b"data: ")
    head, _, body = got.partition(b"\r\n\r\n")
    check(b"200 OK" in head.split(b"\r\n")[0], "the queued stream was admitted: %r" % head[:80])
    first_data = body.find(b"data: ")
    ka = body.find(b": keep-alive\n\n")
    check(ka >= 0 and (first_data < 0 or ka < first_data),
          "a keep-alive comment arrives before the first data event: %r" % body[:300])
    got += read_until(s, b"data: [DONE]")
    s.close()
    t.join()
    check(done and done[0][0] == 200, "the blocking request completed")
    text = got.partition(b"\r\n\r\n")[2]
    check(text.count(b": keep-alive") >= 1 and b"[DONE]" in text, "the stream completed")
    # after the first token no more comments: the part after the first data event has none
    after = text[text.find(b"data: "):]
    check(b": keep-alive" not in after, "no keep-alive after the first token: %r" % after[:300])
    # the official client parses a stream that holds comments
    try:
        import openai  # noqa: PLC0415
    except ImportError:
        check(False, "the openai package is missing (tools/requirements-ci.txt)")
        return
    done = []
    t = threading.Thread(target=blocker, args=(port, done))
    t.start()
    wait_running(sock, 1)
    client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="unused",
                           max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="deepseek-v4-flash", messages=MSGS,
                                            max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True,
                                                        "thinking": OFF})
    chunks = list(stream)
    t.join()
    check(chunks and chunks[-1].choices[0].finish_reason == "length",
          "the openai client reads a stream with keep-alive comments: %s" % chunks[-1:])


def strict_fields(port):
    st, j, _, _ = chat(port, {"max_tokens": 2, "frobnicate": 1})
    check(st == 400 and is_error(j, "unsupported_parameter", "frobnicate") and
          "frobnicate" in j["error"]["message"], "strict: unknown field 400: %s %s" % (st, j))
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 2, "foo": None})
    check(st == 400 and is_error(j, "unsupported_parameter", "foo"),
          "strict: unknown completions field 400 (null too): %s" % j)
    st, j, _, _ = chat(port, {"max_tokens": 2, "service_tier": "auto", "store": False,
                              "metadata": {"a": "b"}, "user": "u"})
    check(st == 200, "strict: the fields §3.1 lists as ignored pass: %s %s" % (st, j))
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 2,
                                                 "messages": []})
    check(st == 400 and is_error(j, "unsupported_parameter", "messages"),
          "strict: a chat field on completions is unknown there: %s" % j)


def cors(port):
    o = "https://app.example"
    st, _, r, payload = req(port, "OPTIONS", "/v1/chat/completions",
                            headers={"Origin": o, "Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "authorization, content-type"})
    check(st == 204 and r.getheader("Access-Control-Allow-Origin") == o and
          "POST" in (r.getheader("Access-Control-Allow-Methods") or "") and
          "authorization" in (r.getheader("Access-Control-Allow-Headers") or "").lower() and
          r.getheader("Access-Control-Max-Age") and not payload,
          "preflight 204 with the Allow-* headers: %s %s" % (st, r.getheaders()))
    st, _, r, _ = req(port, "OPTIONS", "/v1/models", headers={"Origin": "https://evil.example"})
    check(st == 204 and r.getheader("Access-Control-Allow-Origin") is None,
          "another origin gets no Allow-Origin: %s" % r.getheaders())
    st, j, r, _ = req(port, "GET", "/v1/models", headers={"Origin": o})
    check(st == 200 and r.getheader("Access-Control-Allow-Origin") == o and
          "X-Request-Id" in (r.getheader("Access-Control-Expose-Headers") or ""),
          "answers carry Allow-Origin for an allowed origin: %s" % r.getheaders())
    st, j, r, _ = req(port, "OPTIONS", "/nope", headers={"Origin": o})
    check(st == 404, "OPTIONS on an unknown path: 404")


NOARG = [{"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {}}, "strict": True}},
         {"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}}}}]


def tool_deltas(evs):
    return [d for e in evs for ch in e["choices"] for d in ch["delta"].get("tool_calls", [])]


def buffered(port):
    body = {"tools": NOARG, "max_tokens": 64, "temperature": 0, "thinking": OFF,
            "tool_choice": {"type": "function", "function": {"name": "ping"}}}
    st, j, _, _ = chat(port, body)
    st2, _, _, payload = chat(port, dict(body, stream=True))
    evs = sse_events(payload)
    calls = j["choices"][0]["message"].get("tool_calls") if st == 200 else None
    deltas = tool_deltas(evs)
    check(calls and len(deltas) == len(calls) and all(
        d.get("id") and d.get("type") == "function" and d["function"].get("name") == "ping" and
        d["function"].get("arguments") == "{}" for d in deltas),
        "buffered: one delta per call with id, name and complete arguments: %s / %s" %
        (calls, deltas))
    # a call cut by max_tokens is never sent
    body = {"tools": NOARG, "max_tokens": 14, "temperature": 0, "thinking": OFF,
            "ignore_eos": True, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    st, _, _, payload = chat(port, body)
    evs = sse_events(payload)
    fin = [ch["finish_reason"] for e in evs for ch in e["choices"] if ch.get("finish_reason")]
    check(fin == ["length"] and not tool_deltas(evs),
          "buffered: a truncated call sends no delta: %s %s" % (fin, tool_deltas(evs)))


def reasoning_both(port):
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    st, j, _, _ = chat(port, body)
    m = j["choices"][0]["message"] if st == 200 else {}
    check("reasoning_content" in m and m.get("reasoning") == m.get("reasoning_content"),
          "reasoning_field=both: message has both fields: %s" % m)
    st, _, _, payload = chat(port, dict(body, stream=True))
    rd = [ch["delta"] for e in sse_events(payload) for ch in e["choices"]
          if "reasoning" in ch["delta"] or "reasoning_content" in ch["delta"]]
    check(rd and all(d.get("reasoning") == d.get("reasoning_content") for d in rd) and
          "".join(d["reasoning"] for d in rd) == m.get("reasoning"),
          "reasoning_field=both: deltas carry both keys: %s" % rd[:3])


def min_tokens_stop(port):
    base = {"max_tokens": 40, "temperature": 0, "ignore_eos": True, "thinking": OFF,
            "min_tokens": 12}
    st, j, _, _ = chat(port, base)
    full = j["choices"][0]["message"]["content"] if st == 200 else ""
    # a character that appears early and again later
    stop = next((ch for i, ch in enumerate(full[:8]) if ch.strip() and full.find(ch, i + 1) > 0),
                None)
    if not check(stop, "the greedy content has a repeated character: %r" % full):
        return
    first = full.find(stop)
    st, j0, _, _ = chat(port, dict(base, min_tokens=0, stop=[stop]))
    c0 = j0["choices"][0]
    check(c0["message"]["content"] == full[:first] and c0["finish_reason"] == "stop" and
          c0["stop_reason"] == stop, "min_tokens 0: stops at the first %r: %s" % (stop, c0))
    st, j1, _, _ = chat(port, dict(base, stop=[stop]))
    c1 = j1["choices"][0]
    got = c1["message"]["content"]
    check(full.startswith(got) and len(got) > first and
          j1["usage"]["completion_tokens"] >= 12 and
          (c1["finish_reason"] == "length" or
           (c1["finish_reason"] == "stop" and c1["stop_reason"] == stop and
            full[len(got):].startswith(stop))),
          "min_tokens 12: the early %r is not a stop; content %r of %r, %s" %
          (stop, got, full, c1))
    st, _, _, payload = chat(port, dict(base, stop=[stop], stream=True))
    evs = sse_events(payload)
    text = "".join(ch["delta"].get("content", "") for e in evs for ch in e["choices"])
    fin = [ch for e in evs for ch in e["choices"] if ch.get("finish_reason")]
    check(text == got and fin and fin[0]["finish_reason"] == c1["finish_reason"] and
          fin[0].get("stop_reason") == c1["stop_reason"],
          "min_tokens with stop: the stream equals the JSON answer: %r vs %r" % (text, got))
    st, j2, _, _ = chat(port, dict(base, stop=[stop], include_stop_str_in_output=True))
    c2 = j2["choices"][0]
    if c1["finish_reason"] == "stop":
        check(c2["message"]["content"] == got + stop, "include_stop_str_in_output keeps it")


def case_policy():
    _, c, port, sock = start({"sse_keepalive_s": 0.05, "strict_request_fields": True,
                              "cors_origins": ["https://app.example"],
                              "tool_stream": "buffered", "reasoning_field": "both",
                              "max_model_len": 2048, "max_num_seqs": 1})
    keepalive(port, sock)
    strict_fields(port)
    cors(port)
    buffered(port)
    reasoning_both(port)
    min_tokens_stop(port)
    c.stop_clean()


# ---- reload ------------------------------------------------------------------------------------

def write_keys(path, key):
    with open(path + ".tmp", "w") as f:
        f.write(key + "\n")
    os.replace(path + ".tmp", path)


def cmpl_tokens(port, key):
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5, 9], "ignore_eos": True},
                       {"Authorization": "Bearer " + key})
    return st, (j["usage"]["completion_tokens"] if st == 200 else j)


def case_reload():
    keys = os.path.join(T.TMP, "keys")
    write_keys(keys, "sk-old")
    cfg = {"api_key_file": keys, "max_waiting": 8, "default_max_tokens": {"completions": 3},
           "max_model_len": 1024}
    _, c, port, sock = start(cfg)
    auth_old = {"Authorization": "Bearer sk-old"}
    check(cmpl_tokens(port, "sk-old") == (200, 3), "default_max_tokens from the file")
    # defaults: unknown fields are ignored and logged once per name; no CORS
    for _ in range(2):
        st, _, _, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 1,
                                                     "frob_field": 1}, auth_old)
        check(st == 200, "an unknown field is ignored by default")
    c.wait_line('"frob_field" is unknown')
    st, _, _, _ = req(port, "OPTIONS", "/v1/models", headers={"Origin": "https://a.example"})
    check(st == 405, "without cors_origins OPTIONS is 405")
    # a stream admitted with the old key
    s = raw_stream(port, {"messages": MSGS, "stream": True, "max_tokens": 600,
                          "ignore_eos": True, "stream_options": {"include_usage": True}},
                   b"Authorization: Bearer sk-old\r\n")
    read_until(s, b"data: ")
    # change the key file, max_waiting, a default, and a restart-only key
    write_keys(keys, "sk-new")
    write_config(dict(cfg, max_waiting=2, default_max_tokens={"completions": 5},
                      block_size=512))
    r = admin(sock, {"cmd": "reload"})
    res = r.get("result") or {}
    check(r.get("ok") and set(res.get("applied", [])) ==
          {"api_key_file", "max_waiting", "default_max_tokens"} and
          res.get("restart_required") == ["block_size"] and isinstance(res.get("workers"), list),
          "reload lists applied and restart-only keys: %s" % r)
    st, j = cmpl_tokens(port, "sk-old")
    check(st == 401, "the old key is refused after the reload: %s %s" % (st, j))
    check(cmpl_tokens(port, "sk-new") == (200, 5), "the new key and default apply")
    status = admin(sock, {"cmd": "status"})["result"]
    check(status["queue"]["max_waiting"] == 2, "max_waiting applied: %s" % status["queue"])
    rest = read_until(s, b"data: [DONE]")
    s.close()
    evs = [json.loads(ln[6:]) for ln in rest.decode(errors="replace").split("\n")
           if ln.startswith("data: {")]
    usage = [e["usage"] for e in evs if e.get("usage")]
    check(b"data: [DONE]" in rest and usage and usage[-1]["completion_tokens"] == 600,
          "the stream admitted before the reload completed: %s" % usage[-1:])
    # a broken file is refused naming the key, and the old config stays
    for bad, key in (({"max_waiting": "5"}, "max_waiting"), ({"max_wating": 5}, "max_wating")):
        write_config(dict(cfg, **bad))
        r = admin(sock, {"cmd": "reload"})
        check(not r.get("ok") and key in r["error"]["message"] and
              "nothing applied" in r["error"]["message"], "broken file refused: %s" % r)
    write_config("{\"max_waiting\": ")
    r = admin(sock, {"cmd": "reload"})
    check(not r.get("ok") and "duet.json" in r["error"]["message"], "invalid JSON refused: %s" % r)
    check(cmpl_tokens(port, "sk-new") == (200, 5) and
          admin(sock, {"cmd": "status"})["result"]["queue"]["max_waiting"] == 2,
          "the old config is still in force after refused reloads")
    # a key file that cannot be read: refused, keys unchanged
    write_config(dict(cfg, api_key_file=os.path.join(T.TMP, "missing-keys")))
    r = admin(sock, {"cmd": "reload"})
    check(not r.get("ok") and "missing-keys" in r["error"]["message"], "missing key file: %s" % r)
    check(cmpl_tokens(port, "sk-new") == (200, 5), "keys unchanged after the refused reload")
    # SIGHUP reloads
    write_config(dict(cfg, max_waiting=2, default_max_tokens={"completions": 6},
                      block_size=512))
    c.p.send_signal(signal.SIGHUP)
    c.wait_line("SIGHUP: reload")
    c.wait_line("reload: applied")
    check(cmpl_tokens(port, "sk-new") == (200, 6), "SIGHUP applied the new default")
    c.stop_clean()


def main():
    T.run_cases({"policy": case_policy, "reload": case_reload})


if __name__ == "__main__":
    main()
