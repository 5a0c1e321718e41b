"""The WebSocket hub at /ws and the live page (DESIGN.md sections 6 and 7)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

router = APIRouter()


async def startup(app: FastAPI) -> None:
    """Start the live fan-out reader for this API process."""


async def shutdown(app: FastAPI) -> None:
    """Stop the reader and close every connection."""
