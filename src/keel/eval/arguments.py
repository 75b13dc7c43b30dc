"""The arguments of ``keel eval`` (and ``bench/eval_quality.py``), apart from the
harness: every ``keel`` command builds the whole parser, and the harness brings the
completion pipeline and the index with it (~60 ms of a ``keel config check``)."""

from __future__ import annotations

import argparse

from keel.config import EMBEDDED_MODEL_ID

DEFAULT_PACKAGES = ("httpx", "click")
"""Installed packages used as repositories by default: real code, on every machine keel
is installed on (httpx is a dependency, click comes with uvicorn), written by no one here."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo",
        action="append",
        metavar="NAME[=PATH]",
        help="a repository: an installed package's name, or NAME=PATH (repeatable; "
        f"default: {', '.join(DEFAULT_PACKAGES)})",
    )
    parser.add_argument("--samples", type=int, default=40, help="samples per repository")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--max-input-length", type=int, default=640, help="prompt budget")
    parser.add_argument("--max-decoding-tokens", type=int, default=48, help="tokens generated")
    parser.add_argument("--model", default=EMBEDDED_MODEL_ID, help="local GGUF model id or path")
    parser.add_argument("--threads", type=int, help="CPU threads for the model")
    parser.add_argument(
        "--output", default="bench/results", help="directory for eval.json, eval.png, eval.md"
    )
    parser.add_argument(
        "--token-healing",
        action="store_true",
        help="also score '+token healing' (the prompt backs up to the start of a "
        "word the cursor is inside; the generation must begin with what was cut)",
    )
