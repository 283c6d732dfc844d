"""A study's SQLite file: images with their (hidden) truth, readers and tokens, queues, answers.

Every answer is one `BEGIN IMMEDIATE ... COMMIT` transaction that first checks
the answer is for the reader's current item, so a killed server loses nothing
that was acknowledged, and a replayed or out-of-order answer changes nothing.
stdlib sqlite3 (synchronous=FULL: an acknowledged answer survives a power cut too).
"""

from __future__ import annotations

import csv
import hmac
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from busgen_lib.errors import DataError
from busgen_lib.evaluate.turing import EXPORT_COLUMNS
from busgen_lib.reader_study.questions import TURING

DB_NAME = "study.sqlite"
IMAGE_FOLDER = "images"

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
  image_id TEXT PRIMARY KEY, source TEXT NOT NULL CHECK (source IN ('real', 'generated')),
  pathology TEXT NOT NULL, birads TEXT NOT NULL, original TEXT NOT NULL, model_output TEXT NOT NULL);
CREATE TABLE readers (reader TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE);
CREATE TABLE queue (
  reader TEXT NOT NULL REFERENCES readers, position INTEGER NOT NULL, image_id TEXT NOT NULL REFERENCES images,
  shown_at TEXT, PRIMARY KEY (reader, position), UNIQUE (reader, image_id));
CREATE TABLE answers (
  reader TEXT NOT NULL, position INTEGER NOT NULL, image_id TEXT NOT NULL,
  answer TEXT, confidence TEXT, birads TEXT, second_birads TEXT, answered_at TEXT NOT NULL,
  second_answered_at TEXT, PRIMARY KEY (reader, position), UNIQUE (reader, image_id),
  FOREIGN KEY (reader, position) REFERENCES queue (reader, position));
"""


def now() -> str:
    """UTC time as ISO 8601 with milliseconds, the export's timestamp format."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Item:
    """The image a reader answers next: its queue position (0-based) and, for a second answer, the first."""

    position: int
    image_id: str
    total: int
    done: int
    second: bool
    first_birads: str | None
    model_output: str


@dataclass(frozen=True)
class Progress:
    reader: str
    token: str
    done: int
    total: int


class Study:
    """One open study folder. Open one per thread (sqlite3 connections are not shared across threads)."""

    def __init__(self, folder: str | Path, create: bool = False):
        self.folder = Path(folder)
        path = self.folder / DB_NAME
        if not create and not path.is_file():
            raise DataError(f"{self.folder}: not a reader study (no {DB_NAME}); create one with "
                            "`python -m busgen_lib reader-study create`")
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        if create:
            self.db.executescript(SCHEMA)
        self.settings = {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT * FROM settings")}

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ who is asking

    def reader_for(self, token: str) -> str | None:
        """The reader whose private token this is, compared in constant time; None for any other string."""
        found = None
        for row in self.db.execute("SELECT reader, token FROM readers"):
            if hmac.compare_digest(row["token"].encode(), token.encode()):
                found = row["reader"]
        return found

    def is_organiser(self, token: str) -> bool:
        return hmac.compare_digest(self.settings["organiser_token"].encode(), token.encode())

    # ------------------------------------------------------------------ the reader's queue

    @property
    def asks_second(self) -> bool:
        return bool(self.settings.get("model_column"))

    def current(self, reader: str) -> Item | None:
        """The reader's next unanswered item (first answer, or the second after the model's output); None when done."""
        total = self.db.execute("SELECT COUNT(*) FROM queue WHERE reader = ?", (reader,)).fetchone()[0]
        incomplete = "a.position IS NULL" + (" OR a.second_birads IS NULL" if self.asks_second else "")
        row = self.db.execute(
            f"SELECT q.position, q.image_id, a.position AS answered, a.birads, i.model_output FROM queue q "
            f"JOIN images i USING (image_id) LEFT JOIN answers a ON a.reader = q.reader AND a.position = q.position "
            f"WHERE q.reader = ? AND ({incomplete}) ORDER BY q.position LIMIT 1", (reader,)).fetchone()
        if row is None:
            return None
        return Item(position=row["position"], image_id=row["image_id"], total=total, done=row["position"],
                    second=row["answered"] is not None, first_birads=row["birads"], model_output=row["model_output"])

    def in_queue(self, reader: str, image_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM queue WHERE reader = ? AND image_id = ?",
                               (reader, image_id)).fetchone() is not None

    def mark_shown(self, reader: str, position: int) -> None:
        """Record when the reader first saw an item (reading time = answered_at - shown_at)."""
        self.db.execute("UPDATE queue SET shown_at = ? WHERE reader = ? AND position = ? AND shown_at IS NULL",
                        (now(), reader, position))

    def record(self, reader: str, position: int, image_id: str, fields: dict[str, str], second: bool) -> bool:
        """Store one answer in one transaction if it is for the reader's current item; False (nothing stored)
        for a replayed, skipped-ahead or otherwise stale answer."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            item = self.current(reader)
            if item is None or (item.position, item.image_id, item.second) != (position, image_id, second):
                self.db.execute("ROLLBACK")
                return False
            if second:
                self.db.execute("UPDATE answers SET second_birads = ?, second_answered_at = ? "
                                "WHERE reader = ? AND position = ?", (fields["second_birads"], now(), reader, position))
            else:
                self.db.execute("INSERT INTO answers (reader, position, image_id, answer, confidence, birads, "
                                "answered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (reader, position, image_id, fields.get("answer"), fields.get("confidence"),
                                 fields.get("birads"), now()))
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ the organiser's view

    def progress(self) -> list[Progress]:
        """Per reader: answered items (complete, second answer included when asked) out of the queue length."""
        complete = "a.position IS NOT NULL" + (" AND a.second_birads IS NOT NULL" if self.asks_second else "")
        rows = self.db.execute(
            f"SELECT r.reader, r.token, COUNT(q.position) AS total, SUM(CASE WHEN {complete} THEN 1 ELSE 0 END) "
            f"AS done FROM readers r JOIN queue q USING (reader) LEFT JOIN answers a "
            f"ON a.reader = q.reader AND a.position = q.position GROUP BY r.reader ORDER BY r.reader")
        return [Progress(r["reader"], r["token"], r["done"] or 0, r["total"]) for r in rows]

    def export_rows(self) -> list[dict[str, str]]:
        """Every answer given so far with its truth, one row per (reader, image), in EXPORT_COLUMNS order."""
        rows = self.db.execute(
            "SELECT a.reader, a.image_id, a.position, i.source AS truth_source, i.pathology AS truth_pathology, "
            "i.birads AS truth_birads, i.original AS truth_image, a.answer, a.confidence, a.birads, "
            "i.model_output, a.second_birads, q.shown_at, "
            "a.answered_at, a.second_answered_at FROM answers a JOIN images i USING (image_id) "
            "JOIN queue q ON q.reader = a.reader AND q.position = a.position ORDER BY a.reader, a.position")
        return [{c: "" if r[c] is None else str(r[c]) for c in EXPORT_COLUMNS} for r in rows]

    def write_export(self, out) -> None:
        """Write the export CSV (README "Reader studies") to a path or an open text file."""
        if isinstance(out, (str, Path)):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:
                self.write_export(f)
            return
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(self.export_rows())

    @property
    def question(self) -> str:
        return self.settings.get("question", TURING)
