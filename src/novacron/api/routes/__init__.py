"""One router per resource. ``ROUTERS`` is what :func:`novacron.api.app.create_app` mounts.

Routers still to come slot in the same way (a module here and a line below, or ``extra_routers`` of
``create_app`` for a router owned by another package): nodes (``/v1/nodes``: registry, labels,
maintenance, drain), migrations (``/v1/migrations``: start, progress as server-sent events, cancel)
and cluster join (``/v1/cluster/join``, public route authenticated by a bootstrap token).
"""

from fastapi import APIRouter

from novacron.api.routes import audit, cluster, health, images, metrics, nodes, tokens, vms

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    metrics.router,
    vms.router,
    images.router,
    tokens.router,
    audit.router,
    cluster.router,
    nodes.router,
)
