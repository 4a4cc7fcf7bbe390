"""Shared leaf helpers: logging, the user-error type, process-group set-up, seeding, git provenance."""

import logging

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s"
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"

logger = logging.getLogger("distillation")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with time, level, logger name, process id and message. Called by entry points only."""
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=level)


class UserError(Exception):
    """A problem with the user's flags, files or models: reported as one line, exit status 1."""
