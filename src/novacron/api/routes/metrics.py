"""Prometheus metrics in text format (any token; Prometheus sends it as ``authorization.credentials``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from novacron.api.deps import Viewer
from novacron.api.errors import ERROR_RESPONSES
from novacron.observability.metrics import render

router = APIRouter(tags=["metrics"], responses=ERROR_RESPONSES)


@router.get(
    "/metrics",
    name="metrics.scrape",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def scrape(_: Viewer) -> Response:
    body, content_type = render()
    return Response(body, media_type=content_type)
