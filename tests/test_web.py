"""The web chat page (server/web.py, server/web/*): served with its security headers, open without the
API key while every data route still needs it, and used in a real browser - Debian's chromium driven
headless by Playwright - against the real server with the tiny random model: an uploaded image, the
streamed answer and its stats, several images by drop and paste kept over turns, sampling settings and a
JSON schema, stopping a long answer (the server stops generating), the server's error messages,
thinking shown apart, reload and new chat, the API-key prompt, and the layout at phone and desktop widths.

Random weights write gibberish, so the page's answers are compared with what the API itself answers
to the same request."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import foveal
from foveal.bundled import build_random_model
from foveal.engine.generate import Chunk
from foveal.server import web

from live_server import MODEL, LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGE_TOKENS = 64
THOUGHT = ["<thi", "nk>a red", " circle</th", "ink>", "red"]


def png_bytes(size=(32, 32), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


# ---- the server: the tiny model, its engine wrapped so a test can slow it down or script it ------
class Pace:
    """Set by a test: `delay` seconds after each chunk (a long answer to stop), or `script`: the pieces
    to write instead of the model's (a thought). Counts the chunks the engine produced."""

    def __init__(self):
        self.delay, self.script, self.produced = 0.0, None, 0


@pytest.fixture(scope="module")
def pace():
    return Pace()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, pace):
    vlm = foveal.load(build_random_model(tmp_path_factory.mktemp("tiny") / MODEL), dtype="float32")
    real = vlm.engine.stream

    def paced(*args, **kwargs):
        if pace.script is not None:
            stats = args[5]
            for i, piece in enumerate(pace.script):
                yield Chunk(piece, [i])
            stats.generated_tokens = len(pace.script)
            yield Chunk("", [], done=True, finish_reason="stop", stats=stats)
            return
        for chunk in real(*args, **kwargs):
            pace.produced += 1
            yield chunk
            if pace.delay:
                time.sleep(pace.delay)

    vlm.engine.stream = paced
    return vlm


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(vlm) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(vlm):
    with LiveServer(vlm, api_key="s3cret") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def queued(http) -> int:
    return http.get("/health").json()["models"][0]["queued"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("web-images")
    out = {"red": root / "red.png", "blue": root / "blue.png", "bad": root / "bad.png"}
    out["red"].write_bytes(png_bytes())
    out["blue"].write_bytes(png_bytes(color=(0, 0, 255)))
    out["bad"].write_bytes(b"this is not a PNG at all" * 4)
    return out


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ---- the page over plain HTTP (no browser needed) ---------------------------------------------------
def test_the_package_ships_the_page_with_no_inline_script_and_no_other_host():
    assert {"index.html", "style.css", "app.js", "api.js", "attachments.js", "messages.js"} <= set(web.FILES)
    html = web.FILES["index.html"][0].decode()
    for tag in re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S):
        assert tag.strip() == "", "inline script"
    assert all('src="/web/' in t for t in re.findall(r"<script\b[^>]*>", html))
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "inline style"
    for name, (body, _) in web.FILES.items():
        text = body.decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, flags=re.I) or name == "icon.svg", name
        assert "innerHTML" not in text and "eval(" not in text, name


def test_root_serves_the_page_to_browsers_and_plain_text_to_clients(http):
    page = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/web/app.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    plain = http.get("/")
    assert plain.text == "foveal is running" and plain.headers["content-type"].startswith("text/plain")
    assert http.head("/").status_code == 200
    assert http.get("/web/").text == page.text
    head = http.head("/web/app.js")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(web.FILES["app.js"][0])
    js = http.get("/web/app.js")
    assert js.headers["content-type"].startswith("text/javascript") and "import" in js.text
    assert http.get("/web/style.css").headers["content-type"].startswith("text/css")
    assert http.get("/web", follow_redirects=False).headers["location"] == "/web/"


@pytest.mark.parametrize("path", ["/web/nope.js", "/web/..%2Fweb.py", "/web/%2E%2E/app.py", "/web/../security.py",
                                  "/web/__init__.py"])
def test_only_the_page_files_are_served(http, path):
    r = http.get(path)
    assert r.status_code == 404 and "error" in r.json(), path


def test_with_a_key_the_page_is_open_and_the_data_is_not(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        assert c.get("/", headers={"Accept": "text/html"}).status_code == 200
        for path in ("/web/", "/web/app.js", "/web/api.js"):
            assert c.get(path).status_code == 200, path
        for method, path in (("GET", "/api/tags"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/api/chat"),
                             ("POST", "/web/app.js"), ("GET", "/api/ps")):
            assert c.request(method, path).status_code in (401,), (method, path)
        assert c.get("/api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ---- in the browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/setup.sh test does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    problems = []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    pg.problems = problems
    yield pg
    context.close()


def settings(pg, **values):
    if pg.locator("#settings").get_attribute("open") is None:
        pg.click("#settings summary")
    for name, value in values.items():
        pg.fill(f"#{name}", str(value))


def attach_file(pg, path: Path, count: int):
    pg.set_input_files("#file", str(path))
    pg.wait_for_function(f"() => document.querySelectorAll('#attachments img').length === {count}")


def ask(pg, text: str, n: int):
    """Send `text`, wait for answer number n (1-based) to end; its locator."""
    pg.fill("#prompt", text)
    pg.click("#send")
    answer = pg.locator(".msg.assistant").nth(n - 1)
    answer.and_(pg.locator(":not(.pending)")).wait_for(timeout=30_000)
    return answer


def stat(answer, key: str) -> str:
    return answer.locator(f"[data-stat={key}]").text_content()


def api_chat(http, messages, **options) -> dict:
    r = http.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False, "options": options})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_question_with_an_uploaded_image_streams_the_answer_and_its_stats(page, http, images, pace):
    settings(page, temperature=0.7, **{"top-p": 0.9, "max-tokens": 12, "seed": 7})
    attach_file(page, images["red"], 1)
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => { window.updates += 1; })
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    pace.delay = 0.05
    try:
        answer = ask(page, "What colour is this?", 1)
    finally:
        pace.delay = 0.0
    expected = api_chat(http, [{"role": "user", "content": "What colour is this?", "images": [b64(images["red"])]}],
                        temperature=0.7, top_p=0.9, num_predict=12, seed=7)
    assert answer.locator(".text").text_content() == expected["message"]["content"]
    assert page.evaluate("window.updates") > 6         # the answer grew piece by piece
    assert stat(answer, "prompt_tokens").startswith(f"{expected['prompt_eval_count']} prompt tokens")
    assert stat(answer, "images") == f"1 image = {IMAGE_TOKENS} image tokens"
    assert stat(answer, "generated_tokens") == f"{expected['eval_count']} generated tokens"
    for key in ("preprocess", "vision_encode", "prefill", "total"):
        assert re.fullmatch(r"[a-z ]+ \d+(\.\d+)? m?s", stat(answer, key)), key
    assert re.fullmatch(r"decode \d+(\.\d+)? m?s \(\d+\.\d tok/s\)", stat(answer, "decode"))
    user = page.locator(".msg.user").first
    assert user.locator(".text").text_content() == "What colour is this?"
    assert user.locator("img").count() == 1 and user.locator("img").evaluate("i => i.naturalWidth") == 32
    assert page.locator("#attachments img").count() == 0 and page.input_value("#prompt") == ""
    assert page.problems == []


def drop_js(selector: str, kind: str) -> str:
    """Script that drops (or pastes) the PNGs given as base64 onto `selector`."""
    make = "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})" if kind == "drop" \
        else "new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true})"
    return f"""(pngs) => {{
        const dt = new DataTransfer();
        pngs.forEach((b, i) => dt.items.add(new File([Uint8Array.from(atob(b), c => c.charCodeAt(0))],
                                                    'img' + i + '.png', {{type: 'image/png'}})));
        document.querySelector('{selector}').dispatchEvent({make});
    }}"""


def test_images_by_drop_and_paste_stay_in_the_conversation(page, http, images):
    settings(page, temperature=0, **{"max-tokens": 4})
    page.evaluate(drop_js("#log", "drop"), [b64(images["blue"])])
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 1")
    first = ask(page, "First picture.", 1)
    assert stat(first, "images") == f"1 image = {IMAGE_TOKENS} image tokens"
    second = ask(page, "And without a picture?", 2)
    assert stat(second, "images") == f"1 image = {IMAGE_TOKENS} image tokens"     # the first turn's image
    page.evaluate(drop_js("#prompt", "paste"), [b64(images["red"]), b64(images["blue"])])
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 2")
    page.click("#attachments .remove >> nth=1")                                       # take one back
    page.evaluate(drop_js("#prompt", "paste"), [b64(images["blue"])])
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 2")
    third = ask(page, "Two more.", 3)
    assert stat(third, "images") == f"3 images = {3 * IMAGE_TOKENS} image tokens"
    assert page.locator(".msg.user").nth(2).locator("img").count() == 2
    history = [{"role": "user", "content": "First picture.", "images": [b64(images["blue"])]},
               {"role": "assistant", "content": first.locator(".text").text_content()},
               {"role": "user", "content": "And without a picture?"},
               {"role": "assistant", "content": second.locator(".text").text_content()},
               {"role": "user", "content": "Two more.", "images": [b64(images["red"]), b64(images["blue"])]}]
    expected = api_chat(http, history, temperature=0, num_predict=4)
    assert third.locator(".text").text_content() == expected["message"]["content"]
    assert stat(third, "prompt_tokens").startswith(f"{expected['prompt_eval_count']} prompt tokens")


def test_stop_ends_the_generation_on_the_server(page, http, pace):
    settings(page, temperature=0, **{"max-tokens": 1500})
    pace.delay, pace.produced = 0.05, 0            # 1500 tokens: over a minute if nothing stops it
    try:
        page.fill("#prompt", "Tell me a very long story.")
        page.click("#send")
        assert page.locator("#send").is_hidden()
        page.wait_for_function("() => document.querySelector('.msg.assistant .text').textContent.length > 0")
        assert queued(http) == 1
        page.click("#stop")
        page.locator(".msg.assistant.stopped [data-stat=stopped]").wait_for()
        deadline = time.time() + 10
        while queued(http) != 0:
            assert time.time() < deadline, "the server went on generating after the page stopped"
            time.sleep(0.05)
        produced = pace.produced
        time.sleep(0.3)
        assert pace.produced == produced < 200
    finally:
        pace.delay = 0.0
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    assert page.locator("#status").text_content() == "Stopped."
    settings(page, **{"max-tokens": 3})
    after = ask(page, "Still there?", 2)                     # the page and the server go on
    assert stat(after, "generated_tokens") == "3 generated tokens"


def test_server_errors_show_the_servers_message(page, http, images):
    bad = http.post("/api/chat", json={"model": MODEL, "messages": [
        {"role": "user", "content": "Look.", "images": [b64(images["bad"])]}]})
    assert bad.status_code == 400
    attach_file(page, images["bad"], 1)
    answer = ask(page, "Look.", 1)
    assert answer.locator(".error").text_content() == bad.json()["error"]
    assert "image" in bad.json()["error"]

    long = "word " * 3000
    too_long = http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": long.strip()}]})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]
    answer = ask(page, long, 2)
    assert answer.locator(".error").text_content() == too_long.json()["error"]

    settings(page, temperature=-1)
    answer = ask(page, "Hot?", 3)
    assert "temperature" in answer.locator(".error").text_content()
    settings(page, temperature="", format='{"type": "object", "properties": ')
    page.fill("#prompt", "JSON please")
    page.click("#send")
    assert "not valid JSON" in page.locator("#status").text_content()
    assert page.locator(".msg.assistant").count() == 3                   # not sent
    settings(page, format='{"type": 5}')
    answer = ask(page, "JSON please", 4)
    assert answer.locator(".error").text_content().strip() != ""
    assert page.locator(".msg.user.left-out").count() == 4                # none is in the conversation
    settings(page, temperature=0, format="", **{"max-tokens": 2})     # greedy: a sampled EOS could end it at 0
    ok = ask(page, "Fine now?", 5)
    assert stat(ok, "prompt_tokens").startswith(
        f"{api_chat(http, [{'role': 'user', 'content': 'Fine now?'}], num_predict=1)['prompt_eval_count']} ")
    assert stat(ok, "generated_tokens") == "2 generated tokens"


def test_a_json_schema_shapes_the_answer(page):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    settings(page, temperature=0, format=json.dumps(schema), **{"max-tokens": 60})
    answer = ask(page, "Which colour?", 1)
    assert json.loads(answer.locator(".text").text_content())["color"] in ("red", "blue")


def test_the_thought_is_shown_apart_and_folds(page, pace):
    pace.script = THOUGHT
    try:
        answer = ask(page, "What colour is the circle?", 1)
    finally:
        pace.script = None
    thought = answer.locator("details.thought")
    assert thought.is_visible() and thought.locator(".thought-text").text_content() == "a red circle"
    assert answer.locator(".text").text_content() == "red"
    assert thought.get_attribute("open") is None                          # folded once the answer began
    assert thought.locator(".thought-text").is_hidden()
    thought.locator("summary").click()
    assert thought.locator(".thought-text").is_visible()
    settings(page)
    page.uncheck("#think")
    pace.script = THOUGHT
    try:
        answer = ask(page, "Again, no thought", 2)
    finally:
        pace.script = None
    assert answer.locator("details.thought").is_hidden() and answer.locator(".text").text_content() == "red"


def test_reload_and_new_chat_start_afresh(page, http):
    settings(page, temperature=0, **{"max-tokens": 2})
    ask(page, "Remember this.", 1)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    fresh = ask(page, "Hello?", 1)
    alone = api_chat(http, [{"role": "user", "content": "Hello?"}], temperature=0, num_predict=2)
    assert stat(fresh, "prompt_tokens").startswith(f"{alone['prompt_eval_count']} prompt tokens")
    page.reload()
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    settings(page, temperature=0, **{"max-tokens": 2})
    again = ask(page, "Hello?", 1)
    assert stat(again, "prompt_tokens") == stat(fresh, "prompt_tokens")


def test_the_page_asks_for_the_api_key_once_per_tab(browser, keyed_server):
    context = browser.new_context()
    pg = context.new_page()
    sent = []
    pg.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))) if "/api/" in r.url else None)
    try:
        pg.goto(keyed_server.url + "/")
        dialog = pg.locator("#key-dialog")
        dialog.wait_for()
        assert pg.locator("#key-error").text_content() == ""
        pg.fill("#key", "wrong")
        pg.click("#key-form button[type=submit]")
        pg.wait_for_function("() => document.getElementById('key-error').textContent.includes('refused')")
        assert dialog.is_visible()
        pg.fill("#key", "s3cret")
        pg.click("#key-form button[type=submit]")
        pg.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
        assert dialog.is_hidden()
        settings(pg, **{"max-tokens": 2})
        answer = ask(pg, "With a key.", 1)
        assert stat(answer, "generated_tokens") == "2 generated tokens"
        assert pg.evaluate("sessionStorage.getItem('foveal.apiKey')") == "s3cret"
        pg.reload()
        pg.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
        assert dialog.is_hidden()                                            # asked once per tab
        assert [a for u, a in sent if u.endswith("/api/chat")] == ["Bearer s3cret"]
        assert [a for u, a in sent if u.endswith("/api/tags")] == [None, "Bearer wrong", "Bearer s3cret",
                                                                   "Bearer s3cret"]
        pg.evaluate("sessionStorage.setItem('foveal.apiKey', 'stale')")
        pg.reload()
        dialog.wait_for()
        pg.click("#key-cancel")
        assert "needs an API key" in pg.locator("#status").text_content()
    finally:
        context.close()


@pytest.mark.parametrize("width,height", [(390, 844), (1280, 800)])
def test_layout_at_phone_and_desktop_widths(browser, server, images, tmp_path, width, height):
    context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
    pg = context.new_page()
    try:
        pg.goto(server.url + "/")
        pg.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
        settings(pg, temperature=0, **{"max-tokens": 20})
        pg.click("#settings summary")                                        # fold the settings again
        attach_file(pg, images["red"], 1)
        ask(pg, "A long unbroken word: " + "x" * 300, 1)
        for selector in ("#prompt", "#send", "#model", "#new-chat", "label[for=file]"):
            box = pg.locator(selector).bounding_box()
            assert pg.locator(selector).is_visible(), selector
            assert box["x"] >= 0 and box["y"] >= 0, selector
            assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, selector
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        assert pg.evaluate("document.getElementById('log').scrollWidth <= document.getElementById('log').clientWidth")
        send, prompt = pg.locator("#send").bounding_box(), pg.locator("#prompt").bounding_box()
        assert prompt["width"] >= width * 0.4 and send["height"] >= 32
        shot = tmp_path / f"web-{width}x{height}.png"
        pg.screenshot(path=str(shot))
        assert Image.open(shot).size == (width, height)
    finally:
        context.close()
