"""Host side of ``wasmvision:platform``: config, logging, time, http and datastore.

Implements the wasmvision-sdk WIT interfaces (see ``wasm/wit/deps/wasmvision-platform``)
with wasmVision's runtime behaviour where it differs from the WIT comments (``time.now``
returns microseconds). The blocking ``http`` functions obey the same network policy as
``vision-host:platform/fetch``.
"""

from __future__ import annotations

import enum
import json
import threading
import time

from .canon import ErrResult, implements
from .fetch import FetchError, FetchErrorResult, frame_jpeg_body


class HttpError(enum.IntEnum):
    """``wasmvision:platform/http.http-error`` case indices."""

    SUCCESS = 0
    DESTINATION_NOT_ALLOWED = 1
    INVALID_URL = 2
    REQUEST_ERROR = 3
    RUNTIME_ERROR = 4
    TOO_MANY_REQUESTS = 5


_FETCH_TO_HTTP = {
    FetchError.DESTINATION_NOT_ALLOWED: HttpError.DESTINATION_NOT_ALLOWED,
    FetchError.INVALID_URL: HttpError.INVALID_URL,
    FetchError.TOO_MANY_REQUESTS: HttpError.TOO_MANY_REQUESTS,
    FetchError.RUNTIME_ERROR: HttpError.RUNTIME_ERROR,
}

NO_SUCH_KEY = 1          # config-error.no-such-key
DS_NO_SUCH_FRAME = 1     # datastore-error.no-such-frame
DS_NO_SUCH_KEY = 2       # datastore-error.no-such-key


class ProcessorStore:
    """The run's ``processor-store``: string values by (processor name, key), thread-safe.

    The ``frame-store`` uses the same class keyed by frame sequence number (see
    :meth:`prune_before`)."""

    def __init__(self):
        self._data: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        #: Counts every change (set, delete): a reader polling once per frame compares it first.
        self.version = 0

    def get(self, processor: str, key: str) -> str | None:
        """The value, or None when absent."""
        with self._lock:
            return self._data.get(processor, {}).get(key)

    def set(self, processor: str, key: str, value: str) -> None:
        """Store ``value`` (overwriting)."""
        with self._lock:
            self._data.setdefault(processor, {})[key] = value
            self.version += 1

    def delete(self, processor: str, key: str) -> None:
        """Remove one key; no error when absent."""
        with self._lock:
            self._data.get(processor, {}).pop(key, None)
            self.version += 1

    def delete_all(self, processor: str) -> None:
        """Remove every key of ``processor``."""
        with self._lock:
            self._data.pop(processor, None)
            self.version += 1

    def exists(self, processor: str) -> bool:
        """Whether ``processor`` has any key."""
        with self._lock:
            return bool(self._data.get(processor))

    def keys(self, processor: str) -> list[str]:
        """The keys of ``processor`` (empty list when none)."""
        with self._lock:
            return list(self._data.get(processor, {}))

    def prune_before(self, oldest: int) -> None:
        """Frame-store use: forget every frame numbered below ``oldest``."""
        if not self._data:             # the usual case, once a frame: nothing stored, no lock
            return
        with self._lock:
            for frame in [f for f in self._data if f < oldest]:
                del self._data[frame]


# -- config ----------------------------------------------------------------------------
_CFG, _LOG, _TIME, _HTTP, _DS = (f"wasmvision:platform/{i}" for i in ("config", "logging", "time", "http", "datastore"))


@implements(_CFG, "get-config")
def _get_config(ctx, key):
    value = ctx.config.get(key)
    if value is None:
        raise ErrResult(NO_SUCH_KEY)
    return value


@implements("vision-host:platform/config-watch", "version")
def _config_version(ctx):
    return ctx.stream.config_version


# -- logging ---------------------------------------------------------------------------
def _logger(level: int):
    def log_message(ctx, message):
        ctx.log.log(level, "%s", message)
    return log_message


for _name, _level in (("log", 30), ("error", 40), ("warn", 30), ("info", 20), ("debug", 10)):
    implements(_LOG, _name)(_logger(_level))


@implements(_LOG, "println")
def _println(ctx, message):
    ctx.println(message)


# -- time ------------------------------------------------------------------------------
@implements(_TIME, "now")
def _now(ctx, tz):
    return time.time_ns() // 1000


# -- http (blocking, for wasmVision processors) -----------------------------------------
def _blocking(ctx, method, url, content_type, body, response_item=None):
    try:
        status, reply = ctx.fetch.blocking(method, url, content_type, body)
    except FetchErrorResult as err:
        ctx.note_fetch_error(url, err.code)
        raise ErrResult(_FETCH_TO_HTTP.get(err.code, HttpError.REQUEST_ERROR)) from None
    if not 200 <= status < 300:
        ctx.log.warning("%s answered HTTP %d", url, status)
        raise ErrResult(HttpError.REQUEST_ERROR)
    if response_item is not None:
        try:
            value = json.loads(reply)[response_item]
            if not isinstance(value, str):
                value = json.dumps(value)
        except (ValueError, KeyError, TypeError):
            ctx.log.warning("%s: reply has no JSON field %r", url, response_item)
            raise ErrResult(HttpError.RUNTIME_ERROR) from None
        return value.strip().replace("\r", "").replace("\n", "")
    return reply


@implements(_HTTP, "get")
def _http_get(ctx, url):
    return _blocking(ctx, "GET", url, "", b"")


@implements(_HTTP, "post")
def _http_post(ctx, url, content_type, body):
    return _blocking(ctx, "POST", url, content_type, body)


@implements(_HTTP, "post-image")
def _http_post_image(ctx, url, content_type, template, response_item, frame):
    body = frame_jpeg_body(ctx.mats.get(frame), 0, 90, template)()
    return _blocking(ctx, "POST", url, "application/json", body, response_item=response_item)


# -- datastore: processor-store and frame-store ---------------------------------------------
# The stores are run-wide singletons: every constructor call returns the same handle and
# drops are no-ops, so a processor that constructs a store per frame and never drops it
# (TinyGo bindings do that) does not fill its handle table.
STORE_HANDLE = 1


@implements(_DS, "[constructor]processor-store")
def _ps_new(ctx, _id):
    return STORE_HANDLE


@implements(_DS, "[resource-drop]processor-store")
def _ps_drop(ctx, _handle):
    return None


@implements(_DS, "[method]processor-store.get")
def _ps_get(ctx, _self, processor, key):
    value = ctx.processor_store.get(processor, key)
    if value is None:
        raise ErrResult(DS_NO_SUCH_KEY)
    return value


@implements(_DS, "[method]processor-store.set")
def _ps_set(ctx, _self, processor, key, value):
    ctx.processor_store.set(processor, key, value)


@implements(_DS, "[method]processor-store.delete")
def _ps_delete(ctx, _self, processor, key):
    ctx.processor_store.delete(processor, key)


@implements(_DS, "[method]processor-store.delete-all")
def _ps_delete_all(ctx, _self, processor):
    ctx.processor_store.delete_all(processor)


@implements(_DS, "[method]processor-store.exists")
def _ps_exists(ctx, _self, processor):
    return ctx.processor_store.exists(processor)


@implements(_DS, "[method]processor-store.get-keys")
def _ps_get_keys(ctx, _self, processor):
    return ctx.processor_store.keys(processor)


@implements(_DS, "[constructor]frame-store")
def _fs_new(ctx, _id):
    return STORE_HANDLE


@implements(_DS, "[resource-drop]frame-store")
def _fs_drop(ctx, _handle):
    return None


def _frame(ctx, handle: int) -> int:
    """The run-wide sequence number of the frame the caller knows as mat ``handle``."""
    seq = ctx.frame_seq(handle)
    if seq is None:
        raise ErrResult(DS_NO_SUCH_FRAME)
    return seq


@implements(_DS, "[method]frame-store.get")
def _fs_get(ctx, _self, frame, key):
    value = ctx.frame_store.get(_frame(ctx, frame), key)
    if value is None:
        raise ErrResult(DS_NO_SUCH_KEY)
    return value


@implements(_DS, "[method]frame-store.set")
def _fs_set(ctx, _self, frame, key, value):
    ctx.frame_store.set(_frame(ctx, frame), key, value)


@implements(_DS, "[method]frame-store.delete")
def _fs_delete(ctx, _self, frame, key):
    ctx.frame_store.delete(_frame(ctx, frame), key)


@implements(_DS, "[method]frame-store.delete-all")
def _fs_delete_all(ctx, _self, frame):
    ctx.frame_store.delete_all(_frame(ctx, frame))


@implements(_DS, "[method]frame-store.exists")
def _fs_exists(ctx, _self, frame):
    return ctx.frame_store.exists(_frame(ctx, frame))


@implements(_DS, "[method]frame-store.get-keys")
def _fs_get_keys(ctx, _self, frame):
    seq = ctx.frame_seq(frame)
    return [] if seq is None else ctx.frame_store.keys(seq)
