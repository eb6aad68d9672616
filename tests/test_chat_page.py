"""The chat page at `/`, driven in a real headless Chromium (Debian's chromium + chromedriver,
through Selenium): `k2lite serve` on k2-nano, a prompt typed and sent, the streamed answer,
stop, settings, history, API key, and model text that tries to be HTML.

Answers that k2-nano cannot give (reasoning, tool calls, an endless one to stop) are scripted
by wrapping the scheduler's sampling (conftest.scripted_sampling), as in test_server.py: the
model still runs every step.
Set K2LITE_SCREENSHOT=path.png to keep the screenshot (the README's docs/chat-page.png).
"""
import json
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason='the server needs its extra: pip install "k2lite[serve]"')
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")

import k2lite  # noqa: E402
from k2lite.serve import serve  # noqa: E402
from conftest import last_message_text, scripted_sampling  # noqa: E402
from test_server import REPO, Held, wait_idle  # noqa: E402

NANO = os.path.join(REPO, "models", "k2-nano")


def find_browser():
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no headless browser here: apt-get install chromium chromium-driver (.ci/run does)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    binary, driver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,860", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)   # installed but broken: a failure
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server():
    """k2-nano with K2.6's chat template (k2-nano itself is a base model: it has none), so the
    page shows the thinking switch."""
    llm = k2lite.load(NANO, threads=1, context=2048, chat_template="kimi-k2.6")
    srv = serve(llm, port=0, max_batch=4, block=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_server():
    """k2-nano as shipped: a base model, which the page continues text with."""
    srv = serve(k2lite.load(NANO, threads=1, context=2048), port=0, max_batch=2, block=False)
    yield srv
    srv.stop()


class Script:
    """Records every chat request's body and answers listed prompts with scripted text (the
    scheduler's sampling wrapped, conftest.scripted_sampling); `close()` puts both back."""

    def __init__(self, srv, monkeypatch):
        import k2lite.serve.transport as http
        self.srv, self.bodies, self.answers, self.release = srv, [], {}, threading.Event()
        real = http.chat_request

        def recording(llm, body, *args):
            self.bodies.append(body)
            return real(llm, body, *args)
        monkeypatch.setattr(http, "chat_request", recording)
        self._sampling = scripted_sampling(srv.scheduler, self.pick)
        self._sampling.__enter__()

    def pick(self, req):
        key = last_message_text(self.srv.llm.tokenizer, req.prompt)
        if key not in self.answers:
            return None
        text, slow = self.answers[key]
        ids = self.srv.llm.tokenizer.encode(text)
        return Held(ids, self.release) if slow else ids

    def close(self):
        self.release.set()
        self._sampling.__exit__(None, None, None)


def js(b, code, *args):
    return b.execute_script(code, *args)


def wait(b, cond, timeout=30, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = js(b, "return " + cond)
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {cond}\n" + js(b, "return document.getElementById('messages').innerText"))


def send(b, text):
    box = b.find_element("id", "prompt")
    box.clear()
    box.send_keys(text)
    b.find_element("id", "send").click()


def last(b, what):
    return js(b, f"const m = [...document.querySelectorAll('.msg.assistant')].pop(); return {what};")


def set_field(b, id_, value):
    js(b, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
          "e.dispatchEvent(new Event('change'));", id_, value)


def test_chat_page_in_a_real_browser(browser, server, tmp_path, monkeypatch):
    b = browser
    script = Script(server, monkeypatch)
    try:
        b.get(server.url + "/")
        assert b.title == "k2lite chat"
        wait(b, "document.getElementById('model').textContent", what="the model name")
        assert b.find_element("id", "model").text == "k2-nano"

        assert "hybrid" in b.find_element("id", "mode").text

        # 1. a real answer from k2-nano, greedy, thinking off: what the page shows is what the API returns
        b.find_element("id", "toggle-settings").click()
        assert b.find_element("id", "thinking").is_displayed()     # K2.6's template has the switch
        b.find_element("id", "thinking").click()                     # thinking off
        set_field(b, "temperature", "0")
        set_field(b, "max_tokens", "24")
        prompt = "It is a truth universally acknowledged"
        send(b, prompt)
        wait(b, "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant')"
                ".dataset.state === 'done'", what="the first answer")
        shown = last(b, "m.querySelector('.content').textContent")
        api = server.llm.chat([{"role": "user", "content": prompt}], max_tokens=24, temperature=0, thinking=False)
        assert shown and shown == api.content
        stats = last(b, "m.querySelector('.stats').textContent")
        assert "24 tokens" in stats and "tok/s" in stats and "(0 cached)" in stats and "length" in stats, stats
        body = script.bodies[-1]
        assert body["temperature"] == 0 and body["max_tokens"] == 24 and body["stream"] is True
        assert body["chat_template_kwargs"] == {"thinking": False}

        # 2. the second turn sends the history back, and reuses the first turn's cache
        b.find_element("id", "thinking").click()                     # thinking on
        send(b, "And then?")
        wait(b, "document.querySelectorAll('.msg.assistant')[1].dataset.state === 'done'", what="the second answer")
        body = script.bodies[-1]
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][1]["content"] == shown and body["chat_template_kwargs"] == {"thinking": True}
        cached = int(last(b, "m.querySelector('.stats').textContent").split("(")[1].split()[0])
        assert cached > 0

        # 3. reasoning folded above the answer, a tool call as a block; reasoning goes back in history
        set_field(b, "max_tokens", "1000")
        script.answers["Weather in Paris?"] = (
            "<think>The user wants the weather; call the tool.</think>Checking the weather."
            '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
            '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>', False)
        send(b, "Weather in Paris?")
        wait(b, "document.querySelectorAll('.msg.assistant')[2].dataset.state === 'done'", what="the tool call")
        assert last(b, "m.querySelector('details.reasoning .text').textContent") == \
            "The user wants the weather; call the tool."
        assert last(b, "!m.querySelector('details.reasoning').hidden && !m.querySelector('details.reasoning').open")
        assert last(b, "m.querySelector('details.reasoning summary').textContent") == "Reasoning · 8 words"
        assert last(b, "getComputedStyle(m.querySelector('details.reasoning')).color") != \
            last(b, "getComputedStyle(m.querySelector('.content')).color")            # dimmed
        assert last(b, "m.querySelector('.content').textContent") == "Checking the weather."
        assert last(b, "m.querySelector('.tool b').textContent") == "get_weather"
        assert '"city": "Paris"' in last(b, "m.querySelector('.tool').textContent")
        assert "tool_calls" in last(b, "m.querySelector('.stats').textContent")
        set_field(b, "max_tokens", "30")
        send(b, "thanks")
        wait(b, "document.querySelectorAll('.msg.assistant')[3].dataset.state === 'done'", what="the fourth answer")
        sent = script.bodies[-1]["messages"][-2]
        assert sent["reasoning_content"] == "The user wants the weather; call the tool."
        assert sent["tool_calls"][0]["function"]["name"] == "get_weather"

        # 4. stop on a long answer: the fetch is aborted and the server frees the sequence
        cancelled = server.scheduler.cancelled
        script.answers["Write a long story"] = ("<think>" + "Planning a long story. " * 10 + "</think>"
                                                + "Once upon a time " * 300, True)
        set_field(b, "max_tokens", "500")
        send(b, "Write a long story")
        wait(b, "(document.querySelectorAll('.msg.assistant')[4].querySelector('summary').textContent || '')"
                ".startsWith('Thinking… ')", what="reasoning streaming, folded")
        assert last(b, "!m.querySelector('details.reasoning').open && m.querySelector('.rtext, .text').textContent")
        wait(b, "(document.querySelectorAll('.msg.assistant')[4].querySelector('.content').textContent || '')"
                ".length > 20", what="streamed text")
        assert js(b, "return document.getElementById('send').disabled && !document.getElementById('stop').disabled")
        assert last(b, "m.querySelector('details.reasoning').open === false")        # folded while streaming
        assert last(b, "m.querySelector('details.reasoning summary').textContent") == "Reasoning · 40 words"
        assert last(b, "m.dataset.state") == "streaming"
        b.find_element("id", "stop").click()
        wait(b, "document.querySelectorAll('.msg.assistant')[4].dataset.state === 'stopped'", what="stopped")
        t0 = time.time()
        stats = wait_idle(server, timeout=5)
        assert time.time() - t0 < 1.0 and server.scheduler.cancelled == cancelled + 1 and stats["live"] == 0
        partial = last(b, "m.querySelector('.content').textContent")
        assert partial.startswith("Once upon a time") and len(partial) < len("Once upon a time " * 300)
        assert not js(b, "return document.getElementById('send').disabled")

        # 5. HTML from the user or the model stays text
        evil = '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'
        script.answers[evil] = (f"<think>{evil}</think>{evil}", False)
        send(b, evil)
        wait(b, "document.querySelectorAll('.msg.assistant')[5].dataset.state === 'done'", what="the evil answer")
        time.sleep(0.3)
        assert js(b, "return document.querySelectorAll('#messages img, #messages script, .content b').length") == 0
        assert js(b, "return window.__pwned === undefined")
        assert last(b, "m.querySelector('.content').textContent") == evil
        assert last(b, "m.querySelector('details.reasoning .text').textContent") == evil
        assert js(b, "return [...document.querySelectorAll('.msg.user .content')].pop().textContent") == evil

        # 6. a server with an API key: the page asks for it, then works
        server.api_keys = [b"page-key"]
        b.get(server.url + "/")
        wait(b, "document.getElementById('keyrow').classList.contains('need')", what="the key field")
        set_field(b, "api_key", "page-key")
        send(b, "Hi")
        wait(b, "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant')"
                ".dataset.state === 'done'", what="an answer with the key")
        assert b.find_element("id", "model").text == "k2-nano"

        # the screenshot (the README's): a conversation with reasoning, a tool call and stats
        b.get(server.url + "/")
        set_field(b, "max_tokens", "40")
        script.answers["What is the capital of France? Check the weather there too."] = (
            "<think>The capital of France is Paris. The user also wants the weather, so I should call "
            "get_weather with city Paris.</think>The capital of France is Paris. Let me check its weather."
            '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
            '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>', False)
        b.find_element("id", "toggle-settings").click()
        set_field(b, "temperature", "0")
        b.find_element("id", "thinking").click()     # off: k2-nano answers in content
        send(b, "It is a truth universally acknowledged")
        wait(b, "document.querySelectorAll('.msg.assistant')[0]?.dataset.state === 'done'", what="screenshot turn 1")
        set_field(b, "max_tokens", "300")
        send(b, "What is the capital of France? Check the weather there too.")
        wait(b, "document.querySelectorAll('.msg.assistant')[1]?.dataset.state === 'done'", what="screenshot turn 2")
        js(b, "document.querySelectorAll('.msg.assistant details.reasoning')[1].open = true")
        png = os.environ.get("K2LITE_SCREENSHOT") or str(tmp_path / "chat-page.png")
        assert b.save_screenshot(png)
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert json.loads(json.dumps(script.bodies[-1]))["messages"][-1]["role"] == "user"
    finally:
        script.close()
        server.api_keys = []


def test_a_base_model_page_continues_text(browser, base_server):
    """No chat template (k2-nano as shipped): the page says so, hides the thinking switch, and
    continues the typed text through /v1/completions, with no conversation kept."""
    b = browser
    b.get(base_server.url + "/")
    wait(b, "document.getElementById('mode').textContent", what="the mode")
    assert "base model" in b.find_element("id", "mode").text
    b.find_element("id", "toggle-settings").click()
    assert not b.find_element("id", "thinking").is_displayed()
    set_field(b, "temperature", "0")
    set_field(b, "max_tokens", "16")
    prompt = "It is a truth universally acknowledged"
    for turn in range(2):            # the same text twice: no history, the same continuation
        send(b, prompt)
        wait(b, f"document.querySelectorAll('.msg.assistant')[{turn}]?.dataset.state === 'done'",
             what="the continuation")
        shown = last(b, "m.querySelector('.content').textContent")
        assert shown == base_server.llm.generate(prompt, max_tokens=16, temperature=0).text
        assert "16 tokens" in last(b, "m.querySelector('.stats').textContent")
