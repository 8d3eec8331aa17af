"""The spool folder on disk: its layout, which requests are ready to read, and whole-file writes.

A client writes `requests/N.history` (optional) and then `requests/N.request`. A file is read only once its
size, mtime and inode have not changed for `stable_s` (over at least two polls), so a request still being written
is left alone; writing to another name and renaming it to `N.request` is the safe way for a client.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

REQUEST = ".request"
HISTORY = ".history"
BACK = ".back"
ERROR = ".error"

# (size, mtime_ns, inode): a rewrite in place changes size or mtime, a rename over the file changes the inode.
Signature = tuple[int, int, int]


class BadRequestFile(ValueError):
    """A history file that can never be sent: answered with N.error, never retried."""


def signature(path: Path) -> Signature | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def write_whole(path: Path, text: str) -> None:
    """Write `text` to a hidden temp file beside `path`, then rename it over `path`: readers see all or nothing."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def remove_if_unchanged(path: Path, seen: Signature | None) -> None:
    """Remove `path` only if it is still the file that was read: a client may already have written it anew."""
    if seen is not None and signature(path) == seen:
        path.unlink(missing_ok=True)


def parse_history(text: str) -> list[tuple[str, str]]:
    """`N.history`: empty, or a JSON list of [question, answer] pairs of strings."""
    if not text.strip():
        return []
    try:
        pairs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestFile(f"history is not valid JSON: {exc}") from None
    if not isinstance(pairs, list):
        raise BadRequestFile(
            f"history must be a JSON list of [question, answer] pairs, not {type(pairs).__name__}"
        )
    history = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)):
            raise BadRequestFile(
                f"history item {index} is not a [question, answer] pair of strings: {pair!r}"
            )
        history.append((pair[0], pair[1]))
    return history


@dataclass(frozen=True)
class PendingRequest:
    """A request read from disk, with the signatures of the files it came from (to remove exactly those)."""

    name: str
    text: str
    history: list[tuple[str, str]]
    request_seen: Signature
    history_seen: Signature | None
    problem: str | None = None


class SpoolFolder:
    """`requests/` and `flags/` under one folder, and the stability watch over `requests/*.request`."""

    def __init__(self, root: Path, stable_s: float) -> None:
        self.requests = root / "requests"
        self.flags = root / "flags"
        self._stable_s = stable_s
        # name -> (signature, monotonic time it was first seen with that signature, polls seen with it)
        self._watch: dict[str, tuple[Signature, float, int]] = {}

    def create(self) -> None:
        self.requests.mkdir(parents=True, exist_ok=True)
        self.flags.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, suffix: str) -> Path:
        return self.requests / f"{name}{suffix}"

    def ready(self, skip: set[str]) -> list[str]:
        """Names whose `.request` has been stable long enough, oldest first; `skip` (in hand) is not watched."""
        now = time.monotonic()
        found: dict[str, tuple[Signature, float, int]] = {}
        ready: list[tuple[int, str]] = []
        try:
            entries = list(os.scandir(self.requests))
        except FileNotFoundError:  # someone removed the folder: make it again rather than stop serving
            self.create()
            return []
        for entry in entries:
            if not entry.name.endswith(REQUEST) or not entry.is_file():
                continue
            name = entry.name[: -len(REQUEST)]
            if not name or name in skip:
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            sig = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            previous = self._watch.get(name)
            if previous is None or previous[0] != sig:
                found[name] = (sig, now, 1)
                continue
            found[name] = (sig, previous[1], previous[2] + 1)
            if previous[2] + 1 >= 2 and now - previous[1] >= self._stable_s:
                ready.append((stat.st_mtime_ns, name))
        self._watch = found
        return [name for _, name in sorted(ready)]

    def read(self, name: str) -> PendingRequest | None:
        """Read a ready request and its history; None if it vanished or changed meanwhile (looked at again later).

        A file that can never be sent (not UTF-8, malformed history) comes back with `problem` set.
        """
        request_path, history_path = self.path(name, REQUEST), self.path(name, HISTORY)
        request_seen, history_seen = signature(request_path), signature(history_path)
        if request_seen is None:
            return None
        try:
            raw = request_path.read_bytes()
            history_raw = history_path.read_bytes() if history_seen is not None else b""
        except FileNotFoundError:
            return None
        if signature(request_path) != request_seen:
            self._watch.pop(name, None)
            return None
        pending = PendingRequest(name, "", [], request_seen, history_seen)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return replace(pending, problem=f"{name}{REQUEST} is not UTF-8 text: {exc}")
        try:
            history = parse_history(history_raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return replace(pending, problem=f"{name}{HISTORY} is not UTF-8 text: {exc}")
        except BadRequestFile as exc:
            return replace(pending, problem=f"{name}{HISTORY}: {exc}")
        return replace(pending, text=text, history=history)

    def answer(self, pending: PendingRequest, suffix: str, text: str) -> None:
        """Write N.back or N.error whole, drop a stale answer of the other kind, then remove what was read."""
        name = pending.name
        write_whole(self.path(name, suffix), text)
        self.path(name, ERROR if suffix == BACK else BACK).unlink(missing_ok=True)
        remove_if_unchanged(self.path(name, REQUEST), pending.request_seen)
        remove_if_unchanged(self.path(name, HISTORY), pending.history_seen)

    def take_flag(self, flag: str) -> bool:
        """True (and the flag removed) if `flags/<flag>.flag` exists."""
        path = self.flags / f"{flag}.flag"
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
