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

from .abi import host_function
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
DS_NO_SUCH_KEY = 2       # datastore-error.no-such-key


class ProcessorStore:
    """The run's ``processor-store``: string values by (processor name, key), thread-safe."""

    def __init__(self):
        self._data: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def get(self, processor: str, key: str) -> str | None:
        """The value, or None when absent."""
        with self._lock:
            return self._data.get(processor, {}).get(key)

    def set(self, processor: str, key: str, value: str) -> None:
        """Store ``value`` (overwriting)."""
        with self._lock:
            self._data.setdefault(processor, {})[key] = value

    def delete(self, processor: str, key: str) -> None:
        """Remove one key; no error when absent."""
        with self._lock:
            self._data.get(processor, {}).pop(key, None)

    def delete_all(self, processor: str) -> None:
        """Remove every key of ``processor``."""
        with self._lock:
            self._data.pop(processor, None)

    def exists(self, processor: str) -> bool:
        """Whether ``processor`` has any key."""
        with self._lock:
            return bool(self._data.get(processor))

    def keys(self, processor: str) -> list[str]:
        """The keys of ``processor`` (empty list when none)."""
        with self._lock:
            return list(self._data.get(processor, {}))


# -- config ----------------------------------------------------------------------------
@host_function("wasmvision:platform/config", "get-config", "iii")
def _get_config(ctx, key_p, key_n, retptr):
    mem = ctx.memory
    value = ctx.config.get(mem.read_str(key_p, key_n))
    if value is None:
        mem.ret_err_enum(retptr, NO_SUCH_KEY)
    else:
        mem.ret_ok_bytes(retptr, value.encode("utf-8"))


# -- logging ---------------------------------------------------------------------------
def _logger(level: int):
    def log_message(ctx, ptr, length):
        ctx.log.log(level, "%s", ctx.memory.read_str(ptr, length))
    return log_message


for _name, _level in (("log", 30), ("error", 40), ("warn", 30), ("info", 20), ("debug", 10)):
    host_function("wasmvision:platform/logging", _name, "ii")(_logger(_level))


@host_function("wasmvision:platform/logging", "println", "ii")
def _println(ctx, ptr, length):
    ctx.println(ctx.memory.read_str(ptr, length))


# -- time ------------------------------------------------------------------------------
@host_function("wasmvision:platform/time", "now", "i", "I")
def _now(ctx, tz):
    return time.time_ns() // 1000


# -- http (blocking, for wasmVision processors) -----------------------------------------
def _blocking(ctx, retptr, method, url, content_type, body, response_item=None):
    mem = ctx.memory
    try:
        status, reply = ctx.fetch.blocking(method, url, content_type, body)
    except FetchErrorResult as err:
        ctx.note_fetch_error(url, err.code)
        mem.ret_err_enum(retptr, _FETCH_TO_HTTP.get(err.code, HttpError.REQUEST_ERROR))
        return
    if not 200 <= status < 300:
        ctx.log.warning("%s answered HTTP %d", url, status)
        mem.ret_err_enum(retptr, HttpError.REQUEST_ERROR)
        return
    if response_item is not None:
        try:
            value = json.loads(reply)[response_item]
            if not isinstance(value, str):
                value = json.dumps(value)
        except (ValueError, KeyError, TypeError):
            ctx.log.warning("%s: reply has no JSON field %r", url, response_item)
            mem.ret_err_enum(retptr, HttpError.RUNTIME_ERROR)
            return
        reply = value.strip().replace("\r", "").replace("\n", "").encode("utf-8")
    mem.ret_ok_bytes(retptr, reply)


@host_function("wasmvision:platform/http", "get", "iii")
def _http_get(ctx, url_p, url_n, retptr):
    _blocking(ctx, retptr, "GET", ctx.memory.read_str(url_p, url_n), "", b"")


@host_function("wasmvision:platform/http", "post", "iiiiiii")
def _http_post(ctx, url_p, url_n, ct_p, ct_n, body_p, body_n, retptr):
    mem = ctx.memory
    _blocking(ctx, retptr, "POST", mem.read_str(url_p, url_n), mem.read_str(ct_p, ct_n), mem.read(body_p, body_n))


@host_function("wasmvision:platform/http", "post-image", "iiiiiiiiii")
def _http_post_image(ctx, url_p, url_n, ct_p, ct_n, tpl_p, tpl_n, item_p, item_n, frame, retptr):
    mem = ctx.memory
    url = mem.read_str(url_p, url_n)
    template = mem.read(tpl_p, tpl_n)
    item = mem.read_str(item_p, item_n)
    body = frame_jpeg_body(ctx.mats.get(frame), 0, 90, template)()
    _blocking(ctx, retptr, "POST", url, "application/json", body, response_item=item)


# -- datastore: processor-store ---------------------------------------------------------
_DS = "wasmvision:platform/datastore"


@host_function(_DS, "[constructor]processor-store", "i", "i")
def _ps_new(ctx, _id):
    return 1


@host_function(_DS, "[resource-drop]processor-store", "i")
def _ps_drop(ctx, _handle):
    return None


@host_function(_DS, "[method]processor-store.get", "iiiiii")
def _ps_get(ctx, _self, p_p, p_n, k_p, k_n, retptr):
    mem = ctx.memory
    value = ctx.processor_store.get(mem.read_str(p_p, p_n), mem.read_str(k_p, k_n))
    if value is None:
        mem.ret_err_enum(retptr, DS_NO_SUCH_KEY)
    else:
        mem.ret_ok_bytes(retptr, value.encode("utf-8"))


@host_function(_DS, "[method]processor-store.set", "iiiiiiii")
def _ps_set(ctx, _self, p_p, p_n, k_p, k_n, v_p, v_n, retptr):
    mem = ctx.memory
    ctx.processor_store.set(mem.read_str(p_p, p_n), mem.read_str(k_p, k_n), mem.read_str(v_p, v_n))
    mem.ret_ok_unit(retptr)


@host_function(_DS, "[method]processor-store.delete", "iiiiii")
def _ps_delete(ctx, _self, p_p, p_n, k_p, k_n, retptr):
    mem = ctx.memory
    ctx.processor_store.delete(mem.read_str(p_p, p_n), mem.read_str(k_p, k_n))
    mem.ret_ok_unit(retptr)


@host_function(_DS, "[method]processor-store.delete-all", "iiii")
def _ps_delete_all(ctx, _self, p_p, p_n, retptr):
    mem = ctx.memory
    ctx.processor_store.delete_all(mem.read_str(p_p, p_n))
    mem.ret_ok_unit(retptr)


@host_function(_DS, "[method]processor-store.exists", "iiii")
def _ps_exists(ctx, _self, p_p, p_n, retptr):
    mem = ctx.memory
    mem.ret_ok_bool(retptr, ctx.processor_store.exists(mem.read_str(p_p, p_n)))


@host_function(_DS, "[method]processor-store.get-keys", "iiii")
def _ps_get_keys(ctx, _self, p_p, p_n, retptr):
    mem = ctx.memory
    mem.ret_str_list(retptr, ctx.processor_store.keys(mem.read_str(p_p, p_n)))
