"""`glm-serve spool DIR --url URL`: the file spool of seed 002 (chatapi-server-module), served by glm-serve.

Clients drop `requests/N.request` (and optionally `requests/N.history`) into DIR and read `requests/N.back`;
`flags/status.flag` and `flags/quit.flag` ask for a status and a clean exit. `files.py` owns the folder on disk,
`runner.py` the polling loop and the HTTP calls.
"""

from serve_app.spool.runner import Spool, SpoolConfig, configure_logging, run_spool

__all__ = ["Spool", "SpoolConfig", "configure_logging", "run_spool"]
