"""The audit log when its file cannot take an entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from keel.audit import AuditLog


def test_an_entry_the_file_cannot_take_goes_to_the_log_and_the_change_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload on a full disk applied its change, then answered 500 (the audit write
    raised): the entry goes to keel's log instead, whole."""
    path = tmp_path / "audit.log"
    path.mkdir()  # where the file should be: any write fails
    audit = AuditLog(path)
    with caplog.at_level(logging.ERROR, logger="keel.audit"):
        audit.record("reload", key_id="k-1234", result="ok", detail="keys: 2")
    said = caplog.text
    assert "not written" in said and str(path) in said
    assert '"action":"reload"' in said and '"detail":"keys: 2"' in said
