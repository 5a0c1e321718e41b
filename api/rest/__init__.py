"""REST under /v1 (DESIGN.md section 7)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

router = APIRouter()


async def startup(app: FastAPI) -> None:
    """Background work of the REST part (none yet)."""


async def shutdown(app: FastAPI) -> None:
    """Stop what startup started."""
