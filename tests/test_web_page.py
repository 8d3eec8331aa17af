"""The web chat page at GET /, driven in a real browser (Debian's chromium through Playwright).

The replies come from the real app (tiny-glm streams random text), except in the rendering test, which feeds
the page a crafted stream so that there is hostile HTML and Markdown to render.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.secured_app import SecuredApp

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
expect = sync_api.expect

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHAT_URL = "**/v1/chat/completions"

# Records the length of the newest reply's text on every DOM change, so that the test sees each step of a
# reply that may stream in faster than a poll from Python could catch.
_RECORD_REPLY_LENGTHS = """
window.__lengths = [];
new MutationObserver(() => {
  const bodies = document.querySelectorAll(".message.assistant .body");
  if (bodies.length) window.__lengths.push(bodies[bodies.length - 1].textContent.length);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # Playwright cannot download its own browser here; Debian's chromium, without its network chatter.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


class ChatPage:
    """The page plus what it sent: every chat request's JSON body, and any script error it raised."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.chat_bodies: list[dict[str, Any]] = []
        self.script_errors: list[str] = []
        page.on("request", self._record)
        page.on("pageerror", lambda error: self.script_errors.append(str(error)))

    def _record(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(request.post_data_json)

    def send(self, text: str, max_tokens: int | None = None) -> None:
        if max_tokens is not None:
            self.page.fill("#max-tokens", str(max_tokens))
        self.page.evaluate("window.__lengths = []")
        self.page.fill("#prompt", text)
        self.page.click("#send")

    def wait_ready(self) -> None:
        """The reply is over and the page takes another message."""
        expect(self.page.locator("#send")).to_be_visible(timeout=60_000)
        expect(self.page.locator("#stop")).to_be_hidden()
        expect(self.page.locator("#prompt")).to_be_enabled()

    def last_reply(self) -> Any:
        return self.page.locator(".message.assistant .body").last

    def reply_lengths(self) -> list[int]:
        return list(self.page.evaluate("window.__lengths"))


@pytest.fixture
def chat(browser: Any, base_url: str) -> Iterator[ChatPage]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(_RECORD_REPLY_LENGTHS)
    page = context.new_page()
    chat_page = ChatPage(page)
    page.goto(f"{base_url}/")
    expect(page.locator("#model option")).not_to_have_count(0)
    # Greedy decoding, set through the page's own input: sampled from tiny-glm's random weights, a reply
    # sometimes ends at once with an end token; greedy, every prompt here runs to max tokens, every run.
    page.fill("#temperature", "0")
    yield chat_page
    context.close()
    assert chat_page.script_errors == []


def test_page_is_served_with_its_assets(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
        assert http.get(f"/{asset}").status_code == 200
    assert http.get("/static/..%2Fapp.py").status_code == 404
    # Offline: nothing is loaded from another host.
    assert "http://" not in page.text and "https://" not in page.text


def test_model_picker_offers_every_served_model(chat: ChatPage, http: httpx.Client) -> None:
    served = [card["id"] for card in http.get("/v1/models").json()["data"]]
    options = chat.page.locator("#model option").evaluate_all("options => options.map(o => o.value)")
    assert options == served and {"tiny-glm", "all-MiniLM-L6-v2"} <= set(options)
    assert chat.page.input_value("#model") == served[0] == "tiny-glm"


def test_reply_streams_in_and_the_conversation_is_kept(chat: ChatPage) -> None:
    # Enough tokens that even a fast machine takes several animation frames (the page renders once per frame).
    chat.send("Hello there", max_tokens=300)
    expect(chat.last_reply()).to_have_text(re.compile(r"\S"), timeout=60_000)
    chat.wait_ready()
    lengths = [n for n in chat.reply_lengths() if n > 0]
    assert len(set(lengths)) >= 2, f"the reply appeared at once, not streamed: {lengths}"
    first = chat.chat_bodies[-1]
    assert first["stream"] is True and first["model"] == "tiny-glm"
    assert first["temperature"] == 0 and first["max_tokens"] == 300
    assert first["messages"] == [{"role": "user", "content": "Hello there"}]

    chat.send("And again", max_tokens=16)
    chat.wait_ready()
    roles = [(m["role"], m["content"]) for m in chat.chat_bodies[-1]["messages"]]
    assert [r for r, _ in roles] == ["user", "assistant", "user"]
    assert roles[0][1] == "Hello there" and roles[1][1] and roles[2][1] == "And again"
    assert chat.page.locator(".message").count() == 4
    # Whatever the model wrote, it stayed text: no element inside a reply came from it.
    assert (
        chat.page.locator(".message.assistant .body *").count()
        == chat.page.locator(
            ".message.assistant .body :is(p, br, pre, code, strong, em, ul, ol, li, a, h3, h4, h5, h6)"
        ).count()
    )


def test_stop_ends_a_reply_midway(chat: ChatPage, http: httpx.Client) -> None:
    chat.send("Tell me a very long story", max_tokens=1500)
    expect(chat.last_reply()).to_have_text(re.compile(r"\S"), timeout=60_000)
    chat.page.click("#stop", timeout=5_000)  # fails if the reply had already ended
    chat.wait_ready()
    expect(chat.page.locator(".note.stopped")).to_have_text("Stopped.")
    stopped_at = chat.last_reply().inner_text()
    time.sleep(1.0)
    assert chat.last_reply().inner_text() == stopped_at and stopped_at.strip()
    # The server noticed the closed stream and dropped the sequence from its batch.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = http.get("/health").json()["deployments"].values()
        if sum(s.get("running_sequences", 0) for s in statuses) == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the chat replica kept generating after Stop")
    # The stopped reply counts as said: the next turn carries it.
    chat.send("Go on", max_tokens=8)
    chat.wait_ready()
    sent = chat.chat_bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].strip() and not chat.page.locator(".note.error").count()


def test_picked_model_is_used_by_the_next_request(chat: ChatPage) -> None:
    chat.page.select_option("#model", "all-MiniLM-L6-v2")
    assert chat.page.input_value("#model") == "all-MiniLM-L6-v2"
    chat.send("hi", max_tokens=8)
    chat.wait_ready()
    assert chat.chat_bodies[-1]["model"] == "all-MiniLM-L6-v2"
    # An embedding model cannot chat: the server's error is shown, and the failed turn is not kept.
    expect(chat.page.locator(".note.error")).to_contain_text("all-MiniLM-L6-v2")

    chat.page.select_option("#model", "tiny-glm")
    chat.send("hi again", max_tokens=8)
    chat.wait_ready()
    assert chat.chat_bodies[-1]["model"] == "tiny-glm"
    assert chat.chat_bodies[-1]["messages"] == [{"role": "user", "content": "hi again"}]
    expect(chat.page.locator(".message.assistant .meta").last).to_have_text("tiny-glm")


def test_new_chat_clears_the_conversation(chat: ChatPage) -> None:
    chat.send("first", max_tokens=8)
    chat.wait_ready()
    chat.page.click("#new-chat")
    expect(chat.page.locator(".message")).to_have_count(0)
    expect(chat.page.locator("#empty")).to_be_visible()
    chat.send("fresh start", max_tokens=8)
    chat.wait_ready()
    assert chat.chat_bodies[-1]["messages"] == [{"role": "user", "content": "fresh start"}]


HOSTILE_REPLY = (
    'Hi **there**, *you*. <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n\n'
    "```html\n<b>not bold</b> <iframe src=javascript:window.__pwned=3></iframe>\n```\n"
    "- [safe](https://example.com/?a=1&b=2)\n- [bad](javascript:window.__pwned=4) and `<i>code</i>`\n"
)


def _sse(*payloads: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(p)}\n\n" for p in payloads) + "data: [DONE]\n\n"


def _content(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def test_model_text_is_rendered_as_text_with_safe_markdown(chat: ChatPage) -> None:
    # Split mid-word and mid-tag, as a real stream may be; then an error event arrives mid-stream.
    pieces = [HOSTILE_REPLY[i : i + 7] for i in range(0, len(HOSTILE_REPLY), 7)]
    error = {"error": {"message": "The model failed while generating this reply.", "type": "server_error"}}
    body = _sse(*(_content(p) for p in pieces), error)
    chat.page.route(CHAT_URL, lambda route: route.fulfill(content_type="text/event-stream", body=body))
    chat.send("render this")
    chat.wait_ready()

    reply = chat.last_reply()
    assert chat.page.locator(".message :is(script, img, iframe, b, i)").count() == 0
    assert chat.page.evaluate("window.__pwned") is None
    expect(reply).to_contain_text('<img src=x onerror="window.__pwned=1">')
    expect(reply).to_contain_text("<script>window.__pwned=2</script>")
    expect(reply.locator("strong")).to_have_text("there")
    expect(reply.locator("em")).to_have_text("you")
    expect(reply.locator("pre code")).to_contain_text("<b>not bold</b>")
    expect(reply.locator("li code")).to_have_text("<i>code</i>")
    expect(reply.locator("a")).to_have_count(1)
    expect(reply.locator("a")).to_have_attribute("href", "https://example.com/?a=1&b=2")
    expect(reply).to_contain_text("[bad](javascript:window.__pwned=4)")
    expect(chat.page.locator(".note.error")).to_have_text(
        "Error: The model failed while generating this reply."
    )


def test_screenshots_laptop_and_phone(chat: ChatPage) -> None:
    """Not a check of looks (a person reviews the images), only that the page lays out at both sizes."""
    chat.send("你好！Write me something.", max_tokens=60)
    chat.wait_ready()
    body = _sse(_content("Sure. Here is **Markdown** with `inline code`:\n\n"), _content(HOSTILE_REPLY))
    chat.page.route(CHAT_URL, lambda route: route.fulfill(content_type="text/event-stream", body=body))
    chat.send("Show some Markdown")
    chat.wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    chat.page.screenshot(path=ARTIFACTS / "web_page_laptop.png")
    chat.page.set_viewport_size({"width": 390, "height": 844})
    # Phone width: nothing overflows sideways, and the composer is still on screen.
    assert chat.page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(chat.page.locator("#prompt")).to_be_in_viewport()
    chat.page.screenshot(path=ARTIFACTS / "web_page_phone.png")


def test_page_asks_for_the_api_key_once_and_sends_it(browser: Any, secured: SecuredApp) -> None:
    """Against the `secured` ingress (tests/secured_app.py): a key is asked for on the first 401, a refused key
    is asked for again, and the key then goes with every request, the streamed one included."""
    context = browser.new_context()
    page = context.new_page()
    chat = ChatPage(page)
    sent_keys: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent_keys.append((r.url, r.headers.get("authorization"))))
    page.goto(f"{secured.url}/")

    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=30_000)
    expect(page.locator("#key-message")).to_contain_text("needs an API key")
    page.fill("#api-key", "not-the-right-key")
    page.click("#key-submit")
    expect(page.locator("#key-message")).to_contain_text("refused", timeout=30_000)
    page.fill("#api-key", secured.env_key)
    page.click("#key-submit")
    expect(dialog).to_be_hidden()
    expect(page.locator("#model option")).not_to_have_count(0, timeout=30_000)

    page.fill("#temperature", "0")
    chat.send("Hello with a key", max_tokens=8)
    expect(chat.last_reply()).to_have_text(re.compile(r"\S"), timeout=60_000)
    chat.wait_ready()
    assert not page.locator(".note.error").count()
    chat_keys = [key for url, key in sent_keys if url.endswith("/v1/chat/completions")]
    assert chat_keys == [f"Bearer {secured.env_key}"]  # one request, with the key, no second ask

    # The key is kept for the tab: a reload asks no more.
    sent_keys.clear()
    page.reload()
    expect(page.locator("#model option")).not_to_have_count(0, timeout=30_000)
    expect(dialog).to_be_hidden()
    assert [key for url, key in sent_keys if url.endswith("/v1/models")] == [f"Bearer {secured.env_key}"]
    context.close()
    assert chat.script_errors == []
