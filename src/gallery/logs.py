"""One logging setup for the web app and the worker: a line per request and per job.

Lines are text or, with GALLERY_LOG_FORMAT=json, one JSON object each. Every line passes
through `redact` first, so presigned URLs, request signatures, share link tokens and the
configured secrets never reach the output, even inside an exception's traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gallery.settings import Settings

# Litestar is imported for type checking only, so that the worker's decoding processes,
# which import this module through the `gallery` command, do not load it.
if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

request_logger = logging.getLogger("gallery.requests")
job_logger = logging.getLogger("gallery.jobs")

# A URL whose query carries a SigV4 or SigV2 signature or credential: a presigned URL.
_PRESIGNED_URL = re.compile(
    r"https?://[^\s\"'<>]*[?&](?:X-Amz-[A-Za-z]+|Signature|AWSAccessKeyId)=[^\s\"'<>]*",
    re.IGNORECASE,
)
# A signature or credential outside a URL: an Authorization header or a form field.
_SIGNATURE_FIELD = re.compile(
    r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|Credential|policy)"
    r"[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9+/=_%.-]{16,}",
    re.IGNORECASE,
)
# The token in the path of a shared page, /s/<token>, which opens the page for anyone.
_SHARE_TOKEN = re.compile(r"(/s/)[A-Za-z0-9_-]{16,}")
# The password in a Redis URL, such as redis://:password@host:6379/0.
_URL_PASSWORD = re.compile(r"(rediss?://[^:/@\s]*:)[^@\s]+@")

# Loggers of libraries that log request signatures at DEBUG: kept at INFO or above.
_SIGNING_LOGGERS = ("botocore", "aiobotocore", "aioboto3", "boto3", "urllib3")
ARQ_WORKER_LOGGER = "arq.worker"
GALLERY_HANDLER_NAME = "gallery"
# Every logger whose level or handlers configure_logging sets; "" is the root logger.
CONFIGURED_LOGGERS = ("", ARQ_WORKER_LOGGER, *_SIGNING_LOGGERS)

# The fields a LogRecord has without `extra`; the others go into a JSON line as they are.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Redactor:
    """Replace presigned URLs, signatures and known secret values in a log line."""

    def __init__(self, secret_values: Iterable[str] = ()) -> None:
        # Short values would match ordinary words, so only values of 8 characters or more.
        self.secret_values = sorted({v for v in secret_values if len(v) >= 8}, key=len)[::-1]

    def __call__(self, text: str) -> str:
        text = _PRESIGNED_URL.sub("<presigned URL>", text)
        text = _SIGNATURE_FIELD.sub(r"\1<redacted>", text)
        text = _URL_PASSWORD.sub(r"\1<redacted>@", text)
        text = _SHARE_TOKEN.sub(r"\1<token>", text)
        for value in self.secret_values:
            text = text.replace(value, "<secret>")
        return text


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, and its extras."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and not name.startswith("_"):
                line[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(line, ensure_ascii=False))


def secret_values(settings: Settings) -> list[str]:
    """Return the configured values that no log line may contain."""
    values = [settings.secret_key, settings.aws_secret_access_key]
    password = urlsplit(settings.redis_url).password if settings.redis_url else None
    if password:
        values.append(password)
    return values


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to one handler on the root logger, and return the handler.

    Calling it again replaces the handler it added before.
    """
    redact = Redactor(secret_values(settings))
    formatter = JsonFormatter(redact) if settings.log_format == "json" else TextFormatter(redact)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name(GALLERY_HANDLER_NAME)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == GALLERY_HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    level = logging.getLevelName(settings.log_level.upper())
    root.setLevel(level)
    for name in _SIGNING_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    # arq logs two lines of its own per job; log_job writes the one line the gallery keeps.
    logging.getLogger(ARQ_WORKER_LOGGER).setLevel(max(level, logging.WARNING))
    return handler


def request_log_middleware(
    status_of_error: Callable[[Exception], int],
) -> Callable[[ASGIApp], ASGIApp]:
    """Return a middleware that logs one line per HTTP request with its id, status,
    duration, user and client address.

    The client address is the one the per-address limits count, which the trusted proxies
    middleware has put in the scope before this one runs. The id comes from a valid
    X-Request-ID header or is made here, and the response carries it back. The line has
    the path without its query string. `status_of_error` gives the status of the response
    that Litestar makes, outside this middleware, for an exception raised inside it.
    """
    return functools.partial(_request_log_middleware, status_of_error=status_of_error)


def _request_log_middleware(
    app: ASGIApp, *, status_of_error: Callable[[Exception], int]
) -> ASGIApp:
    async def log_request(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = _request_id(scope)
        status = 500
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        except Exception as error:
            # An exception raised by a middleware, such as a CSRF refusal or Redis out of
            # reach while loading the session, is turned into its response by Litestar
            # outside this one: log the status it will get.
            status = status_of_error(error)
            raise
        finally:
            _log_request(scope, request_id, status, (time.monotonic() - started) * 1000)

    return log_request


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
    return secrets.token_hex(8)


def _log_request(scope: Scope, request_id: str, status: int, duration_ms: float) -> None:
    session = scope.get("session")
    user_id = session.get("user_id", "") if isinstance(session, dict) else ""
    client = scope.get("client")
    address = client[0] if client else "-"
    request_logger.info(
        "request %s %s %s %d in %.1f ms user %s from %s",
        request_id,
        scope["method"],
        scope["path"],
        status,
        duration_ms,
        user_id or "-",
        address,
        extra={
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(duration_ms, 1),
            "user_id": user_id,
            "client": address,
        },
    )


Job = Callable[..., Awaitable[Any]]


def log_job(function: Job) -> Job:
    """Wrap an arq job so that each run logs one line with its id, try and duration."""
    # Imported here because each decoding process of the worker imports this module through
    # the `gallery` command, and arq with redis-py adds about 24 MiB to such a process.
    from arq import Retry

    @functools.wraps(function)
    async def run(ctx: dict[str, Any], *args: Any) -> Any:
        started = time.monotonic()
        job_id, job_try = ctx.get("job_id", "-"), ctx.get("job_try", 1)
        outcome = "failed"
        try:
            result = await function(ctx, *args)
            outcome = str(result)
            return result
        except Retry:
            outcome = "retry"
            raise
        finally:
            duration_ms = (time.monotonic() - started) * 1000
            level = logging.INFO if outcome not in ("failed", "retry") else logging.WARNING
            job_logger.log(
                level,
                "job %s %s(%s) try %d %s in %.0f ms",
                job_id,
                function.__name__,
                ", ".join(str(arg) for arg in args),
                job_try,
                outcome,
                duration_ms,
                extra={
                    "job_id": job_id,
                    "function": function.__name__,
                    "job_try": job_try,
                    "outcome": outcome,
                    "duration_ms": round(duration_ms, 1),
                },
            )

    return run
