"""Pruning proxies (docs/METHOD.md step 5).

In every round of the progressive search (:mod:`tdc_core.method.pruning.search`) a *proxy* proposes
candidate keep ratios, one per unit (see :mod:`tdc_core.method.pruning.space`), for the round's
FLOPs target; the search scores them and keeps the best. The memory bank
(:mod:`tdc_core.method.pruning.proxies.records`) holds every proposal of every round with its
FLOPs, score and whether it was accepted; it is each proxy's input in the next round.

Proxies share one interface, :class:`tdc_core.method.pruning.proxies.base.Proxy`
(``propose(state, memory) -> list[Proposal]``), and have one module each:

* ``surrogate`` (default): ridge regression of score on the squared pruned fractions
  ``(1 − keep)²`` over the memory bank (with a free intercept per round, so only within-round
  differences teach it), then the best predicted of many sampled candidates that meet the
  target (including the model's own constrained optimum), plus a few prior samples for
  exploration. Empty memory: a prior around uniform pruning.
* ``evolutionary``: crossover and mutation of the best-scored entries' pruning depths.
* ``random_proxy``: uniform samples in the allowed box (ablation baseline).
* ``llm``: an OpenAI-compatible ``/chat/completions`` endpoint; the answer is parsed,
  validated and projected; any failure falls back to the surrogate with the reason recorded.
* ``replay``: re-proposes a recorded run's candidates exactly.

``factory`` builds the proxy that ``prune.proxy`` names; ``projection`` projects every proposal
onto the round's target; ``base`` holds the interface and the sampling helpers the proxies share.

Randomness: each proxy draws from ``numpy.random.default_rng([seed, round, salt])``, so the
same seed gives the same proposals (the LLM's answers are recorded, not reproducible).

This package re-exports nothing: import each name from the module that defines it.
"""
