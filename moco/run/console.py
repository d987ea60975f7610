"""Lines printed while Lightning's progress bar may be open."""

import sys
from typing import TextIO

from tqdm import tqdm


def print_line(text: str, file: TextIO | None = None) -> None:
    """``text`` on a line of its own, above the progress bar. On a terminal tqdm clears the bar,
    prints the line and draws the bar again. In a log file or a pipe the bar's carriage returns
    move nothing, so the line would continue the bar's last update: there it starts after a
    newline instead."""
    stream = file if file is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        text = "\n" + text
    tqdm.write(text, file=stream)
