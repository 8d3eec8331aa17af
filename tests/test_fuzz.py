"""Schemathesis against the session app's own /openapi.json: the short profile of bench/fuzz.py (the long run).

Every route and method, valid and schema-breaking requests, boundary values, unsupported methods, and stateful
sequences along the document's links: no answer is a 5xx, and every status code, content type, header and body
(each server-sent event of a stream too) is what the document says.
"""

from __future__ import annotations

import httpx
import pytest

from bench.fuzz import FuzzReport, fuzz

# A few generated cases per operation and phase keep the run to a minute or two here; the coverage phase adds its
# boundary cases (a few hundred requests in all). bench/fuzz.py runs the same with many more.
CI_EXAMPLES = 2


@pytest.fixture(scope="module")
def report(base_url: str) -> FuzzReport:
    return fuzz(base_url, examples=CI_EXAMPLES, stateful_steps=4)


def test_no_server_error_nor_schema_violation(report: FuzzReport) -> None:
    problems = report.failures + report.errors
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    assert report.server_errors == 0, report.summary()


def test_every_documented_operation_was_fuzzed(http: httpx.Client, report: FuzzReport) -> None:
    document = http.get("/openapi.json").json()
    operations = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert operations <= set(report.requests_per_operation), report.summary()
    assert report.requests_per_operation["Stateful tests"] > 0, report.summary()


def test_fuzzing_reached_both_answers_and_refusals(report: FuzzReport) -> None:
    # Guards the run itself: requests that all failed validation (or all passed) would test little.
    assert report.statuses[200] > 0 and report.statuses[400] > 0 and report.statuses[422] > 0, (
        report.summary()
    )
    assert report.statuses[405] > 0, report.summary()  # unsupported methods were tried


def test_server_still_healthy_after_fuzzing(http: httpx.Client, report: FuzzReport) -> None:
    assert report.requests > 0
    assert http.get("/health").status_code == 200
