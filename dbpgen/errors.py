"""Errors that are the user's fault: reported as one line, never as a traceback."""
from __future__ import annotations


class ModelError(Exception):
    """A bad model file: `str(e)` is "<source>: <field>: <message>".

    `field` is a path of YAML keys and list indices, e.g. `layers[2].act`.
    """

    def __init__(self, source: str, field: str, message: str) -> None:
        # All three in args so that the error survives pickling (multiprocessing).
        super().__init__(source, field, message)
        self.source = source
        self.field = field
        self.message = message

    def __str__(self) -> str:
        # one short line whatever the input: a key or file name may be megabytes long
        return f"{_short(self.source, 200)}: {_short(self.field, 120)}: {_short(self.message, 400)}"


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
