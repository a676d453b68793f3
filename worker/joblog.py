"""Records a job's own log lines while a worker runs it: every `carcert.*` log record emitted by
the thread that runs the job, or naming the job's id from another thread (the lease heartbeat, a
webhook delivery), is kept and written to job_logs (store.joblogs) by flush(), at most
settings.job_log_max_lines per job (later lines are counted and summed up in one last line).
The `carcert` logger is set to INFO when it would drop INFO records (a process whose logging is not
configured), so those lines also reach the process's own handlers."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from store.db import session_scope
from store.joblogs import append_lines, next_seq

LOGGER = "carcert"


class JobLogRecorder(logging.Handler):
    def __init__(self, job_id: str, max_lines: int) -> None:
        super().__init__(logging.INFO)
        self.job_id, self.max_lines = job_id, max_lines
        self.thread = threading.get_ident()
        self._pending: list[tuple[datetime, str, str]] = []
        self._lock = threading.Lock()
        self._seq = 1
        self._kept = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the job
            return
        if record.thread != self.thread and self.job_id not in message:
            return
        line = (datetime.fromtimestamp(record.created, UTC), record.levelname, message)
        with self._lock:
            if self._kept >= self.max_lines:
                self.dropped += 1
                return
            self._kept += 1
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
                append_lines(s, self.job_id, self._seq, lines)
            self._seq += len(lines)
        except Exception:  # noqa: BLE001
            with self._lock:
                self._pending = lines + self._pending

    def __enter__(self) -> JobLogRecorder:
        with session_scope() as s:
            self._seq = next_seq(s, self.job_id)
        self._kept = self._seq - 1  # earlier attempts' lines count against the bound
        logger = logging.getLogger(LOGGER)
        if logger.getEffectiveLevel() > logging.INFO:  # the job's INFO lines must reach this handler
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger(LOGGER).removeHandler(self)
        if self.dropped:
            with self._lock:
                note = (
                    f"{self.dropped} more log line(s) not kept (CARCERT_JOB_LOG_MAX_LINES={self.max_lines})"
                )
                self._pending.append((datetime.now(UTC), "WARNING", note))
        self.flush()
