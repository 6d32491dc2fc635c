"""Hub failures as one sentence: ``HubError`` and the helpers that turn huggingface_hub's exceptions into it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from huggingface_hub.errors import HfHubHTTPError

LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


class HubError(ValueError):
    """A push or download that cannot go on, explained in one sentence (``sslhub`` CLI: printed, exit status 2)."""


def http_error(err: BaseException) -> HfHubHTTPError | None:
    """The ``HfHubHTTPError`` behind ``err``: failed LFS uploads arrive wrapped in a ``RuntimeError``, failed forced
    downloads in a ``ValueError``."""
    while err is not None and not isinstance(err, HfHubHTTPError):
        err = err.__cause__
    return err


def status_text(err: HfHubHTTPError) -> str:
    message = " ".join((err.server_message or "").split())
    return f"HTTP {err.response.status_code}" + (f": {message}" if message else "")


@contextlib.contextmanager
def explained(explain, *args) -> Iterator[None]:
    """Re-raise what ``explain(err, *args)`` can put in one sentence as ``HubError`` (without the traceback chain)."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        message = explain(err, *args)
        if message is None:
            raise
        raise HubError(message) from None
