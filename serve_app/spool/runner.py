"""The spool loop: poll the folder, serve ready requests through a running glm-serve, answer the flags.

Concurrency: at most `concurrency` requests are in hand at once (one asyncio task each); the others stay on disk,
untouched, until a slot frees. Retries: a request whose server is unreachable, times out or answers 5xx/429 is
tried again with exponential backoff, up to `max_attempts` times, then answered with N.error; a 4xx is answered
with N.error at once (the server's message says why). Quit: `flags/quit.flag` stops new pick-ups; the loop ends
once the requests in hand are answered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx

from serve_app.spool.files import BACK, ERROR, PendingRequest, SpoolFolder, write_whole

log = logging.getLogger("serve_app.spool")

Outcome = tuple[Literal["back", "error", "retry"], str]


@dataclass(frozen=True)
class SpoolConfig:
    folder: Path
    url: str
    concurrency: int = 4
    model: str | None = None
    max_tokens: int | None = None
    poll_s: float = 0.15
    # A .request must keep its size, mtime and inode this long (and over two polls) before it is read.
    stable_s: float = 0.3
    max_attempts: int = 20
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    # Without max_tokens the server generates up to the window: allow a long answer, but notice a dead server fast.
    timeout_s: float = 600.0
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")

    @property
    def api_base(self) -> str:
        """The server's root: `http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all work."""
        base = self.url.rstrip("/")
        return base.removesuffix("/v1")


class Spool:
    def __init__(self, config: SpoolConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._folder = SpoolFolder(config.folder, config.stable_s)
        self._transport = transport  # tests inject one to play a failing server
        self._in_hand: dict[str, asyncio.Task[None]] = {}
        self.handled = 0  # requests answered, with a .back or an .error

    async def run(self) -> int:
        config = self._config
        self._folder.create()
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        async with httpx.AsyncClient(
            base_url=config.api_base, timeout=timeout, transport=self._transport
        ) as client:
            log.info(
                "Loaded. Serving %s through %s, up to %d requests at a time.",
                config.folder,
                config.api_base,
                config.concurrency,
            )
            log.info("Running...")
            quitting = False
            while True:
                if self._folder.take_flag("status"):
                    self._write_status()
                if not quitting and self._folder.take_flag("quit"):
                    quitting = True
                    log.info("Quit flag: finishing %d request(s) in hand.", len(self._in_hand))
                if quitting and not self._in_hand:
                    break
                if not quitting:
                    self._pick_up(client)
                await asyncio.sleep(config.poll_s)
        log.info("Stopped after %d request(s).", self.handled)
        return 0

    def _pick_up(self, client: httpx.AsyncClient) -> None:
        free = self._config.concurrency - len(self._in_hand)
        if free <= 0:
            # Still watch the waiting files, so they are ready the moment a slot frees.
            self._folder.ready(skip=set(self._in_hand))
            return
        for name in self._folder.ready(skip=set(self._in_hand))[:free]:
            pending = self._folder.read(name)
            if pending is None:
                continue
            task = asyncio.create_task(self._serve(client, pending), name=f"spool-{name}")
            self._in_hand[name] = task
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._in_hand = {name: held for name, held in self._in_hand.items() if held is not task}

    def _write_status(self) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        text = f"DateTime: {now}\nStatus: running\nHandledRequestsCount: {self.handled}\n"
        write_whole(self._folder.flags / "status.back", text)

    async def _serve(self, client: httpx.AsyncClient, pending: PendingRequest) -> None:
        started = time.monotonic()
        try:
            kind, text = await self._answer(client, pending)
            self._folder.answer(pending, BACK if kind == "back" else ERROR, text)
        except Exception:
            # A bug or a full disk: say so, and leave the files for the next pick-up rather than lose them.
            log.exception("%s: could not be answered; left in place", pending.name)
            return
        self.handled += 1
        took = time.monotonic() - started
        if kind == "back":
            log.info("%s: answered (%d characters, %.1f s).", pending.name, len(text), took)
        else:
            log.warning("%s: error: %s", pending.name, text.strip())

    async def _answer(self, client: httpx.AsyncClient, pending: PendingRequest) -> Outcome:
        config = self._config
        if pending.problem is not None:
            return "error", pending.problem + "\n"
        body = self._chat_body(pending)
        reason = ""
        for attempt in range(1, config.max_attempts + 1):
            kind, text = await self._attempt(client, body)
            if kind != "retry":
                return kind, text
            reason = text
            if attempt < config.max_attempts:
                delay = min(config.backoff_s * 2 ** (attempt - 1), config.max_backoff_s)
                delay *= random.uniform(0.8, 1.2)  # spread the retries of requests that failed together
                log.warning(
                    "%s: attempt %d/%d failed: %s; retrying in %.1f s.",
                    pending.name,
                    attempt,
                    config.max_attempts,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
        return "error", f"gave up after {config.max_attempts} attempts; last: {reason}\n"

    def _chat_body(self, pending: PendingRequest) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        for question, answer in pending.history:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": pending.text})
        body: dict[str, Any] = {"messages": messages, "stream": False}
        if self._config.model is not None:
            body["model"] = self._config.model
        if self._config.max_tokens is not None:
            body["max_tokens"] = self._config.max_tokens
        return body

    async def _attempt(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            return "retry", f"server unreachable ({type(exc).__name__}: {exc or 'no detail'})"
        status = response.status_code
        if status >= 500 or status in (408, 429):
            return "retry", f"server answered {status}: {_server_message(response)}"
        if status >= 400:
            return "error", f"server answered {status}: {_server_message(response)}\n"
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "error", f"server answered {status} without a chat completion: {response.text[:500]}\n"
        return "back", content if isinstance(content, str) else ""


def _server_message(response: httpx.Response) -> str:
    """The message of OpenAI's envelope or FastAPI's `detail`, else the raw body (cut short)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in body:
            return str(body["detail"])
    return response.text[:500]


class _SeedFormatter(logging.Formatter):
    """`[Info 2024-05-01 12:00:00]: Running...`, as the seed's command printed it (UTC)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime(datefmt or "%Y-%m-%d %H:%M:%S", time.gmtime(record.created))

    def format(self, record: logging.LogRecord) -> str:
        record.levelcap = record.levelname.capitalize()
        return super().format(record)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SeedFormatter("[%(levelcap)s %(asctime)s]: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_spool(config: SpoolConfig) -> int:
    """Serve the folder until `flags/quit.flag` (exit 0) or Ctrl-C/SIGTERM (130; unanswered requests stay on disk)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop ends like Ctrl-C
    try:
        return asyncio.run(Spool(config).run())
    except KeyboardInterrupt:
        log.info("Interrupted; unanswered requests stay in %s.", config.folder / "requests")
        return 130
