"""Proxy mode: OpenAI ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and SGLang ``/generate`` on the
router's port. Each request is scheduled with flexlb's strategies, forwarded to the chosen worker (or prefill and
decode pair), streamed back, and its reservation released however it ends."""

from flexlb.proxy.routes import setup_proxy

__all__ = ["setup_proxy"]
