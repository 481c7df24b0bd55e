# Generates tests/chat/data/enc_cases.json by running the official encoding_dsv4.py (see README.md).
# Usage: DSV4_ENCODING_DIR=/path/to/encoding python3 gen_enc_cases.py enc_cases.json
import copy, json, os, sys
# DSV4_ENCODING_DIR = a checkout of encoding/ from github.com/Mockingjay1316/deepseek-v4-flash-spark
sys.path.insert(0, os.environ.get("DSV4_ENCODING_DIR", "/tmp/offenc/encoding"))
from encoding_dsv4 import encode_messages, bos_token

P_ABS = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
 "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
 "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
P_BEYOND = ("Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
 "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
 "Do not stop reasoning until you have independently verified the solution from multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n")

def normalize(msgs):
    out = []
    for m in copy.deepcopy(msgs):
        c = m.get("content")
        if isinstance(c, list):
            sep = "\n\n" if m["role"] == "tool" else "\n"
            m["content"] = sep.join(p["text"] for p in c)
        elif c is None and "content" in m and m["role"] in ("user", "tool", "system", "latest_reminder"):
            m["content"] = ""
        if "reasoning" in m and m.get("reasoning_content") is None:
            m["reasoning_content"] = m.pop("reasoning")
        for tc in m.get("tool_calls") or []:
            a = tc["function"]["arguments"]
            if isinstance(a, dict):
                tc["function"]["arguments"] = json.dumps(a)
            else:
                try: v = json.loads(a)
                except Exception: v = {}
                if not isinstance(v, dict):  # duet decision: a non-object becomes one "arguments" parameter
                    tc["function"]["arguments"] = json.dumps({"arguments": a})
        out.append(m)
    return out

def expected(req):
    msgs = normalize(req["messages"])
    schema = None
    rf = req.get("response_format")
    if rf and rf["type"] == "json_object": schema = {"type": "object"}
    if rf and rf["type"] == "json_schema": schema = rf["json_schema"]["schema"]
    tools = req.get("tools")
    if tools or schema is not None:
        idx = next((i for i, m in enumerate(msgs) if m["role"] == "system"), None)
        if idx is None:
            msgs.insert(0, {"role": "system", "content": ""}); idx = 0
        if tools: msgs[idx]["tools"] = tools
        if schema is not None: msgs[idx]["response_format"] = schema
    thinking = req.get("thinking", True)
    effort = req.get("effort", "low"); flavour = req.get("flavour", "0731")
    mode = "thinking" if thinking else "chat"
    if flavour == "preview":
        return encode_messages(msgs, thinking_mode=mode, drop_thinking=req.get("drop_thinking", True),
                               reasoning_effort="max" if effort == "max" else None)
    # 0731: official preview encoder with no prefix, then the 0731 prefix (model spec §5.4 table)
    text = encode_messages(msgs, thinking_mode=mode, drop_thinking=req.get("drop_thinking", True))
    if thinking:
        pre = {"low": "", "high": P_ABS, "max": P_BEYOND}[effort]
        assert text.startswith(bos_token)
        text = bos_token + pre + text[len(bos_token):]
    return text

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a specific location",
  "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"},
  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}, "required": ["location"]}}}
NUMS = {"type": "function", "function": {"name": "set_params", "description": "Tune \"knobs\" — with\ttabs\\slashes and ünïcödé 温度",
  "parameters": {"type": "object", "properties": {"t": {"type": "number", "minimum": 0.5, "maximum": 1e100, "default": -0.0,
  "multipleOf": 1e-07, "examples": [100.0, 1.5e16, 0.0001, 123456789.125, 3.141592653589793, -2.5e-05, 1e16, 9999999999999998.0]},
  "n": {"type": "integer", "minimum": -9007199254740993, "maximum": 0}, "flag": {"type": "boolean", "default": True},
  "opt": {"type": ["string", "null"], "default": None}, "ctl": {"type": "string", "default": "\u0001\u001f\u007f\b\f\r\n"}},
  "required": [], "additionalProperties": False}}}
NOPARAM = {"type": "function", "function": {"name": "get_time"}}

U = lambda c: {"role": "user", "content": c}
S = lambda c: {"role": "system", "content": c}
def A(content=None, reasoning=None, calls=None):
    m = {"role": "assistant", "content": content}
    if reasoning is not None: m["reasoning_content"] = reasoning
    if calls is not None: m["tool_calls"] = calls
    return m
def TC(id, name, args): return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}
def T(id, c): return {"role": "tool", "tool_call_id": id, "content": c}

cases = []
def case(name, **req): cases.append({"name": name, "request": req})

case("worked_thinking_single_turn", messages=[S("You are a helpful assistant."), U("What is 2+2?")])
case("worked_chat_mode", messages=[U("Hello")], thinking=False)
for fl in ("preview", "0731"):
    for ef in ("low", "high", "max"):
        case(f"effort_{fl}_{ef}", messages=[S("sys"), U("Prove it.")], effort=ef, flavour=fl)
    case(f"effort_{fl}_max_chat_mode_no_prefix", messages=[S("sys"), U("Hi")], effort="max", flavour=fl, thinking=False)
multi = [S("sys"), U("Hello"), A("Hi!", "greet"), U("Q2"), A("A2", "think2"), U("Q3")]
case("drop_rule_multi_turn", messages=multi)
case("drop_disabled_multi_turn", messages=multi, drop_thinking=False)
case("chat_mode_multi_turn", messages=multi, thinking=False)
case("drop_rule_assistant_after_last_user", messages=multi + [A("A3", "think3")])
case("developer_internal_dropped_before_last_user", messages=[S("sys"), {"role": "developer", "content": "dev rules"}, A("ok", "r"), U("Q")])
case("developer_internal_last", messages=[S("sys"), U("Q"), A("ok", "r"), {"role": "developer", "content": "dev says"}])
case("developer_internal_with_tools_and_rf", messages=[{"role": "developer", "content": "search please", "tools": [WEATHER]}])
case("tool_round_trip_next_prompt", tools=[WEATHER], messages=[S("You are a helpful assistant."), U("What's the weather in Beijing?"),
     A(None, "The user wants to know the weather in Beijing. I should use the get_weather tool.",
       [TC("call_001", "get_weather", "{\"location\": \"Beijing\", \"unit\": \"celsius\"}")]),
     T("call_001", "{\"temperature\": 22, \"condition\": \"sunny\", \"humidity\": 45}")])
case("multiple_calls_results_out_of_order", tools=[WEATHER, NOPARAM], messages=[U("Weather in A and B, and the time?"),
     A("Checking.", "three calls", [TC("c1", "get_weather", "{\"location\": \"A\"}"), TC("c2", "get_weather", "{\"location\": \"B\"}"), TC("c3", "get_time", "{}")]),
     T("c3", "12:00"), T("c1", "sunny"), T("unknown", "??"), T("c2", "rain"), U("Thanks, and summarize.")])
case("non_string_args", tools=[NUMS], messages=[U("set"), A("", "r", [TC("x1", "set_params",
     "{\"t\": 0.5, \"n\": -12, \"flag\": true, \"opt\": null, \"list\": [1, 2.0, \"s\", [], {}], \"obj\": {\"k\": \"v\", \"e\": 1e-7, \"big\": 1e20, \"q\": \"a\\\"b\\\\c\\n\"}, \"s\": \"raw \\\"quoted\\\" 温度\"}")]),
     T("x1", "done")])
case("zero_parameter_call", tools=[NOPARAM], messages=[U("time?"), A(None, "r", [TC("t1", "get_time", "{}")]), T("t1", "noon")])
case("unparseable_arguments", tools=[WEATHER], messages=[U("x"), A(None, "r", [TC("b1", "get_weather", "{not json"), TC("b2", "get_weather", "[1, 2]")]),
     T("b1", "e1"), T("b2", "e2")])
case("dict_arguments", tools=[WEATHER], messages=[U("x"), A(None, None, [TC("d1", "get_weather", {"location": "Paris", "days": 3})]), T("d1", "ok")])
case("response_format_json_object", messages=[S("sys"), U("give json")], response_format={"type": "json_object"})
case("response_format_json_schema_no_system", messages=[U("give json")], response_format={"type": "json_schema",
     "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}})
case("response_format_text", messages=[U("hi")], response_format={"type": "text"})
case("tools_without_system_message", tools=[WEATHER], messages=[U("weather?")], thinking=False)
case("tools_and_response_format", tools=[WEATHER], messages=[S("sys"), U("q")], response_format={"type": "json_object"})
case("latest_reminder_after_user", messages=[S("sys"), U("Q"), {"role": "latest_reminder", "content": "2026-01-01,Paris"}])
case("consecutive_users_merged", messages=[U("one"), U("two")])
case("tool_result_then_user_text", tools=[WEATHER], messages=[U("x"), A(None, "r", [TC("c1", "get_weather", "{\"location\": \"A\"}")]),
     T("c1", "sunny"), U("and tomorrow?")], thinking=False)
case("chat_mode_tool_round_trip", tools=[WEATHER], messages=[S("s"), U("w?"), A("", "ignored", [TC("c1", "get_weather", "{\"location\": \"Oslo\"}")]),
     T("c1", "cold"), A("It is cold."), U("thanks")], thinking=False)
case("task_query_last_user", messages=[S("s"), dict(U("find cats"), task="query")])
case("task_action_then_answer", messages=[S("s"), dict(U("do it"), task="action"), A("Search")])
case("task_title_after_assistant", messages=[U("hello"), dict(A("hi"), task="title")], thinking=False)
case("content_parts_joined", messages=[{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "user", "content": [{"type": "text", "text": "p1"}, {"type": "text", "text": "p2"}]}])
case("reasoning_alias", messages=[U("q"), {"role": "assistant", "content": "a", "reasoning": "via alias"}])
case("null_contents", tools=[WEATHER], messages=[{"role": "user", "content": None}, A(None, None, [TC("c", "get_weather", "{}")]), {"role": "tool", "tool_call_id": "c", "content": None}])
case("empty_tools_array_keeps_drop", tools=[], messages=multi)
json.dump([dict(c, expected=expected(c["request"])) for c in cases], open(sys.argv[1], "w"), ensure_ascii=False, indent=1)
print(len(cases), "cases")
