"""`glm-serve spool` (seed 002's file spool, ../shared/COMPAT.md) run as a real process against the real app.

Between the spool and the app sits a small TCP forwarder: it records what the spool sent, can hold the app's
answers back (to keep requests in flight), and can stop and start again on the same port (the server going down
and coming back) without touching the shared Serve instance.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from serve_app.runtime import free_ports
from serve_app.spool import Spool, SpoolConfig

GLM_SERVE = str(Path(sys.executable).with_name("glm-serve"))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def drop(folder: Path, name: str, text: str, history: str | None = None) -> None:
    """What a careful client does: the history first, then the request written elsewhere and renamed in."""
    requests = folder / "requests"
    if history is not None:
        (requests / f"{name}.history").write_text(history, encoding="utf-8")
    part = requests / f"{name}.request.part"
    part.write_text(text, encoding="utf-8")
    os.replace(part, requests / f"{name}.request")


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / "requests"))


def status(folder: Path) -> list[str]:
    back = folder / "flags" / "status.back"
    back.unlink(missing_ok=True)
    (folder / "flags" / "status.flag").touch()
    wait_for(back.exists, "flags/status.back")
    assert not (folder / "flags" / "status.flag").exists()
    return back.read_text(encoding="utf-8").splitlines()


def assert_status(lines: list[str], handled: int) -> None:
    assert len(lines) == 3 and lines[1:] == ["Status: running", f"HandledRequestsCount: {handled}"]
    stamp = re.fullmatch(r"DateTime: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", lines[0])
    assert stamp, lines[0]
    when = datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60  # UTC, not local time


class Forwarder:
    """A TCP forwarder to the app on a fixed port of its own, run on an event loop in a thread."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_ports(1, range(29000, 30000))[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.captured: list[bytearray] = []  # spool -> app bytes, one buffer per connection
        # Requests in flight: a connection is busy from the spool's bytes until the app's first answer bytes.
        # Open sockets would over-count: a kept-alive connection the server drops is replaced by a new one.
        self._busy: set[object] = set()
        self.max_busy = 0
        self.holding = threading.Event()  # while set, the app's answers are kept back
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)

        self._call(start())

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a server that dies does."""

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        self._call(stop())

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _connection(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            app_reader, app = await asyncio.open_connection(*self._target)
        except OSError:
            client.transport.abort()
            return
        capture = bytearray()
        self.captured.append(capture)
        self._writers |= {client, app}
        connection = object()
        try:
            await asyncio.gather(
                self._pipe(client_reader, app, connection, capture),
                self._pipe(app_reader, client, connection, None),
            )
        finally:
            self._busy.discard(connection)
            self._writers -= {client, app}

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: object, capture: Any
    ) -> None:
        try:
            while data := await reader.read(65536):
                if capture is not None:
                    capture.extend(data)
                    self._busy.add(connection)
                    self.max_busy = max(self.max_busy, len(self._busy))
                else:
                    while self.holding.is_set() and not writer.is_closing():
                        await asyncio.sleep(0.02)
                    self._busy.discard(connection)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the POST /v1/chat/completions requests that reached the app so far."""
        bodies = []
        for buffer in list(self.captured):
            data = bytes(buffer)
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if not sep:
                    break
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                if len(rest) < size:
                    break
                if head.startswith(b"POST /v1/chat/completions "):
                    bodies.append(json.loads(rest[:size]))
                data = rest[size:]
        return bodies


class SpoolProcess:
    def __init__(self, folder: Path, url: str, *options: str) -> None:
        self.folder = folder
        self.log_path = folder.with_suffix(".log")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [GLM_SERVE, "spool", str(folder), "--url", url, *options],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(lambda: "Running..." in self.log(), "the spool to start", timeout_s=30)
        assert (folder / "requests").is_dir() and (folder / "flags").is_dir()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def quit(self) -> int:
        (self.folder / "flags" / "quit.flag").touch()
        return self.process.wait(timeout=60)


@pytest.fixture
def forwarder(base_url: str) -> Iterator[Forwarder]:
    forwarder = Forwarder(base_url)
    forwarder.start()
    yield forwarder
    forwarder.holding.clear()
    forwarder.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Callable[..., SpoolProcess]]:
    started: list[SpoolProcess] = []

    def start(url: str, *options: str) -> SpoolProcess:
        started.append(SpoolProcess(tmp_path / f"spool{len(started)}", url, *options))
        return started[-1]

    yield start
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_twenty_requests_at_once_are_all_answered(
    forwarder: Forwarder, spool: Callable[..., SpoolProcess]
) -> None:
    run = spool(forwarder.url, "--max-tokens", "16")
    assert_status(status(run.folder), handled=0)
    names = [str(n) for n in range(20)]
    for name in names:
        drop(run.folder, name, f"问题 {name}: what comes next?")
    wait_for(lambda: files(run.folder) == sorted(f"{n}.back" for n in names), "20 .back files", timeout_s=90)
    answers = [(run.folder / "requests" / f"{name}.back").read_text(encoding="utf-8") for name in names]
    # The replies are sampled (temperature 1): the tiny random model sometimes picks its end token first, and an
    # empty reply is then the right answer; twenty empty ones would mean the text never reached the files.
    assert any(answers), answers
    assert_status(status(run.folder), handled=20)
    bodies = forwarder.chat_bodies()
    # Each question asked (a request that met a dropped kept-alive connection is rightly sent again).
    asked = {body["messages"][-1]["content"] for body in bodies}
    assert asked == {f"问题 {name}: what comes next?" for name in names}, run.log()
    assert all("model" not in body and body["max_tokens"] == 16 and not body["stream"] for body in bodies)
    # Several at a time, never more than --concurrency (4).
    assert 2 <= forwarder.max_busy <= 4, (forwarder.max_busy, run.log())
    assert run.quit() == 0


def test_server_outage_loses_no_request(forwarder: Forwarder, spool: Callable[..., SpoolProcess]) -> None:
    run = spool(forwarder.url, "--max-tokens", "16")
    forwarder.holding.set()
    names = [f"q{n}" for n in range(12)]
    for name in names:
        drop(run.folder, name, f"question {name}")
    wait_for(lambda: len(forwarder.chat_bodies()) >= 4, "four requests in flight")
    forwarder.stop()  # the in-flight ones lose their connection; new ones are refused
    wait_for(lambda: run.log().count("server unreachable") >= 6, "the spool retrying", timeout_s=30)
    assert not [name for name in files(run.folder) if not name.endswith(".request")]
    forwarder.holding.clear()
    forwarder.start()
    wait_for(lambda: files(run.folder) == sorted(f"{n}.back" for n in names), "12 .back files", timeout_s=90)
    assert "ConnectError" in run.log()  # it really met a refused connection, not only a cut one
    assert run.quit() == 0


def test_quit_finishes_the_requests_in_hand_then_exits_0(
    forwarder: Forwarder, spool: Callable[..., SpoolProcess]
) -> None:
    run = spool(forwarder.url, "--max-tokens", "16", "--concurrency", "2")
    forwarder.holding.set()
    drop(run.folder, "a", "first")
    drop(run.folder, "b", "second")
    wait_for(lambda: len(forwarder.chat_bodies()) == 2, "both requests in flight")
    quit_flag = run.folder / "flags" / "quit.flag"
    quit_flag.touch()
    wait_for(lambda: not quit_flag.exists(), "the quit flag to be taken")
    drop(run.folder, "c", "after quit: left for the next run")
    time.sleep(1)
    assert run.process.poll() is None, "exited with requests in hand"
    forwarder.holding.clear()
    assert run.process.wait(timeout=60) == 0
    assert files(run.folder) == ["a.back", "b.back", "c.request"]
    assert "Stopped" in run.log()


def test_history_is_sent_and_a_half_written_request_is_read_whole(
    forwarder: Forwarder, spool: Callable[..., SpoolProcess]
) -> None:
    run = spool(forwarder.url, "--max-tokens", "16")
    requests = run.folder / "requests"
    pairs = [["你好", "你好！有什么可以帮你？"], ["what is 2+2?", "4"]]
    (requests / "h.history").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    parts = ["part one, ", "part two, ", "part three, ", "part four, ", "part five, ", "the end 🚀"]
    with (requests / "h.request").open("w", encoding="utf-8") as writer:  # in place, with pauses: careless
        for part in parts:
            writer.write(part)
            writer.flush()
            time.sleep(0.12)
    wait_for(lambda: files(run.folder) == ["h.back"], "h.back alone")
    (body,) = forwarder.chat_bodies()  # one request only: no half was ever sent
    assert body["messages"] == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "".join(parts)},
    ]
    drop(run.folder, "e", "no history this time", history="")
    wait_for(lambda: files(run.folder) == ["e.back", "h.back"], "e.back")
    assert forwarder.chat_bodies()[-1]["messages"] == [{"role": "user", "content": "no history this time"}]
    assert run.quit() == 0


def test_a_reused_name_is_served_again(forwarder: Forwarder, spool: Callable[..., SpoolProcess]) -> None:
    run = spool(forwarder.url, "--max-tokens", "16", "--model", "tiny-glm")
    back = run.folder / "requests" / "1.back"
    drop(run.folder, "1", "first")
    wait_for(lambda: files(run.folder) == ["1.back"], "the first 1.back")
    first = back.stat().st_ino
    drop(run.folder, "1", "second")
    wait_for(lambda: files(run.folder) == ["1.back"] and back.stat().st_ino != first, "a new 1.back")
    bodies = forwarder.chat_bodies()
    assert [body["messages"][-1]["content"] for body in bodies] == ["first", "second"]
    assert all(body["model"] == "tiny-glm" for body in bodies)
    assert_status(status(run.folder), handled=2)
    assert run.quit() == 0


def test_requests_that_cannot_be_answered_get_an_error(
    base_url: str, spool: Callable[..., SpoolProcess]
) -> None:
    run = spool(base_url, "--max-tokens", "16")
    requests = run.folder / "requests"
    drop(run.folder, "bad", "hello", history='[["question", ')
    drop(run.folder, "pairs", "hello", history='[["only a question"]]')
    (requests / "binary.request").write_bytes(b"\xff\xfe not utf-8")
    drop(run.folder, "long", "word " * 6000)  # far over tiny-glm's 2048-token window: the server's 400
    expected = ["bad.error", "binary.error", "long.error", "pairs.error"]
    wait_for(lambda: files(run.folder) == expected, "four .error files")
    assert "history is not valid JSON" in (requests / "bad.error").read_text(encoding="utf-8")
    assert "[question, answer] pair" in (requests / "pairs.error").read_text(encoding="utf-8")
    assert "not UTF-8" in (requests / "binary.error").read_text(encoding="utf-8")
    long_error = (requests / "long.error").read_text(encoding="utf-8")
    assert long_error.startswith("server answered 400: ") and "context" in long_error, long_error
    assert_status(status(run.folder), handled=4)
    assert run.quit() == 0


def test_5xx_is_retried_and_a_dead_server_is_given_up_on(tmp_path: Path) -> None:
    """In process, with a scripted server: 503 twice then an answer; always refused; the bounded attempts."""
    calls: dict[str, int] = {}

    def server(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        calls[text] = calls.get(text, 0) + 1
        if text == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if text == "flaky" and calls[text] <= 2:
            return httpx.Response(503, json={"error": {"message": "no replica"}})
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"re: {text}"}}]}
        return httpx.Response(200, json=answer)

    config = SpoolConfig(folder=tmp_path, url="http://spool.test/v1/", max_attempts=3, backoff_s=0.01)
    outcome: list[int] = []
    worker = threading.Thread(
        target=lambda: outcome.append(asyncio.run(Spool(config, httpx.MockTransport(server)).run()))
    )
    worker.start()
    try:
        wait_for((tmp_path / "requests").is_dir, "the folders")
        drop(tmp_path, "flaky", "flaky")
        drop(tmp_path, "down", "down")
        wait_for(lambda: files(tmp_path) == ["down.error", "flaky.back"], "flaky.back and down.error")
    finally:
        (tmp_path / "flags" / "quit.flag").touch()
        worker.join(timeout=30)
    assert outcome == [0]
    assert calls == {"flaky": 3, "down": 3}
    assert (tmp_path / "requests" / "flaky.back").read_text(encoding="utf-8") == "re: flaky"
    error = (tmp_path / "requests" / "down.error").read_text(encoding="utf-8")
    assert error.startswith("gave up after 3 attempts") and "server unreachable" in error
