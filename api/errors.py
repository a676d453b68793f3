"""RFC 9457 problem details: every error the API returns is `application/problem+json`
{"type", "title", "status", "detail", "instance"[, "errors"]}.

Mapping: HTTPException -> its status; RequestValidationError -> 422 with the field errors
(a body that is not JSON at all -> 400); core.errors.InvalidInput -> 422; database unreachable
(SQLAlchemy OperationalError / InterfaceError / invalidated connections, psycopg
OperationalError) -> 503 with Retry-After; anything else -> 500 with no internals (the stack
trace goes to the server log only)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InvalidInput

log = logging.getLogger("carcert.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:carcert:problem:"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


class ApiProblem(Exception):
    """Raise from a route to answer with a problem document (type slug, status, detail)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extra = extra or {}


def problem(
    request: Request | None,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ProblemResponse:
    """Build the problem+json response; type is 'about:blank' when no specific slug applies."""
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug if slug else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    if extra:
        body.update(extra)
    return ProblemResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def is_database_unavailable(exc: BaseException) -> bool:
    """True for errors meaning 'the database cannot be reached', not 'the query was wrong'."""
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return False
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        out.append(
            {
                "loc": loc,
                "field": ".".join(loc[1:] if loc[:1] == ["body"] else loc),
                "msg": err.get("msg", ""),
                "type": err.get("type", ""),
            }
        )
    return out


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    methods = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        for route in request.app.router.routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # a route type that cannot answer: ignore it
                continue
            if match == Match.FULL:
                methods.append(method)
                break
    return ", ".join(methods)


BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's HTTPException(400) detail


async def _http_exception(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 400 and detail == BODY_PARSE_ERROR:
        # json.loads failed without a position (e.g. RecursionError on deeply nested arrays)
        return problem(
            request,
            400,
            "The request body could not be parsed as JSON (nested too deeply, or not JSON at all); "
            "send a JobSpec object (see /openapi.json)",
            slug="malformed-body",
            title="Malformed request body",
        )
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return problem(request, exc.status_code, detail, headers=headers or None)


async def _api_problem(request: Request, exc: ApiProblem) -> ProblemResponse:
    return problem(
        request, exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers, extra=exc.extra
    )


async def _validation(request: Request, exc: RequestValidationError) -> ProblemResponse:
    errors = _field_errors(exc)
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(
            request,
            400,
            "The request body is not valid JSON: " + errors[0]["msg"],
            slug="malformed-body",
            title="Malformed request body",
        )
    summary = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors[:5])
    return problem(
        request, 422, summary, slug="validation-error", title="Invalid request", extra={"errors": errors}
    )


async def _invalid_input(request: Request, exc: InvalidInput) -> ProblemResponse:
    return problem(request, 422, str(exc), slug="invalid-input", title="Invalid input")


async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    if is_database_unavailable(exc):
        log.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return problem(
            request,
            503,
            "The database is unavailable; retry later.",
            slug="database-unavailable",
            title="Service Unavailable",
            headers={"Retry-After": "5"},
        )
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(request, 500, "An unexpected error occurred; it has been logged.", slug="internal-error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on `app`."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(InvalidInput, _invalid_input)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        app.add_exception_handler(SQLAlchemyError, _unexpected)
    except ImportError:  # pragma: no cover
        pass
    # Exception / 500 handlers run in ServerErrorMiddleware (outermost): no internals leak.
    app.add_exception_handler(Exception, _unexpected)
