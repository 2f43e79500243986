"""Optional dependencies: one line naming the extra to install when one is missing.

``pip install keras-vae-attn`` leaves out what only some paths need: ONNX export
(``[export]``: tf2onnx, onnx, onnxruntime) and MNIST through tensorflow-datasets
(``[datasets]``). Those paths run inside :func:`needs_extra`, which turns the
``ModuleNotFoundError`` of any module they import, however deep, into
:class:`MissingExtra`; the command lines print its message and exit 2.
"""

from __future__ import annotations

import contextlib

PACKAGE = "keras-vae-attn"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says what to install.

    ``option`` names the loader argument that avoids the dependency (as DataError's).
    """

    def __init__(self, message, option=None):
        super().__init__(message)
        self.option = option


def install_hint(extra):
    return f"pip install '{PACKAGE}[{extra}]'"


@contextlib.contextmanager
def needs_extra(extra, purpose, option=None):
    """Run the body; a module it cannot import raises MissingExtra naming ``extra``.

    ``purpose`` says what needed it, e.g. "ONNX export".
    """
    try:
        yield
    except ModuleNotFoundError as error:
        raise MissingExtra(
            f"{purpose} needs the Python module {error.name!r}, which is not "
            f"installed: {install_hint(extra)}",
            option,
        ) from None
