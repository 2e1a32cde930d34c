"""Logging setup from ``[log.file]`` and ``[log.stderr]`` (contract §2, design §6).

Handlers go on the ``metanode`` logger, the parent of ``metanode.raft``,
``metanode.transport``, ``metanode.node``, ``metanode.api`` and ``metanode.storage``;
the root logger is left alone. ``log_level`` is the level of an output whose own
``level`` is unset. The file is ``metanode.log`` (``metanode-<id>.log`` when the node
id is known) in ``log.file.dir`` (else ``log_dir``), created if needed, rotated at
``ROTATE_BYTES`` keeping ``ROTATE_BACKUPS`` old files. ``json`` writes one object per
line: ``{"timestamp", "level", "logger", "message"}`` plus ``"exception"`` when there
is a traceback.

:func:`configure_logging` may be called again (it replaces what it installed before);
:func:`shutdown_logging` flushes and closes the handlers it installed.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
from typing import Final

from metanode.config import Config
from metanode.errors import ConfigError

__all__ = ["LOGGER_NAMES", "configure_logging", "level_number", "shutdown_logging"]

LOGGER_NAMES: Final = (
    "metanode.raft",
    "metanode.transport",
    "metanode.node",
    "metanode.api",
    "metanode.storage",
)
ROTATE_BYTES: Final = 64 * 1024 * 1024
ROTATE_BACKUPS: Final = 10
TEXT_FORMAT: Final = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
_MARK: Final = "_metanode_installed"

_LEVELS: Final = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


def level_number(name: str) -> int:
    """The logging level of a config level name (TRACE is DEBUG)."""
    return _LEVELS[name.upper()]


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def log_file_path(config: Config) -> str:
    """Where the log file of ``config`` goes."""
    node_id = config.raft_config.id
    name = "metanode.log" if node_id is None else f"metanode-{node_id}.log"
    return os.path.join(config.log_file_dir, name)


def configure_logging(config: Config) -> None:
    """Install the outputs of ``config`` on the ``metanode`` logger.

    Raises ConfigError (naming ``log.file.dir``) when the log directory cannot be
    created or the file cannot be opened.
    """
    shutdown_logging()
    logger = logging.getLogger("metanode")
    handlers: list[logging.Handler] = []
    if config.log.file.on:
        directory = config.log_file_dir
        try:
            os.makedirs(directory, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                log_file_path(config),
                maxBytes=ROTATE_BYTES,
                backupCount=ROTATE_BACKUPS,
                encoding="utf-8",
            )
        except OSError as exc:
            raise ConfigError(
                f"log.file.dir: cannot write logs in {directory!r}: {exc.strerror or exc}"
            ) from None
        file_handler.setLevel(level_number(config.log_file_level))
        file_handler.setFormatter(_formatter(config.log.file.format))
        handlers.append(file_handler)
    if config.log.stderr.on:
        stderr_handler = logging.StreamHandler(sys.stderr)
        stderr_handler.setLevel(level_number(config.log_stderr_level))
        stderr_handler.setFormatter(_formatter(config.log.stderr.format))
        handlers.append(stderr_handler)
    if not handlers:
        # Both outputs off: keep logging's last-resort handler from printing warnings.
        handlers.append(logging.NullHandler())
    levels = [h.level for h in handlers if not isinstance(h, logging.NullHandler)]
    logger.setLevel(min(levels) if levels else level_number(config.log_level))
    for handler in handlers:
        setattr(handler, _MARK, True)
        logger.addHandler(handler)


def shutdown_logging() -> None:
    """Flush, close and remove the handlers :func:`configure_logging` installed.

    The ``metanode`` logger's level goes back to NOTSET (inherit from the root).
    """
    logger = logging.getLogger("metanode")
    installed = [h for h in logger.handlers if getattr(h, _MARK, False)]
    for handler in installed:
        logger.removeHandler(handler)
        handler.close()
    if installed:
        logger.setLevel(logging.NOTSET)
