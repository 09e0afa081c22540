"""Log set-up of every flexlb command: a level, and lines as text or as one JSON object each.

Times are ISO 8601 with the local offset (``2025-01-31T14:02:03.123+01:00``), so lines from hosts in different time
zones, or from before and after a DST change, sort and compare. ``--log-format json`` writes one object per line:
``time``, ``level``, ``logger``, ``message``, ``pid``, and ``request_id`` / ``worker`` when the record carries them
(``log.info(..., extra={"request_id": rid})``), plus ``exception`` with the traceback of ``log.exception``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import orjson

LEVELS: Final[tuple[str, ...]] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS: Final[tuple[str, ...]] = ("text", "json")
EXTRA_FIELDS: Final[tuple[str, ...]] = ("request_id", "worker")  # record attributes copied into JSON lines


def parse_level(text: str) -> str:
    """``debug`` or ``DEBUG`` -> ``DEBUG``; anything else raises ValueError naming the levels."""
    level = text.strip().upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {text!r}; expected one of {', '.join(LEVELS)} (any case)")
    return level


def iso_time(created: float) -> str:
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> [<pid>] <message>``, the time with its offset."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, never extra lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger for this process (replacing any handler a previous call installed)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(parse_level(level))


def set_level(level: str) -> str:
    """Change this process's log level at run time (``POST /rtp_llm/update_log_level``); returns the new level."""
    parsed = parse_level(level)
    logging.getLogger().setLevel(parsed)
    return parsed
