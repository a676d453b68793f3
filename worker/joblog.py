"""Records a job's own log lines while a worker runs it (the whole job, or one of its units):
every `carcert.*` log record emitted by the thread that runs it, or naming the job's id from another
thread (the lease heartbeat, a webhook delivery), is kept, prefixed by `prefix` (a unit's variant
name, so the lines of units running side by side stay apart), and appended to job_logs
(store.joblogs) by flush(), at most settings.job_log_max_lines per job (later lines are counted and
summed up in one last line). The `carcert` logger is set to INFO when it would drop INFO records (a
process whose logging is not configured), so those lines also reach the process's own handlers."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from store.db import session_scope
from store.joblogs import append_lines

LOGGER = "carcert"


class JobLogRecorder(logging.Handler):
    def __init__(self, job_id: str, max_lines: int, prefix: str = "") -> None:
        super().__init__(logging.INFO)
        self.job_id, self.max_lines, self.prefix = job_id, max_lines, prefix
        self.thread = threading.get_ident()
        self._pending: list[tuple[datetime, str, str]] = []
        self._lock = threading.Lock()
        self.full = False  # the job's log reached max_lines: later lines are only counted
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the job
            return
        if record.thread != self.thread and self.job_id not in message:
            return
        line = (datetime.fromtimestamp(record.created, UTC), record.levelname, self.prefix + message)
        with self._lock:
            if self.full:
                self.dropped += 1
            else:
                self._pending.append(line)

    def flush(self) -> None:
        """Write the lines gathered since the last flush (a database error is logged elsewhere and
        the lines are kept for the next flush)."""
        with self._lock:
            lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            with session_scope() as s:
                dropped = append_lines(s, self.job_id, lines, self.max_lines)
        except Exception:  # noqa: BLE001
            with self._lock:
                self._pending = lines + self._pending
            return
        if dropped:
            with self._lock:
                self.full, self.dropped = True, self.dropped + dropped

    def __enter__(self) -> JobLogRecorder:
        logger = logging.getLogger(LOGGER)
        if logger.getEffectiveLevel() > logging.INFO:  # the job's INFO lines must reach this handler
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger(LOGGER).removeHandler(self)
        self.flush()
        if self.dropped:
            note = (f"{self.prefix}{self.dropped} more log line(s) not kept "
                    f"(CARCERT_JOB_LOG_MAX_LINES={self.max_lines})")
            try:
                with session_scope() as s:
                    append_lines(s, self.job_id, [(datetime.now(UTC), "WARNING", note)])
            except Exception:  # noqa: BLE001 - the note is best effort, like every log line
                pass
