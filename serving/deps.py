"""FastAPI dependencies of the route modules: the server's state and, once loaded, its engine.

The state is built by the app's lifespan (``serving/app.py``) and kept on
``app.state.server``; tests swap either through ``app.dependency_overrides``.
"""
from __future__ import annotations

from fastapi import Depends, Request


def get_state(request: Request):
    """The running server's ``ServerState``."""
    return request.app.state.server


def get_engine(state=Depends(get_state)):
    """The loaded engine; raises NotReady (503) while it loads, after it failed to load, or while shutting down."""
    return state.require_engine()
