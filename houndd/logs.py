"""Log output of `houndd run`: one line per record, as text or JSON, configured by the CLI only.

Log lines carry strings a peer or an API client chose (label values, node names, image
references, error text from registries). Written raw, a newline in such a value starts a line
that looks like a record of its own (a forged `ERROR`), and an ESC sequence rewrites the
operator's terminal. So the formatter escapes every control character of the rendered message,
arguments included, and no call site can forget to: `\\n` becomes the two characters `\\n`.
A traceback keeps its lines, each indented, so none of them can pass for a record either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

LOG_FORMATS = ("text", "json")


def escape(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`, ...)."""
    return _UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a call site's format and arguments disagree
        return f"{record.msg!r} {record.args!r}"


class KeyValueFormatter(logging.Formatter):
    """`ts level logger message`, the key=value context already inside the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {record.levelname:<7} {record.name} {escape(_message(record))}"
        )
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join("\n    " + escape(part) for part in trace.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc with a traceback).

    JSON strings escape control characters by themselves; the message is escaped anyway so
    the `msg` field reads the same as in the text format.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": escape(_message(record)),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every record to stderr, one line each, in `log_format` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # library chatter is not houndd's story
    for noisy in ("aiohttp.access", "zeroconf", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
