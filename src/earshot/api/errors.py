"""The OpenAI error envelope, and the mapping of every failure to it with a fitting status.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`. Client mistakes are 4xx,
never 500; a 500 is a bug and is logged with its traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from earshot.audio.errors import AudioDecodeError, AudioTooLong
from earshot.audio.pool import DecodeBusy
from earshot.inference.errors import (
    CacheBusy,
    CacheClosed,
    CacheError,
    CacheFull,
    ModelLoadError,
    ModelLoadTimeout,
    RequestError,
    UnknownModel,
)
from earshot.models.errors import (
    CatalogFull,
    HubModelNotFound,
    HubModelsDisabled,
    HubUnreachable,
    ModelResolutionError,
    NotServable,
)

log = logging.getLogger("earshot.api")

RETRY_AFTER_SECONDS = 5
# Client input quoted in a message is shown up to this many characters (a 100 KB voice name is not
# echoed back whole); a message is at most MAX_MESSAGE characters.
MAX_ECHO = 80
MAX_MESSAGE = 1024
_QUOTED = re.compile(f"'[^']{{{MAX_ECHO + 1},}}'|\"[^\"]{{{MAX_ECHO + 1},}}\"")
# Litestar's words when the multipart parser hits one of its limits (a part's headers over 4 KB,
# such as a long file name, or too many parts); it answers 400 with them.
_MULTIPART_LIMIT = "Request Entity Too Large"


def shorten(message: str) -> str:
    """`message` with long quoted runs (client input) cut to MAX_ECHO characters, and capped."""

    def cut(match: re.Match[str]) -> str:
        text = match.group(0)
        return text[: MAX_ECHO - 2] + "..." + text[-1]

    message = _QUOTED.sub(cut, message)
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


@dataclass
class ErrorDetail:
    message: str
    type: str
    param: str | None
    code: str | None


@dataclass
class ErrorEnvelope:
    """OpenAI's error body, for the OpenAPI schema (the handlers build it in `APIError`)."""

    error: ErrorDetail


def _spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorEnvelope, description=description, generate_examples=False)


# Documented on every API route in place of Litestar's own validation-error body.
ERROR_RESPONSES: dict[int, ResponseSpec] = {
    400: _spec("Invalid request: bad field, unreadable audio, wrong model for the task"),
    401: _spec("Missing or wrong API key (when api_key is set)"),
    403: _spec("A hub id the catalog does not list: max_catalog_models reached, or allow_hub_models off"),
    404: _spec("Unknown model"),
    413: _spec("Request body over max_upload_bytes"),
    503: _spec("Cache full, too many waiting requests, or the model failed/timed out loading (Retry-After)"),
}


class APIError(Exception):
    """An error to send as the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message = shorten(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_response(self) -> Response[dict[str, Any]]:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return Response(body, status_code=self.status, headers=self.headers, media_type=MediaType.JSON)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(HTTP_400_BAD_REQUEST, message, param=param, code=code)


def model_not_found(name: str, suggestions: list[str]) -> APIError:
    shown = name if len(name) <= 80 else name[:77] + "..."
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return APIError(
        HTTP_404_NOT_FOUND,
        f"The model {shown!r} does not exist.{hint} GET /v1/models lists the models.",
        param="model",
        code="model_not_found",
    )


def _unavailable(message: str, code: str) -> APIError:
    return APIError(
        HTTP_503_SERVICE_UNAVAILABLE,
        message,
        type="server_error",
        code=code,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _resolution(exc: ModelResolutionError) -> APIError:
    """A hub id that could not join the catalog: 404 no such repo, 400 not a model earshot serves,
    403 refused (cap, switch), 503 the Hub unreachable and the model not cached."""
    if isinstance(exc, HubUnreachable):
        return _unavailable(exc.message, exc.code)
    status = {
        HubModelNotFound: HTTP_404_NOT_FOUND,
        NotServable: HTTP_400_BAD_REQUEST,
        CatalogFull: HTTP_403_FORBIDDEN,
        HubModelsDisabled: HTTP_403_FORBIDDEN,
    }.get(type(exc), HTTP_404_NOT_FOUND)
    return APIError(status, exc.message, param="model", code=exc.code)


def from_exception(exc: Exception) -> APIError:
    """The envelope for any exception raised while handling a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelResolutionError):
        return _resolution(exc)
    if isinstance(exc, UnknownModel):
        return model_not_found(exc.model or "", [])
    if isinstance(exc, ModelLoadTimeout):
        return _unavailable(exc.message, "model_load_timeout")
    if isinstance(exc, ModelLoadError):
        return _unavailable(exc.message, "model_load_failed")
    if isinstance(exc, CacheFull):
        return _unavailable(exc.message, "cache_full")
    if isinstance(exc, CacheBusy):
        return _unavailable(exc.message, "busy")
    if isinstance(exc, CacheClosed):
        return _unavailable(exc.message, "shutting_down")
    if isinstance(exc, CacheError):
        return _unavailable(exc.message, "cache_error")
    if isinstance(exc, DecodeBusy):
        return _unavailable(exc.message, "busy")
    if isinstance(exc, AudioTooLong):
        return APIError(HTTP_400_BAD_REQUEST, str(exc), param="file", code="audio_too_long")
    if isinstance(exc, AudioDecodeError):
        return APIError(HTTP_400_BAD_REQUEST, str(exc), param="file", code="invalid_audio")
    if isinstance(exc, RequestError):
        codes = {"model": "unsupported_task", "voice": "invalid_voice", "language": "unsupported_language"}
        code = exc.code or codes.get(exc.param or "")
        return APIError(HTTP_400_BAD_REQUEST, exc.message, param=exc.param, code=code)
    if isinstance(exc, ValidationException):
        return _validation(exc)
    if _unparsable(exc) and _raised_while_parsing(exc):
        return bad_request(_unparsable_message(exc))
    if isinstance(exc, HTTPException):
        status = exc.status_code
        message = exc.detail or "error"
        if status == HTTP_400_BAD_REQUEST and message == _MULTIPART_LIMIT:
            return bad_request(
                "The multipart form is over a parser limit: a part's headers (its file name or field "
                "name) over 4 KB, or too many parts.",
                code="invalid_multipart",
            )
        if status == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
            message = "Request body too large; see max_upload_bytes (audio) and max_input_chars (speech)."
            return APIError(status, message, code="request_too_large")
        if status == HTTP_401_UNAUTHORIZED:
            return APIError(
                status,
                message,
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        kind = "invalid_request_error" if status < HTTP_500_INTERNAL_SERVER_ERROR else "server_error"
        return APIError(status, message, type=kind, headers=exc.headers or None)
    log.exception("unhandled error", exc_info=exc)
    return APIError(HTTP_500_INTERNAL_SERVER_ERROR, "Internal server error.", type="server_error")


# What Litestar's request parsing lets through when the body is not what it claims to be: bytes that
# are not UTF-8 (JSON, multipart text fields), an unknown `charset=` (LookupError), JSON nested
# deeper than the decoder's recursion limit (RecursionError).
def _unparsable(exc: BaseException) -> bool:
    # A codec lookup raises LookupError itself; its subclasses (KeyError, IndexError) are bugs.
    return isinstance(exc, UnicodeError | RecursionError) or type(exc) is LookupError


def _raised_while_parsing(exc: BaseException) -> bool:
    """True when `exc` comes from Litestar turning the request into handler arguments (client input),
    not from a handler or the app (those stay 500s: they are bugs)."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "to_kwargs" and "litestar" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _unparsable_message(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "The request body is nested too deeply to parse."
    if type(exc) is LookupError:
        return "The request names a charset that is not supported; send UTF-8."
    return "The request body could not be decoded as text; send UTF-8."


def _validation(exc: ValidationException) -> APIError:
    extra = exc.extra if isinstance(exc.extra, list) else []
    details = [e for e in extra if isinstance(e, dict)]
    if details:
        first = details[0]
        key = first.get("key")
        param = str(key) if key is not None else None
        parts = [_detail(d) for d in details]
        message = "Invalid request: " + "; ".join(dict.fromkeys(parts))
    else:
        param = None
        message = exc.detail or "Invalid request."
    return APIError(HTTP_400_BAD_REQUEST, message, param=param)


def _detail(detail: dict[str, Any]) -> str:
    key, message = detail.get("key"), str(detail.get("message"))
    if key == "data" and message == "'data'":  # Litestar's words for "no body at all"
        return "the request body is missing; send a JSON object"
    if key == "data":
        return f"the request body: {message}"
    return f"{key}: {message}" if key else message


def exception_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    return from_exception(exc).to_response()


EXCEPTION_HANDLERS: dict[type[Exception] | int, Callable[..., Response[Any]]] = {Exception: exception_handler}
