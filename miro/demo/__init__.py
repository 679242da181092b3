"""``miro demo``: a local web page to generate with reward sliders.

A dependency-free app (standard-library ``http.server`` and one HTML page with plain
JavaScript): a prompt, one slider per reward key of the loaded checkpoint for the positive and
the negative branch of multi-reward guidance, an "isolate one reward" preset, and the sampling
controls. The request logic lives in :mod:`miro.demo.handlers` (no sockets, easy to test); the
HTTP server and the command line in :mod:`miro.demo.server`.

    miro demo --model shapes --port 7860      # then open http://127.0.0.1:7860/
"""

from __future__ import annotations

__all__ = ["DemoLimits", "handle_generate", "handle_info", "make_server"]


def __getattr__(name: str):
    if name in ("DemoLimits", "handle_generate", "handle_info"):
        from miro.demo import handlers

        return getattr(handlers, name)
    if name == "make_server":
        from miro.demo.server import make_server

        return make_server
    raise AttributeError(f"module 'miro.demo' has no attribute {name!r}")
