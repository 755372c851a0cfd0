"""HTTP API of a cache_plane cluster member (aiohttp)."""

from .app import create_app

__all__ = ["create_app"]
