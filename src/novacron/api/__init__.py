"""The REST API (FastAPI): app factory, routers per resource, auth/RBAC/audit, and its client."""

from novacron.api.app import ApiServices, create_app
from novacron.api.config import ApiConfig, ApiLimits

__all__ = ["ApiConfig", "ApiLimits", "ApiServices", "create_app"]
