"""Pure: text from strangers made safe to show on an operator's terminal.

Mail, replies and queue files come from anyone; ``mailq``, ``show`` and
the sendmail command print parts of them, and an escape sequence in there
must not drive the terminal they are printed on.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["printable"]

# Everything a terminal could take as a command, except tab and newline.
_UNSAFE_TEXT: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with control characters escaped: mail and replies come from
    strangers, and an escape sequence must not reach the operator's terminal."""
    return _UNSAFE_TEXT.sub(lambda m: repr(m.group())[1:-1], text)
