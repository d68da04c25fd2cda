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
        return f"{self.source}: {self.field}: {self.message}"
