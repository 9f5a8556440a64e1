"""The edge of the HTTP API: errors, bodies, names, pages.

What comes from outside is checked once, here: names in URLs against
:mod:`signing.names`; JSON with bounded size and depth
(:mod:`signing.json_limits`) and then against the route's typed schema
(:mod:`server.api.schemas`); bodies against a size limit and a deadline
(``body_timeout``; image uploads against ``upload_idle_timeout`` between
chunks), after which the client gets 408 and the connection is closed. A
client that goes away mid-request costs one log line, not a traceback.
A body that cannot be decoded (a ``Content-Encoding`` its bytes do not
follow, a truncated or corrupt gzip/deflate stream, bad chunked framing met
while the handler reads) answers 400 and closes the connection; decoded
bodies count against the same size limits, so a deflate bomb stops at the
limit (413). Requests aiohttp's own parser refuses before any handler runs
(a malformed request line, header or chunk, a body that arrived whole with
its headers and does not decode) are answered by
:class:`JsonErrorsRequestHandler`, in the same JSON, when the server runs
(:func:`answer_parser_errors_in_json`). A body that the answer left unread
(a request refused before its body was read) closes the connection after the
answer (``Connection: close``); if it does not decode either, that costs one
log line (``server.service``'s filter of aiohttp's log), not a traceback.

Every error is a JSON body ``{"error": {"status": ..., "message": ...}}``
with a 4xx status; only a bug answers 500, and it is logged with its
traceback. Lists are paged: ``?limit=N`` (1 to :data:`MAX_PAGE_LIMIT`,
default :data:`DEFAULT_PAGE_LIMIT`) and ``?cursor=C``, where C is the
``next`` of the previous page (``null`` on the last page).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from aiohttp import web, web_server
from aiohttp.http_exceptions import HttpProcessingError, PayloadEncodingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from sqlmodel import Session

from server.accounts import AccountError
from server.api.context import ENGINE, TIMEOUTS, VEHICLE_THREADS
from server.api.schemas import DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT
from server.fleet import FleetError, RejectionRateLimitedError
from server.image_repository import ImageRepositoryError
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.names import (
    NAME_PATTERN,
    TARGET_PATH_PATTERN,
    InvalidNameError,
    check_name,
    parse_number,
)

log = logging.getLogger("server.api")

#: Largest JSON body of an operator's request.
MAX_JSON_BODY = 1024 * 1024
_MAX_CURSOR = 1024

_Item = TypeVar("_Item")
_Body = TypeVar("_Body", bound=msgspec.Struct)
_T = TypeVar("_T")


class ApiError(UptakeError):
    """A request is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTimeoutError(ApiError):
    """The client did not send its request body in time (408; the connection is closed)."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)


class ClientDisconnectedError(ApiError):
    """The client went away before sending its whole request body (nobody hears the answer)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


class JsonErrorsRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses in our JSON error body.

    It also fails the body of the request being handled when that body turns out not to decode
    only at its end (a truncated gzip or deflate stream): aiohttp queues that error as a
    next, malformed request and leaves the handler waiting for the rest of the body, which
    would end in a 408 at the body deadline instead of a 400 at once.
    """

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        current = self._current_request
        if current is None or current.content.is_eof():
            return
        for message, _ in list(self._messages)[queued:]:
            cause = getattr(message, "exc", None)
            if isinstance(cause, PayloadEncodingError):
                error = RequestPayloadError(cause.message)
                error.__cause__ = cause
                current.content.set_exception(error)
                return

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once data was sent
        if status >= 500 or not message:
            text = "internal error (logged on the server)" if status >= 500 else "bad request"
        else:
            text = f"malformed request: {message}"
        response = error_response(status, text)
        response.force_close()
        return response


def answer_parser_errors_in_json() -> None:
    """Make the servers this process starts use :class:`JsonErrorsRequestHandler`.

    aiohttp builds its connection handler from ``aiohttp.web_server.RequestHandler`` and has
    no public option for another; ``tests/test_boundary_encodings.py`` checks this holds.
    """
    web_server.RequestHandler = JsonErrorsRequestHandler  # type: ignore[attr-defined]


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection at once.

    Otherwise aiohttp would linger, reading the rest of a body that a stalled
    client is not sending.
    """
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # gone meanwhile: closing is all that is left
    request.protocol.force_close()
    return response


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal as a JSON 4xx; a disconnect as one log line; a bug as a logged 500.

    An answer that leaves the body unread says ``Connection: close``: aiohttp reads the rest to
    drop it, and a body that does not decode ends the connection there, which a client must
    not be reusing.
    """
    if any("\x00" in key or "\x00" in value for key, value in request.query.items()):
        # no route takes a NUL, and PostgreSQL cannot store or compare one: refused for all
        response: web.StreamResponse = error_response(400, "query: NUL characters are not allowed")
    else:
        try:
            response = await _answer(request, handler)
        except web.HTTPException as raised:  # a raised answer (a redirect): the same rule
            if not request.content.is_eof():
                raised.force_close()
            raise
    if not request.content.is_eof():
        response.force_close()
    return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyTimeoutError as exc:
        log.info("%s %s from %s: %s", request.method, request.path, request.remote, exc)
        return await _answer_and_close(request, error_response(exc.status, str(exc)))
    except (RequestPayloadError, HttpProcessingError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        reason = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        log.info("%s %s from %s: undecodable body: %s", request.method, request.path,
                 request.remote, reason)  # fmt: skip
        message = f"request body cannot be decoded ({reason.strip() or type(cause).__name__})"
        return await _answer_and_close(request, error_response(400, message))
    except (ClientDisconnectedError, ConnectionError) as exc:
        log.info(
            "%s %s from %s: client went away: %s", request.method, request.path, request.remote, exc
        )
        return error_response(400, "client disconnected")
    except RejectionRateLimitedError as exc:
        response = error_response(exc.status, str(exc))
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response
    except (ApiError, FleetError, AccountError) as exc:
        return error_response(exc.status, str(exc))
    except (ImageRepositoryError, InvalidNameError, UntrustedJsonError) as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(exc.status, exc.reason)
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal error (logged on the server)")


# -- names in URLs --------------------------------------------------------------------


def url_name(request: web.Request, param: str) -> str:
    """A name (VIN, ECU serial, file name) from the URL, checked against the grammar."""
    return check_name(request.match_info[param], f"URL {param}")


def url_vin(request: web.Request) -> str:
    return url_name(request, "vin")


# -- numbers in URLs (ids, cursors) ----------------------------------------------------


#: The largest row id: ids (and metadata versions) are 32-bit columns on PostgreSQL, where a
#: larger number in a query is an error rather than "no such row".
MAX_ROW_ID = 2**31 - 1


def url_number(request: web.Request, param: str, what: str) -> int:
    """The row id ``param`` of the URL path (:func:`signing.names.parse_number`), else 400."""
    number = parse_number(request.match_info[param])
    if number is None or number > MAX_ROW_ID:
        raise ApiError(400, f"URL {param} must be {what} (1 to {MAX_ROW_ID})")
    return number


def query_number(request: web.Request, param: str, what: str) -> int | None:
    """The number in query parameter ``param`` (None when absent), else 400."""
    text = request.query.get(param)
    if text is None:
        return None
    number = parse_number(text)
    if number is None:
        raise ApiError(400, f"query {param} must be {what} (1 to 18 digits)")
    return number


# -- bodies ---------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, refused with 413 past ``limit`` and with 408 past the body deadline."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"{what} larger than {limit} bytes")
    deadline = request.app[TIMEOUTS].whole_body
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            # content.read(n) returns what has arrived so far, not n bytes: read to the end
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"{what} larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BodyTimeoutError(f"{what} not received within {deadline:g} s") from exc
    except ConnectionError as exc:
        raise ClientDisconnectedError(f"{what} cut off after {size} bytes") from exc
    return b"".join(chunks)


async def idle_limited(
    chunks: AsyncIterator[bytes], idle: float, what: str
) -> AsyncIterator[bytes]:
    """``chunks``, refused with 408 when none arrives for ``idle`` seconds."""
    received = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise BodyTimeoutError(f"{what}: nothing received for {idle:g} s") from exc
        except ConnectionError as exc:
            raise ClientDisconnectedError(f"{what} cut off after {received} bytes") from exc
        received += len(chunk)
        yield chunk


async def json_body(request: web.Request, schema: type[_Body], *, optional: bool = False) -> _Body:
    """The request's JSON body as ``schema`` (strict types, unknown keys refused).

    With ``optional``, an empty body is the schema's defaults.
    """
    body = await read_body(request, MAX_JSON_BODY)
    if optional and not body.strip():
        return msgspec.convert({}, schema)
    document = parse_json(body, where="request body", max_bytes=MAX_JSON_BODY)
    if _holds_nul(document):
        raise ApiError(400, "request body: NUL characters (\\u0000) are not allowed in strings")
    try:
        return msgspec.convert(document, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"request body: {_readable(str(exc))}") from exc


def _holds_nul(document: Any) -> bool:
    """Whether any key or string of ``document`` holds a NUL (bounded: parse_json bounds depth
    and size). No field takes one, and PostgreSQL cannot store one."""
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


_GRAMMARS = {
    NAME_PATTERN: "is not a name (1-128 of A-Z a-z 0-9 . _ - : + starting with a letter or digit)",
    TARGET_PATH_PATTERN: "is not a target path (names joined by '/')",
}
_PATTERN_PROBLEM = re.compile(r"Expected `str` matching regex '(?P<regex>.*)' - at `(?P<at>[^`]*)`")


def _readable(problem: str) -> str:
    """msgspec's message, with the names grammar said in words instead of as a regex."""
    found = _PATTERN_PROBLEM.fullmatch(problem)
    if found is None:
        return problem
    regex = found["regex"].encode().decode("unicode_escape")
    words = _GRAMMARS.get(regex)
    return f"`{found['at']}` {words}" if words else problem


def query_params(request: web.Request, schema: type[_Body]) -> _Body:
    """The URL's query as ``schema`` (numbers, booleans and times from their text; unknown
    parameters, repeated ones and values that do not fit answer 400 naming the parameter)."""
    params: dict[str, str] = {}
    for key, value in request.query.items():
        if key in params:
            raise ApiError(400, f"query {key[:100]!r} given more than once")
        params[key] = value
    try:
        return msgspec.convert(params, schema, strict=False)
    except msgspec.ValidationError as exc:
        problem = _readable(str(exc)).replace("`$.", "`")
        problem = problem.replace("Object contains unknown field", "unknown parameter")
        raise ApiError(400, f"query: {problem}") from exc


# -- pages ----------------------------------------------------------------------------


def encode_cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).rstrip(b"=").decode()


def next_cursor(last: Any) -> str | None:
    """The ``next`` of a page whose last item is ``last`` (None: this was the last page)."""
    return None if last is None else encode_cursor(last)


def page_query(request: web.Request) -> tuple[int, Any]:
    """``limit`` and the decoded ``cursor`` (None for the first page) of a paged list."""
    text = request.query.get("limit")
    limit = DEFAULT_PAGE_LIMIT
    if text is not None:
        if not (text.isascii() and text.isdigit() and len(text) <= 6) or not (
            1 <= int(text) <= MAX_PAGE_LIMIT
        ):
            raise ApiError(400, f"query limit must be an integer from 1 to {MAX_PAGE_LIMIT}")
        limit = int(text)
    cursor = request.query.get("cursor")
    if cursor is None:
        return limit, None
    try:
        if len(cursor) > _MAX_CURSOR or not cursor.isascii():
            raise ValueError("too long or not ASCII")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return limit, parse_json(raw, where="query cursor", max_bytes=_MAX_CURSOR, max_depth=4)
    except (ValueError, binascii.Error) as exc:
        raise ApiError(400, "query cursor is not a cursor this server gave out") from exc


def id_cursor(position: Any) -> int | None:
    """A cursor of a list ordered by database id: the last id seen."""
    if position is None:
        return None
    if isinstance(position, int) and not isinstance(position, bool) and 0 <= position <= MAX_ROW_ID:
        return position
    raise ApiError(400, "query cursor is not a cursor of this list")


def key_cursor(position: Any) -> str | None:
    """A cursor of a list ordered by a text key: the last key seen."""
    if position is None or isinstance(position, str):
        return position
    raise ApiError(400, "query cursor is not a cursor of this list")


def page_by_key(
    items: Sequence[tuple[str, _Item]], after: str | None, limit: int
) -> tuple[list[_Item], str | None, bool]:
    """Up to ``limit`` items whose key is above ``after`` (``items`` sorted by key).

    Returns them, the last key returned (``after`` when none), and whether more follow.
    """
    rest = [(key, item) for key, item in items if after is None or key > after]
    page = rest[:limit]
    last = page[-1][0] if page else after
    return [item for _, item in page], last, len(rest) > limit


# -- the database ---------------------------------------------------------------------


async def in_session(request: web.Request, fn: Callable[[Session], Any]) -> Any:
    """Run ``fn`` in a thread with a session committed at the end (never on the event loop)."""
    engine = request.app[ENGINE]

    def run() -> Any:
        with Session(engine) as session:
            result = fn(session)
            session.commit()
            return result

    return await asyncio.to_thread(run)


async def vehicle_work(request: web.Request, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (a vehicle's manifest or identity check) on the vehicle threads.

    A fleet's manifests are short transactions of a few database round trips, and their
    Python is what bounds a server process: many threads only switch among each other at
    every round trip (with twelve, a third of the process's CPU went to the kernel's task
    switching). Everything else handlers hand off (operators' work, the director metadata a
    poll reads when no cache answers) keeps the default threads: a long upload or signing
    never holds up a manifest, and a burst of manifests waiting for a lock never holds up
    the operators. Vehicles' identity checks share these threads with manifests.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # as asyncio.to_thread does
    return await loop.run_in_executor(
        request.app[VEHICLE_THREADS], functools.partial(context.run, fn)
    )
