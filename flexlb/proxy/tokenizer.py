"""The proxy's tokeniser, from ``tokenizerPath`` and the router's fleet view (``flexlb.tokenize.select``)."""

from __future__ import annotations

from flexlb.proxy.auth import UpstreamAuth
from flexlb.schedule_api import RouterContext
from flexlb.settings import ConfigError, FlexlbConfig
from flexlb.tokenize import PromptTokenizer, TokenizerError
from flexlb.tokenize.select import tokenizer_for


def proxy_tokenizer(config: FlexlbConfig, router: RouterContext, auth: UpstreamAuth) -> PromptTokenizer:
    """The router's tokeniser; a ConfigError naming the setting (a start-up error) when it cannot be loaded."""

    def auth_header(worker_id: str) -> str | None:
        line = auth.header(worker_id, None)  # the engine's own key, if configured: never a client's
        return line.decode("latin-1").partition(": ")[2].strip() or None

    try:
        return tokenizer_for(config.tokenizer_path, lambda: router.scheduler.view.all(), auth_header)
    except TokenizerError as exc:
        raise ConfigError(f"FLEXLB_CONFIG.tokenizerPath: {exc}") from None
