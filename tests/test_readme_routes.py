"""The README's route table and the app's OpenAPI schema list the same routes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

README = Path(__file__).resolve().parents[1] / "README.md"
_ROW = re.compile(r"^\| (GET|POST|DELETE|PUT) \| (/\S*) \|", re.MULTILINE)


def test_route_table_matches_openapi(http: httpx.Client) -> None:
    documented = {(method, path) for method, path in _ROW.findall(README.read_text())}
    schema = http.get("/openapi.json").json()
    served = {
        (method.upper(), re.sub(r"\{(\w+):path\}", r"{\1}", path))
        for path, operations in schema["paths"].items()
        for method in operations
    }
    assert documented == served
