"""Text from a device, a bundle or a broker, made safe to print on the operator's terminal.

A device name, a model version, an error message or an MQTT payload is written by someone else:
an ANSI escape sequence in it would reach the terminal and could move the cursor, rewrite
earlier lines (a failed device shown as deployed), set the window title or worse. Every
control character (C0 but newline and tab, DEL, C1) and the bidirectional overrides that
reorder what is shown are replaced by a visible escape such as ``\\x1b``; the rest is untouched.
Pure; no I/O.
"""

from __future__ import annotations

import re

# C0 controls but \t and \n, DEL, C1 controls; the bidi embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, newlines: bool = True) -> str:
    """``str(text)`` with every control character shown as an escape (``\\x1b``, ``\\u202e``).

    With ``newlines`` (the default) newline and tab are kept, for multi-line output; without,
    they are escaped too (for one field on one line).
    """
    pattern = _UNSAFE if newlines else _UNSAFE_LINE
    return pattern.sub(_escape, str(text))
