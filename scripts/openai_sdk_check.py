"""Drive `lifeboat serve` in front of `lifeboat mock-upstream` with the official openai SDK.

Started by scripts/openai-sdk-check, which provides a venv with the pinned SDK. Starts
both processes on port 0, runs each check, prints one line per check and a closing
"N passed, M failed" line, and exits non-zero on any failure.

With LIFEBOAT_SDK_GGUF (a real GGUF, e.g. the Qwen2.5-Coder-1.5B Q4_K_M) and
LIFEBOAT_SDK_TEMPLATE_FROM (the DeepSeek-R1-Distill GGUF header), a third lifeboat serves
that model locally with DeepSeek-R1's current chat template, and the SDK checks
reasoning_content, streaming, stop and seeded determinism on real weights.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import openai

BIN = os.environ.get("LIFEBOAT_BIN", "target/debug/lifeboat")


def start(args, pattern, stream_name):
    """Start a process and wait for a line matching `pattern` on stdout or stderr."""
    proc = subprocess.Popen(
        [BIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LIFEBOAT_LOG": "warn,lifeboat=info", "NO_COLOR": "1"},
    )
    stream = proc.stdout if stream_name == "stdout" else proc.stderr
    deadline = time.time() + 30
    seen = []
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return proc, match
    proc.kill()
    raise RuntimeError(f"{args[0]} did not start; output:\n{''.join(seen)}")


def admin(url, mode, count=None):
    body = {"mode": mode}
    if count is not None:
        body["count"] = count
    request = urllib.request.Request(
        f"{url}/fault", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_ready(base_url, seconds, pause=0.2):
    """Until /ready says "ready": every backend loaded and warm (a box whose gateway serves
    answers 200 "degraded" while its local model still loads)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/ready", timeout=5) as response:
                if json.load(response).get("status") == "ready":
                    return
        except Exception:  # noqa: BLE001 - 503 while nothing can serve yet
            pass
        time.sleep(pause)
    raise RuntimeError(f"{base_url} did not become ready in {seconds} s")


def r1_template_opening_think(header):
    """DeepSeek-R1's chat template as deepseek-ai publishes it now: the GGUF header carries
    the first release, whose generation prompt is `<｜Assistant｜>`; the current one opens
    the reasoning with `<｜Assistant｜><think>\n`, so the whole answer up to `</think>` is
    reasoning. Written to a temporary file for `serve --chat-template`."""
    source = subprocess.run(
        [BIN, "model", "inspect", header, "--template"], check=True, capture_output=True, text=True
    ).stdout
    first = "{{'<｜Assistant｜>'}}{% endif %}"
    assert source.endswith(first), source[-200:]
    path = os.path.join(tempfile.mkdtemp(prefix="lifeboat-r1-"), "deepseek-r1.jinja")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source[: -len(first)] + "{{'<｜Assistant｜><think>\n'}}{% endif %}")
    return path


def main():
    mock, m = start(
        ["mock-upstream", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--tokens", "12", "--inter-token-delay", "5ms", "--cut-after", "3",
         # Longer than lifeboat's retry-after cap (2 s): the 429 reaches the client.
         "--retry-after", "5s",
         "--models", "deepseek-chat"],
        r"api=(\S+) admin=(\S+)",
        "stdout",
    )
    mock_api, mock_admin = m.group(1), m.group(2)
    server, m = start(
        ["serve", "--listen", "127.0.0.1:0", "--remote-url", mock_api, "--remote-model", "deepseek-chat",
         "--model", "none"],
        r"OpenAI base URL (http://\S+)",
        "stderr",
    )
    base_url = m.group(1)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    # A second lifeboat with a tiny local model behind the same gateway.
    tiny = tempfile.mkdtemp(prefix="lifeboat-tiny-")
    subprocess.run([BIN, "model", "make-tiny", "--arch", "qwen2", "--out", tiny], check=True, capture_output=True)
    local_server, m = start(
        ["serve", "--listen", "127.0.0.1:0", "--remote-url", mock_api, "--remote-model", "deepseek-chat",
         "--model", tiny, "--served-model-name", "tiny-r1"],
        r"OpenAI base URL (http://\S+)",
        "stderr",
    )
    local = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0, timeout=30)
    wait_ready(m.group(1), 10, pause=0.05)
    expected = "Lifeboat keeps the lights on when the gateway goes dark."
    gguf_server = gguf = coder_server = coder = None
    if os.environ.get("LIFEBOAT_SDK_GGUF"):
        # The same weights with their own (Qwen) template, which offers tools to the model.
        coder_server, m = start(
            ["serve", "--listen", "127.0.0.1:0", "--model", os.environ["LIFEBOAT_SDK_GGUF"],
             "--served-model-name", "coder-gguf"],
            r"OpenAI base URL (http://\S+)",
            "stderr",
        )
        wait_ready(m.group(1), 120)
        coder = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0, timeout=300)
        template = r1_template_opening_think(os.environ["LIFEBOAT_SDK_TEMPLATE_FROM"])
        gguf_server, m = start(
            ["serve", "--listen", "127.0.0.1:0", "--model", os.environ["LIFEBOAT_SDK_GGUF"],
             "--served-model-name", "r1-gguf", "--chat-template", template],
            r"OpenAI base URL (http://\S+)",
            "stderr",
        )
        wait_ready(m.group(1), 120)
        gguf = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0, timeout=300)

    checks = []

    def check(fn):
        checks.append(fn)
        return fn

    @check
    def models_list():
        ids = [m.id for m in client.models.list()]
        assert ids == ["deepseek-chat"], ids
        assert client.models.retrieve("deepseek-chat").id == "deepseek-chat"

    @check
    def chat_non_streaming():
        r = client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hello there"}]
        )
        assert r.object == "chat.completion", r
        assert r.choices[0].message.content == expected, r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 2, r.usage

    @check
    def chat_raw_response_headers():
        raw = client.chat.completions.with_raw_response.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.headers["x-lifeboat-backend"] == "gateway", dict(raw.headers)
        assert raw.parse().choices[0].finish_reason == "length"

    @check
    def chat_streaming():
        stream = client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected, text
        assert all(c.usage is None for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"

    @check
    def chat_streaming_with_usage():
        stream = client.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=5,
        )
        chunks = list(stream)
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 5, last
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected[: len("Lifeboat keeps the lights")], text

    @check
    def legacy_completion():
        r = client.completions.create(model="deepseek-chat", prompt="Once upon", max_tokens=3)
        assert r.choices[0].text == "Lifeboat keeps", r

    @check
    def unknown_model_raises_not_found():
        try:
            client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError as e:
            assert e.code == "model_not_found", e.body
            return
        raise AssertionError("no NotFoundError")

    @check
    def empty_messages_raise_bad_request():
        try:
            client.chat.completions.create(model="deepseek-chat", messages=[])
        except openai.BadRequestError as e:
            assert e.param == "messages", e.body
            return
        raise AssertionError("no BadRequestError")

    @check
    def gateway_rate_limit_raises_rate_limit_error():
        admin(mock_admin, "http429", 1)
        try:
            client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}])
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after") == "5", dict(e.response.headers)
            return
        raise AssertionError("no RateLimitError")

    @check
    def transient_gateway_503_is_retried_invisibly():
        admin(mock_admin, "http503", 1)
        raw = client.chat.completions.with_raw_response.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert raw.headers["x-lifeboat-attempts"] == "2", dict(raw.headers)
        assert raw.parse().choices[0].message.content == "Lifeboat"

    @check
    def cut_after_first_byte_raises_in_stream():
        admin(mock_admin, "midstream_cut", 1)
        stream = client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "x"}], stream=True
        )
        received = []
        try:
            for chunk in stream:
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
        except openai.APIError as e:
            # The classified message, never the gateway's own text.
            assert "`gateway` broke off the answer" in e.message, e.message
            assert "".join(received) == "Lifeboat keeps", received
            return
        raise AssertionError("the cut stream ended without an error")

    @check
    def local_model_reasoning_and_determinism():
        ask = dict(model="tiny-r1", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        a = local.chat.completions.create(**ask)
        b = local.chat.completions.create(**ask)
        assert a.choices[0].message.reasoning_content, a
        assert a.choices[0].message.reasoning_content == b.choices[0].message.reasoning_content
        assert a.usage.completion_tokens == 8, a.usage
        chunks = list(local.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        assert streamed == a.choices[0].message.reasoning_content, streamed
        assert chunks[-1].usage.completion_tokens == 8

    @check
    def gateway_down_is_answered_locally():
        admin(mock_admin, "http503")
        try:
            raw = local.chat.completions.with_raw_response.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "x"}], max_tokens=4
            )
            assert raw.headers["x-lifeboat-backend"] == "local", dict(raw.headers)
            assert raw.parse().model == "tiny-r1"
            stream = local.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True
            )
            assert [c for c in stream if c.choices and c.choices[0].finish_reason], "stream finished"
        finally:
            admin(mock_admin, "none")

    if gguf is not None:
        ask = dict(model="r1-gguf", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16)

        @check
        def gguf_reasoning_is_deterministic_at_temperature_0():
            a = gguf.chat.completions.create(**ask, temperature=0)
            b = gguf.chat.completions.create(**ask, temperature=0)
            reasoning = a.choices[0].message.reasoning_content
            # The prompt opened <think> and this model never writes </think>: all of its
            # output is reasoning, as vLLM's and DeepSeek's R1 parsers treat it.
            assert reasoning and not a.choices[0].message.content, a
            assert a.choices[0].finish_reason in ("stop", "length"), a
            assert 0 < a.usage.completion_tokens <= 16, a.usage
            assert reasoning == b.choices[0].message.reasoning_content, (reasoning, b)
            assert a.usage == b.usage, (a.usage, b.usage)

        @check
        def gguf_streaming_matches_and_reports_usage():
            first = gguf.chat.completions.create(**ask, temperature=0)
            whole = first.choices[0].message.reasoning_content
            chunks = list(gguf.chat.completions.create(
                **ask, temperature=0, stream=True, stream_options={"include_usage": True}))
            streamed = "".join(
                getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
            assert streamed == whole, (streamed, whole)
            assert chunks[-1].choices == [] and chunks[-1].usage == first.usage, (chunks[-1], first.usage)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == [first.choices[0].finish_reason], finish

        @check
        def gguf_seeded_sampling_repeats():
            a = gguf.chat.completions.create(**ask, temperature=0.9, seed=1234)
            b = gguf.chat.completions.create(**ask, temperature=0.9, seed=1234)
            assert a.choices[0].message.reasoning_content == b.choices[0].message.reasoning_content, (a, b)

        @check
        def gguf_stop_string_ends_the_answer_before_it():
            whole = gguf.chat.completions.create(**ask, temperature=0).choices[0].message.reasoning_content
            # A word that first occurs after the start, so something precedes it.
            stop = next((w for w in whole.split() if whole.find(w) > 0), None)
            assert stop, whole
            r = gguf.chat.completions.create(**ask, temperature=0, stop=[stop])
            got = r.choices[0].message.reasoning_content or ""
            assert r.choices[0].finish_reason == "stop", r
            assert stop not in got and whole.startswith(got.rstrip()), (got, stop, whole)

        @check
        def gguf_legacy_completion_is_plain_text():
            r = gguf.completions.create(model="r1-gguf", prompt="def add(a, b):", max_tokens=8, temperature=0)
            assert r.choices[0].text and r.usage.completion_tokens == 8, r

    if coder is not None:
        weather_tool = {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}
        ask_tools = dict(model="coder-gguf", temperature=0, tools=[weather_tool],
                         messages=[{"role": "user", "content": "What is the weather in Paris right now?"}])

        @check
        def gguf_tool_call_comes_back_as_tool_calls():
            r = coder.chat.completions.create(**ask_tools)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.content is None, choice
            call = choice.message.tool_calls[0]
            assert call.id.startswith("call_") and call.type == "function", call
            assert call.function.name == "get_weather", call
            assert json.loads(call.function.arguments) == {"city": "Paris"}, call

        @check
        def gguf_tool_call_streams_as_tool_call_deltas():
            calls, finish = {}, None
            for chunk in coder.chat.completions.create(**ask_tools, stream=True):
                for choice in chunk.choices:
                    for delta in choice.delta.tool_calls or []:
                        entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                        entry["name"] += delta.function.name or ""
                        entry["arguments"] += delta.function.arguments or ""
                    finish = choice.finish_reason or finish
            assert finish == "tool_calls", finish
            assert [c["name"] for c in calls.values()] == ["get_weather"], calls
            assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}, calls

    passed = failed = 0
    try:
        for fn in checks:
            try:
                fn()
                passed += 1
                print(f"ok   {fn.__name__}")
            except Exception:  # noqa: BLE001 - report every failing check
                failed += 1
                print(f"FAIL {fn.__name__}")
                traceback.print_exc()
    finally:
        for proc in (server, local_server, mock, gguf_server, coder_server):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"openai SDK {openai.__version__}: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
