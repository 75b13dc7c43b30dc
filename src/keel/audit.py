"""The audit log: one JSON line per control-plane change, appended under the data root.

Each line: time, key id (a hash; never the key), action, target, result and
detail. Written synchronously with a flush: these are rare and must not be lost. An
entry the file cannot take (a full disk) goes to keel's log instead, and the change it
records stands: a reload on a full disk applied, then answered 500.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("keel.audit")


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def record(
        self,
        action: str,
        *,
        key_id: str | None,
        result: str,
        target: str | None = None,
        detail: str | None = None,
    ) -> None:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "key_id": key_id,
            "action": action,
            "target": target,
            "result": result,
            "detail": detail,
        }
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as file:
                file.write(line)
                file.flush()
        except OSError as exc:
            log.error("audit log %s not written (%s); the entry: %s", self.path, exc, line.strip())

    def entries(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
