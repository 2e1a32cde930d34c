"""HTTP-facing APIs of a node: the admin API (contract §4)."""

from metanode.api.admin import AdminNode, create_app, serve_admin

__all__ = ["AdminNode", "create_app", "serve_admin"]
