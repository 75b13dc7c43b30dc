"""Completion quality on real repositories: the same harness as ``keel eval``.

Run ``.venv/bin/python bench/eval_quality.py [--samples N] [--repo NAME[=PATH]]``;
results go to ``bench/results/`` (eval.md, eval.json, eval.png).
"""

from __future__ import annotations

import argparse
import sys

from keel.eval.arguments import add_arguments
from keel.eval.harness import run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
