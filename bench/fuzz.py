"""Fuzz every route with schemathesis against the app's own /openapi.json; the long run of tests/test_fuzz.py.

    python bench/fuzz.py                       # start the demo app, fuzz it (long profile), stop it
    python bench/fuzz.py --url http://127.0.0.1:8000 --examples 20   # a running server instead

Schemathesis generates requests from the OpenAPI document (valid ones and, in the negative mode, ones that break
the schema) in four phases: the documented examples, coverage (boundary values, missing and unexpected fields,
unsupported methods), random fuzzing, and stateful sequences that follow the document's links (GET /v1/models ->
GET /v1/models/{model_id}, POST /tokenize -> POST /detokenize). Every answer is checked: no 5xx, the status code
is documented, and the content type, headers and body (every server-sent event of a stream too) match the
document. Prints the number of requests, the count per status code and every failure; exits 1 on any failure or
if fewer requests than --min-requests were made.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import schemathesis
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import EngineFinished, FatalError, NonFatalError, ScenarioFinished

# Everything schemathesis checks that applies to this API. Left out, with the reason:
# - positive_data_acceptance: a schema-valid body may still be refused by rules a JSON schema cannot state
#   (an unknown model: 404; a prompt beyond the context window: 400), which is the documented answer.
# - negative_data_rejection: the request models parse in pydantic's lax mode, as FastAPI and the seed servers do,
#   so `"stream": 0` or `"temperature": false` is read as the number or flag it stands for, not refused. Negative
#   cases still go through every check above (no 5xx, documented status and body).
# - use_after_free, ensure_resource_availability, ignored_auth, missing_required_header and
#   object_level_authorization: the API has no resources to delete and, in this profile, no authentication.
# - max_response_time: no timing assertions on this shared, slow machine.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",
    "allow_header_conformance",
]


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    requests_per_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # each failed check, with a curl to reproduce it
    errors: list[str] = field(default_factory=list)  # schemathesis' own trouble (network errors, bad schema)

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def record(self, event: ScenarioFinished) -> None:
        recorder = event.recorder
        for interaction in recorder.interactions.values():
            self.requests += 1
            self.requests_per_operation[recorder.label] += 1
            if interaction.response is not None:
                self.statuses[interaction.response.status_code] += 1
        for checks in recorder.checks.values():
            for check in checks:
                if check.status == Status.FAILURE and check.failure_info is not None:
                    failure = check.failure_info.failure
                    curl = check.failure_info.steps[-1].curl if check.failure_info.steps else ""
                    detail = "\n    ".join(failure.message.splitlines()[:6])
                    self.failures.append(
                        f"{recorder.label}: {check.name}: {failure.title}\n    {detail}\n  {curl}"
                    )

    def summary(self) -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.statuses.items()))
        lines = [
            f"requests: {self.requests}",
            f"per status: {statuses}",
            f"5xx: {self.server_errors}",
            f"failed checks (schema violations, undocumented answers, 5xx): {len(self.failures)}",
            "per operation: "
            + ", ".join(f"{label} {count}" for label, count in sorted(self.requests_per_operation.items())),
        ]
        lines += [f"FAILURE {failure}" for failure in dict.fromkeys(self.failures)]
        lines += [f"ERROR {error}" for error in self.errors]
        return "\n".join(lines)


def fuzz_config(examples: int, seed: int, stateful_steps: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": seed,
            # Deterministic: the same seed gives the same requests, and no example database is kept between runs.
            "generation": {
                "mode": "all",
                "max-examples": examples,
                "deterministic": True,
                "database": "none",
                # Each failure is reported as found: shrinking it would cost more requests than the CI run has.
                "no-shrink": True,
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "phases": {"stateful": {"max-steps": stateful_steps}},
            "request-timeout": 120,
            "continue-on-failure": True,
            # Its default masks any field named like a secret, `max_tokens` included, in the curl lines printed.
            "output": {"sanitization": {"enabled": False}},
            # A chat completion may generate up to the context window (a second or so here): slow by Hypothesis'
            # standards, not a problem of the generated data.
            "suppress-health-check": ["too_slow", "filter_too_much"],
        }
    )


def fuzz(base_url: str, examples: int, seed: int = 6, stateful_steps: int = 6) -> FuzzReport:
    """Run every phase against `base_url`; `examples` bounds the generated cases per operation and phase."""
    config = fuzz_config(examples, seed, stateful_steps)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    report = FuzzReport()
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished):
            report.record(event)
        elif isinstance(event, NonFatalError):
            report.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, EngineFinished):
            break
    return report


@contextmanager
def demo_app() -> Iterator[str]:
    """The demo profile on a private Ray, as the test session runs it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from serve_app.profiles import build_demo_app
    from serve_app.runtime import serving, stop_on_signals
    from tests.conftest import _free_port

    stop_on_signals()  # Ctrl-C/SIGTERM: stop the app's every process within seconds, also while it starts

    ray_dir = tempfile.mkdtemp(prefix="ray-fuzz-", dir="/tmp")
    # The replicas log every request: kept in their log files rather than between this script's figures.
    with serving(build_demo_app(), port=_free_port(), _temp_dir=ray_dir, log_to_driver=False) as url:
        print(f"demo app at {url}; replica logs under {ray_dir}/session_latest/logs/serve", flush=True)
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running glm-serve; default: start the demo app")
    parser.add_argument("--examples", type=int, default=40, help="generated cases per operation and phase")
    parser.add_argument("--stateful-steps", type=int, default=20, help="most calls in one stateful sequence")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=1000)
    args = parser.parse_args()

    def run(url: str) -> FuzzReport:
        return fuzz(url, args.examples, args.seed, args.stateful_steps)

    if args.url:
        report = run(args.url.rstrip("/"))
    else:
        with demo_app() as url:
            report = run(url)
    print(report.summary(), flush=True)
    ok = not report.failures and not report.errors and report.server_errors == 0
    if report.requests < args.min_requests:
        print(f"only {report.requests} requests, fewer than --min-requests {args.min_requests}")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
