"""The proxy that ``prune.proxy`` names."""

from __future__ import annotations

from collections.abc import Mapping

from tdc_core.config import PruneConfig
from tdc_core.errors import ConfigError
from tdc_core.method.pruning.proxies.base import Proxy
from tdc_core.method.pruning.proxies.evolutionary import EvolutionaryProxy
from tdc_core.method.pruning.proxies.llm import LLMProxy
from tdc_core.method.pruning.proxies.random_proxy import RandomProxy
from tdc_core.method.pruning.proxies.surrogate import SurrogateProxy

__all__ = [
    "make_proxy",
]


def make_proxy(config: PruneConfig, *, environ: Mapping[str, str] | None = None) -> Proxy:
    """The proxy named by ``prune.proxy``.

    Raises:
        ConfigError: ``proxy=llm`` without ``prune.llm_url``.
    """
    if config.proxy == "surrogate":
        return SurrogateProxy()
    if config.proxy == "evolutionary":
        return EvolutionaryProxy()
    if config.proxy == "random":
        return RandomProxy()
    if config.proxy == "llm":
        if not config.llm_url:
            raise ConfigError("prune.proxy=llm needs prune.llm_url (an OpenAI-compatible endpoint)")
        return LLMProxy(url=config.llm_url, model=config.llm_model, api_key_env=config.llm_api_key_env,
                        timeout_s=config.llm_timeout_s, environ=environ)
    raise ConfigError(f"prune.proxy={config.proxy!r}; allowed: surrogate, evolutionary, random, llm")
