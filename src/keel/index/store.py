"""One repository's BM25 index on disk, updated incrementally.

Layout under ``<data root>/index/<name>/``: ``tantivy/`` (the index: one
document per chunk) and ``files.json`` (the manifest: for every file seen,
its mtime, size, ctime and content hash). An update lists the repository, re-reads
only files whose mtime, size or ctime (a ``chmod``) changed, re-chunks only those
whose content hash changed, deletes the chunks of files that are gone or can no
longer be read, and commits once.
The manifest is written after the commit: a crash in between makes the next
update redo those files, which is harmless because a file's chunks are
always replaced as a whole.

Searching uses a searcher cached until the next update, so a query costs
one tantivy search and no file-system work. Updates and searches may run in
different threads; one lock serialises updates within a process, tantivy's
own lock file across processes (``keel index`` while the server runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tantivy

from keel.errors import Unavailable
from keel.index.chunk import chunk_file
from keel.index.tokens import document_terms
from keel.index.walk import (
    checkout_trouble,
    list_source_files,
    read_source,
    skip_reason,
    snippet_language,
)

log = logging.getLogger("keel.index")

MANIFEST_VERSION = 3
"""Raised whenever chunking or terms change: an index of another version is rebuilt."""
WRITER_HEAP_BYTES = 32_000_000
LOW_DISK_BYTES = 64 * 2**20
"""Free space under which a failed update says its disk may be full."""

Progress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, relpath)`` while an update reads files."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk found by a search."""

    path: str
    start_line: int
    end_line: int
    body: str
    score: float


@dataclass(slots=True)
class UpdateStats:
    """What one update did; ``read`` lists every file whose content was read."""

    files: int = 0
    chunks: int = 0
    read: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.reindexed or self.removed)


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("path", stored=True, tokenizer_name="raw")
    builder.add_text_field("language", tokenizer_name="raw")
    builder.add_text_field("terms", tokenizer_name="whitespace")
    builder.add_bytes_field("body", stored=True)
    builder.add_unsigned_field("start_line", stored=True)
    builder.add_unsigned_field("end_line", stored=True)
    return builder.build()


class RepositoryIndex:
    """The index of the repository checked out at ``root``, kept in ``directory``."""

    def __init__(self, name: str, root: Path, directory: Path, *, max_file_bytes: int) -> None:
        self.name = name
        self.root = root
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self._schema = _schema()
        self._update_lock = threading.Lock()
        self._index: tantivy.Index | None = None
        self._searcher: tantivy.Searcher | None = None
        self._loaded = -1
        """The :meth:`stamp` of the state the searcher reads."""
        self._broken: str | None = None
        """Why the last reload failed (its files damaged or deleted), until one works."""

    @property
    def _tantivy_dir(self) -> Path:
        return self.directory / "tantivy"

    @property
    def _manifest_file(self) -> Path:
        return self.directory / "files.json"

    def _load_manifest(self) -> dict[str, dict[str, Any]] | None:
        """The manifest, ``{}`` for a new index, None when unreadable or of another version."""
        try:
            data = json.loads(self._manifest_file.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return None
        files = data.get("files")
        return files if isinstance(files, dict) else None

    def stamp(self) -> int:
        """Which committed state the index is in: it changes with every update that
        changed something, by this process or another (``keel index``)."""
        try:
            return self._manifest_file.stat().st_mtime_ns
        except OSError:
            return 0

    def _save_manifest(self, files: dict[str, dict[str, Any]]) -> None:
        tmp = self._manifest_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}), "utf-8")
        os.replace(tmp, self._manifest_file)

    def _open(self, *, create: bool) -> tantivy.Index | None:
        if self._index is not None:
            return self._index
        path = self._tantivy_dir
        if self.exists():
            try:
                self._index = tantivy.Index(self._schema, path=str(path), reuse=True)
            except ValueError:
                if not create:
                    return None
                shutil.rmtree(path)  # written by an incompatible keel: rebuild
                self._manifest_file.unlink(missing_ok=True)
        if self._index is None and create:
            path.mkdir(parents=True, exist_ok=True)
            self._index = tantivy.Index(self._schema, path=str(path), reuse=False)
        return self._index

    def exists(self) -> bool:
        path = self._tantivy_dir
        return path.is_dir() and bool(tantivy.Index.exists(str(path)))

    def reload(self) -> None:
        """Make the newest committed state (possibly written by another process) searchable."""
        stamp = self.stamp()
        index = self._open(create=False)
        if index is not None:
            try:
                index.reload()
            except ValueError as exc:  # its files were deleted or damaged: nothing to search
                self._index = self._searcher = None
                self._loaded, self._broken = stamp, str(exc)
                raise
            self._searcher = index.searcher()
            self._loaded, self._broken = stamp, None

    def lost(self) -> str | None:
        """Why this index, once built, cannot be searched now (its directory deleted or
        its files damaged under keel), or None."""
        if self._broken is not None:
            return self._broken
        return None if self.exists() else "it is gone"

    def update(self, progress: Progress | None = None) -> UpdateStats:
        """Bring the index in line with the files on disk; see the module docstring."""
        with self._update_lock:
            try:
                return self._update(progress)
            except (ValueError, OSError) as exc:  # tantivy's, and the manifest's
                raise Unavailable(self._not_written(exc), code="index_failed") from None

    def _not_written(self, exc: Exception) -> str:
        """Why an update failed, said so an operator can act: a full disk showed as
        tantivy's "An index writer was killed.. A worker thread encountered an error
        (io::Error most likely) or panicked", every round, naming no directory."""
        said = f"index of {self.name!r} in {self.directory} could not be written: {exc}"
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return said
        if free < LOW_DISK_BYTES:
            return f"{said} (its disk has {free / 2**20:.1f} MiB free: is it full?)"
        return said

    def _update(self, progress: Progress | None) -> UpdateStats:
        started = time.monotonic()
        stats = UpdateStats()
        if (trouble := checkout_trouble(self.root)) is not None:
            raise Unavailable(f"repository {self.name!r}: {trouble}", code="index_failed")
        self.directory.mkdir(parents=True, exist_ok=True)
        # Opened again each time: the index kept open was used after its files were
        # deleted or damaged, and every refresh failed ("being written by another
        # process") until a restart. Opened anew, a broken index is rebuilt.
        self._index = None
        existed = self.exists()
        index = self._open(create=True)
        assert index is not None
        manifest = self._load_manifest() if existed else {}  # a new index has nothing
        before = json.dumps(manifest, sort_keys=True)
        files = list_source_files(
            self.root, max_file_bytes=self.max_file_bytes, skipped=stats.skipped
        )
        stats.files = len(files)
        real_root = self.root.resolve()
        current = {f.relpath for f in files}
        stats.removed = sorted(set(manifest or {}) - current)
        writer: tantivy.IndexWriter | None = None

        def open_writer() -> tantivy.IndexWriter:
            nonlocal writer
            if writer is None:
                try:
                    writer = index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
                except ValueError as exc:
                    raise Unavailable(
                        f"index of {self.name!r} is being written by another process "
                        f"({exc}); try again when it is done",
                        code="index_busy",
                    ) from None
            return writer

        if manifest is None:  # unknown state: start over
            open_writer().delete_all_documents()
            manifest = {}
        for path in stats.removed:
            open_writer().delete_documents_by_term("path", path)
            del manifest[path]
        for done, source in enumerate(files, 1):
            if progress is not None:
                progress(done, len(files), source.relpath)
            entry = manifest.get(source.relpath)
            stamp = {"mtime_ns": source.mtime_ns, "size": source.size, "ctime_ns": source.ctime_ns}
            if entry is not None and all(entry.get(key) == value for key, value in stamp.items()):
                stats.chunks += int(entry.get("chunks", 0))
                if entry.get("skipped"):  # still skipped, and said so on every run
                    stats.skipped[source.relpath] = str(entry["skipped"])
                continue
            content = read_source(source.path, real_root)
            if isinstance(content, str):  # unreadable now: its old chunks leave the index
                stats.skipped[source.relpath] = content
                if manifest.pop(source.relpath, None) is not None:
                    open_writer().delete_documents_by_term("path", source.relpath)
                    stats.removed.append(source.relpath)
                continue
            stats.read.append(source.relpath)
            digest = hashlib.sha1(content).hexdigest()
            if entry is not None and entry.get("sha1") == digest:
                entry.update(stamp)
                stats.chunks += int(entry.get("chunks", 0))
                if entry.get("skipped"):
                    stats.skipped[source.relpath] = str(entry["skipped"])
                continue
            new_entry: dict[str, Any] = {**stamp, "sha1": digest, "chunks": 0}
            reason = skip_reason(content)
            if entry is not None or reason is None:
                open_writer().delete_documents_by_term("path", source.relpath)
            if reason is not None:
                new_entry["skipped"] = reason
                stats.skipped[source.relpath] = reason
            else:
                try:
                    chunks = chunk_file(source.relpath, content.decode("utf-8"))
                except Exception as exc:  # one file's trouble is no repository's failure
                    log.warning("%s: %s: not indexed: %r", self.name, source.relpath, exc)
                    chunks, new_entry["skipped"] = [], f"could not be read into chunks: {exc!r}"
                    stats.skipped[source.relpath] = new_entry["skipped"]
                for chunk in chunks:
                    open_writer().add_document(
                        tantivy.Document(
                            path=source.relpath,
                            language=snippet_language(source.language),
                            terms=document_terms(chunk.text),
                            body=chunk.text.encode("utf-8"),
                            start_line=chunk.start_line,
                            end_line=chunk.end_line,
                        )
                    )
                new_entry["chunks"] = len(chunks)
                stats.chunks += len(chunks)
            stats.reindexed.append(source.relpath)
            manifest[source.relpath] = new_entry
        if writer is not None:
            writer.commit()
            writer.wait_merging_threads()
        if json.dumps(manifest, sort_keys=True) != before:
            self._save_manifest(manifest)  # a new stamp only when something changed
        self.reload()
        stats.seconds = time.monotonic() - started
        return stats

    def search(
        self,
        terms: Sequence[str],
        *,
        exclude_path: str | None = None,
        language: str | None = None,
        limit: int = 32,
    ) -> list[Hit]:
        """Chunks matching any of ``terms``, best BM25 score first, of files in ``language``
        (a :func:`~keel.index.walk.snippet_language`) when given; none before the first
        update."""
        searcher = self._searcher
        if searcher is None or self.stamp() != self._loaded:  # `keel index` wrote since
            self.reload()
            searcher = self._searcher
        if searcher is None or not terms:
            return []
        clauses = [
            (tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "terms", term))
            for term in terms
        ]
        if language is not None:  # scored by the terms alone
            clauses = [
                (tantivy.Occur.Must, tantivy.Query.boolean_query(clauses)),
                (
                    tantivy.Occur.Must,
                    tantivy.Query.const_score_query(
                        tantivy.Query.term_query(self._schema, "language", language), 0.0
                    ),
                ),
            ]
        if exclude_path is not None:
            clauses.append(
                (
                    tantivy.Occur.MustNot,
                    tantivy.Query.term_query(self._schema, "path", exclude_path),
                )
            )
        result = searcher.search(tantivy.Query.boolean_query(clauses), limit, count=False)
        hits = []
        for score, address in result.hits:
            doc = searcher.doc(address)
            hits.append(
                Hit(
                    path=doc["path"][0],
                    start_line=int(doc["start_line"][0]),
                    end_line=int(doc["end_line"][0]),
                    body=bytes(doc["body"][0]).decode("utf-8"),
                    score=float(score),
                )
            )
        return hits
