"""The OpenAPI document (``/openapi.json``, shown at ``/docs``) as the API really behaves.

FastAPI's generated spec is adjusted in three ways:

* errors: every 422 is documented with ``ErrorOut`` (``{"detail": str}``, what
  ``api.rest.errors`` sends) instead of FastAPI's list-shaped ``HTTPValidationError``;
* auth: a bearer security scheme only when ``NADI_API_KEYS`` is set; each scoped operation
  then carries ``security: [{"apiKey": [<scope>]}]`` (OpenAPI 3.1 role names), 401 and 403
  responses, and a line naming its scope. With auth off nothing security-related is advertised;
* optional parameters are not nullable (a query string has no null);
* ``x-required-scopes`` (set by ``api.auth.scoped``) stays on each operation either way.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.auth import SCOPE_EXTENSION, ApiKeys
from nadi.settings import Settings

SCHEME = "apiKey"
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas: dict[str, Any] = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if "ErrorOut" not in schemas:
        from api.rest.models import ErrorOut

        schemas["ErrorOut"] = ErrorOut.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    auth_on = ApiKeys.of(settings).enabled
    if auth_on:
        spec["components"]["securitySchemes"] = {
            SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key of NADI_API_KEYS: Authorization: Bearer <key>. "
                "Scopes: read, replay, admin (admin includes the others).",
            }
        }
    for item in spec.get("paths", {}).values():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            for param in op.get("parameters", []):
                _not_nullable(param)
            responses: dict[str, Any] = op.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "Invalid parameters", "content": _ERROR}
            scopes = op.get(SCOPE_EXTENSION)
            if not scopes:
                continue
            if auth_on:
                op["security"] = [{SCHEME: list(scopes)}]
                responses["401"] = {"description": "Missing or unknown API key", "content": _ERROR}
                responses["403"] = {
                    "description": f"The API key lacks the {' or '.join(scopes)} scope",
                    "content": _ERROR,
                }
                note = f"Needs an API key with scope `{'`, `'.join(scopes)}` (or `admin`)."
            else:
                note = "Auth is off on this server (NADI_API_KEYS unset)."
            op["description"] = (op.get("description", "") + "\n\n" + note).strip()
    return spec


def _not_nullable(param: dict[str, Any]) -> None:
    """An optional query parameter is absent or a value; it is never JSON null. FastAPI
    writes ``T | None`` as ``anyOf: [T, null]``: keep ``T`` (and the parameter's keywords)."""
    schema = param.get("schema", {})
    variants = schema.get("anyOf")
    if not variants:
        return
    kept = [v for v in variants if v.get("type") != "null"]
    if len(kept) == 1 and len(kept) < len(variants):
        del schema["anyOf"]
        schema.update(kept[0])


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
