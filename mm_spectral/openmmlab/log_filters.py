"""Logging filters that turn per-parameter floods into one line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from mmengine.logging import MMLogger

from ..state import is_adapter_key


@contextlib.contextmanager
def filtered_log(log_filter: logging.Filter) -> Iterator[logging.Filter]:
    """While active, ``log_filter`` sees (and may rewrite or drop) MMEngine's log records."""
    logger = MMLogger.get_current_instance()
    logger.addFilter(log_filter)
    try:
        yield log_filter
    finally:
        logger.removeFilter(log_filter)


class AdapterKeySummary(logging.Filter):
    """Rewrites mmengine's 'missing keys in source state_dict: …' warning so that adapter
    keys (new, hence never in a pretrained checkpoint) become one count."""

    PREFIX = "missing keys in source state_dict: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.PREFIX not in message:
            return True
        lines, n_adapter = [], 0
        for line in message.splitlines():
            if not line.startswith(self.PREFIX):
                lines.append(line)
                continue
            keys = [k.strip() for k in line[len(self.PREFIX) :].split(",") if k.strip()]
            rest = [k for k in keys if not is_adapter_key(k)]
            n_adapter += len(keys) - len(rest)
            if rest:
                lines.append(self.PREFIX + ", ".join(rest))
        if n_adapter == 0:
            return True
        note = f"{n_adapter} adapter tensors are not in the checkpoint (expected: they are new)"
        if not any(line.startswith(("missing keys", "unexpected key")) for line in lines):
            record.msg, record.args = f"pretrained weights loaded; {note}", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            record.msg, record.args = "\n".join([*lines, note]), ()
        return True


def summarised_adapter_keys() -> contextlib.AbstractContextManager[logging.Filter]:
    """While active, missing-key warnings count adapter keys instead of listing them."""
    return filtered_log(AdapterKeySummary())
