"""Completion-quality harness: ``keel eval`` and ``bench/eval_quality.py``."""
