"""One error shape for every 4xx: ``{"detail": "<what is wrong>"}`` (``models.ErrorOut``).

FastAPI answers a failed parameter validation with ``{"detail": [ {loc, msg, ...}, ... ]}``; the
handler here folds that list into one sentence per parameter, e.g.
``limit: Input should be less than or equal to 10000 (got '10001')``, so that clients (and
generated ones) meet a single schema whatever rejected the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_MAX_ECHO = 60  # characters of a rejected value quoted back


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("query", "path", "header") else []
    if not parts:
        parts = [str(p) for p in loc]
    name = parts[0] if parts else "request"
    return name + "".join(f"[{p}]" for p in parts[1:])


def _echo(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > _MAX_ECHO:
        text = text[:_MAX_ECHO] + "…"
    return repr(text) if isinstance(value, str) else text


def validation_detail(errors: Sequence[Any]) -> str:
    """FastAPI's error list as one line: ``name: message (got value); name: message``."""
    out: list[str] = []
    for e in errors:
        line = f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        if e.get("type") != "missing" and "input" in e and e["input"] is not None:
            line += f" (got {_echo(e['input'])})"
        out.append(line)
    return "; ".join(out) or "invalid request"


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        {"detail": validation_detail(exc.errors())},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
