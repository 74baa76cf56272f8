"""The REST API (FastAPI): app factory (``novacron.api.app``), routers per resource, auth/RBAC/audit,
and its client (``novacron.api.client``).

Nothing is imported here: the CLI imports the client alone, without FastAPI and every route (about a
second of start-up on this project's hosts).
"""
