"""`glm-serve demo`: run the whole graph on CPU with the embedded models until interrupted.

`glm-serve spool DIR --url URL`: serve a folder of request files through a running glm-serve (seed 002).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import httpx

from serve_app.runtime import metrics_url, serving


def _demo(args: argparse.Namespace) -> int:
    from serve_app.profiles import build_demo_app

    stop = threading.Event()

    def stop_on_signals() -> None:
        # After ray.init, whose own SIGTERM handler would abort the process without stopping Serve and Ray.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    app = build_demo_app({"cache_dir": args.cache_dir, "chat_models": args.chat_model or []})
    with serving(
        app, args.host, args.port, metrics_port=args.metrics_port, on_ray_started=stop_on_signals
    ) as url:
        models = [card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]]
        print(f"glm-serve is ready at {url}  (models: {', '.join(models)})", flush=True)
        print(f"Prometheus metrics (Ray's and glm-serve's): {metrics_url()}", flush=True)
        print("The tiny chat model has random weights: its replies are gibberish. Ctrl-C stops.", flush=True)
        while not stop.is_set():
            stop.wait(0.5)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from serve_app.chatglm.checkpoint import UnsupportedCheckpoint, convert
    from serve_app.chatglm.weights import CheckpointError

    started = time.perf_counter()
    tokenizer_model = Path(args.tokenizer_model) if args.tokenizer_model else None
    try:
        checkpoint = convert(Path(args.src), Path(args.dst), tokenizer_model)
    except (UnsupportedCheckpoint, CheckpointError) as exc:
        print(f"glm-serve convert: {exc}", file=sys.stderr)
        return 2
    print(
        f"{checkpoint.family} checkpoint converted to {args.dst} in {time.perf_counter() - started:.1f} s: "
        "load it with AutoModelForCausalLM/AutoTokenizer, or give it (or the original folder) as a chat "
        "model's path",
        flush=True,
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _spool(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serve_app.spool import SpoolConfig, configure_logging, run_spool

    configure_logging()
    config = SpoolConfig(
        folder=Path(args.dir),
        url=args.url,
        concurrency=args.concurrency,
        model=args.model,
        max_tokens=args.max_tokens,
    )
    return run_spool(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-serve")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="serve the embedded tiny models on CPU")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument(
        "--metrics-port", type=int, default=None, help="Ray's Prometheus port (default: a free one, printed)"
    )
    demo.add_argument(
        "--cache-dir", default=None, help="where the tiny GLM is built (default ~/.cache/glm-serve)"
    )
    demo.add_argument(
        "--chat-model",
        action="append",
        metavar="PATH",
        help="also serve this chat model folder, named after it (an original ChatGLM2/3-6B folder is converted "
        "once into ~/.cache/glm-serve/converted); repeatable",
    )
    convert = commands.add_parser(
        "convert",
        help="convert an original ChatGLM2-6B/ChatGLM3-6B folder to a native transformers GLM folder",
    )
    convert.add_argument("src", metavar="SRC", help="the original folder (config.json model_type 'chatglm')")
    convert.add_argument("dst", metavar="DST", help="the folder to write (made if missing)")
    convert.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="FILE",
        help="the SentencePiece tokenizer.model to use (default: SRC's)",
    )
    spool = commands.add_parser(
        "spool",
        help="answer requests/N.request files in DIR through a running glm-serve (README: File spool)",
    )
    spool.add_argument("dir", metavar="DIR", help="the spool folder; requests/ and flags/ are made in it")
    spool.add_argument("--url", required=True, help="the running glm-serve, e.g. http://127.0.0.1:8000")
    spool.add_argument(
        "--concurrency", type=_positive_int, default=4, metavar="N", help="requests served at once"
    )
    spool.add_argument(
        "--model", default=None, metavar="M", help="chat model to ask (default: the server's default)"
    )
    spool.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="reply length cap (default: fill the window)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "spool":
        return _spool(args)
    if args.command == "convert":
        return _convert(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
