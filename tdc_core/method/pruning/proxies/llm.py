"""The LLM proxy: an OpenAI-compatible ``/chat/completions`` endpoint proposes the candidates; the
answer is parsed, validated and projected, and any failure falls back to the surrogate with the
(redacted) reason recorded. Holds the HTTP client and the prompt.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tdc_core.method.pruning.proxies.base import Proxy
from tdc_core.method.pruning.proxies.projection import _project_rows, _round_widths
from tdc_core.method.pruning.proxies.records import MemoryBank, Proposal, ProxyState
from tdc_core.method.pruning.proxies.surrogate import SurrogateProxy

__all__ = [
    "LLMProxy",
]

_MAX_RESPONSE_BYTES = 1 << 20
_MAX_REASON_CHARS = 300
_MAX_MEMORY_IN_PROMPT = 64

_SYSTEM_PROMPT = (
    "You are the pruning proxy of a diffusion-model UNet. Each unit is the inner channel width of "
    "a residual block or of an attention block. You choose, per unit, a keep ratio (fraction of the "
    "unit's dense width) so that the model's FLOPs meet a target while its held-out denoising loss "
    "(score, lower is better) stays as low as possible. Learn from the memory of earlier "
    "candidates. Answer with JSON only."
)


class _LLMFailure(Exception):
    """The LLM could not be used; the message is the (redacted) reason recorded in the memory."""


@dataclass(frozen=True)
class LLMProxy:
    """Asks an OpenAI-compatible chat endpoint for candidates; falls back to ``fallback``.

    Args:
        url: base URL (``…/v1``) or the full ``…/chat/completions`` URL; http(s) only.
        model: the endpoint's model name.
        api_key_env: NAME of the environment variable holding the key. The key is read at each
            call, sent only in the ``Authorization`` header, and redacted from every recorded
            reason; it is never stored.
        timeout_s: socket timeout of the request (connect and each read; a server that keeps
            trickling bytes can take longer in total).
        max_overshoot: an answer whose FLOPs (clipped to the allowed ranges, before projection)
            exceed ``target · (1 + max_overshoot)`` is rejected as over budget; None: the
            state's tolerance. Answers within it are projected onto the target.
        environ: where to read the key (None: ``os.environ`` at call time).

    The prompt holds the unit table (name, kind, dense/current/minimum width, quantum, FLOPs per
    channel, share of the dense FLOPs), the FLOPs formula, the round's target and the memory bank
    (last 64 entries). The answer must contain ``{"candidates": [...]}`` where each candidate is a
    list of keep ratios in unit order or an object ``{unit name: keep ratio}`` (missing units keep
    their current width).
    """

    url: str
    model: str
    api_key_env: str
    timeout_s: float
    max_overshoot: float | None = None
    fallback: Proxy = field(default_factory=SurrogateProxy)
    environ: Mapping[str, str] | None = None
    name: ClassVar[str] = "llm"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        key = (self.environ if self.environ is not None else os.environ).get(self.api_key_env, "")
        try:
            if not key:
                raise _LLMFailure(f"environment variable {self.api_key_env} is not set or empty")
            content = self._ask(state, memory, key)
            rows = self._parse(content, state)
            valid, reasons = self._check(rows, state)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional LLM falls back
            reason = str(exc) if isinstance(exc, _LLMFailure) else f"unexpected {type(exc).__name__}: {exc}"
            reason = _redact(reason, key)
            return [p.model_copy(update={"fallback_reason": reason})
                    for p in self.fallback.propose(state, memory)]
        out = _project_rows(np.array(valid), state=state, proxy=self.name, n=state.num_candidates)
        if len(out) < state.num_candidates:
            reason = _redact(f"llm gave {len(out)} usable of {state.num_candidates} candidates"
                             + (f" ({reasons[0]})" if reasons else ""), key)
            seen = {tuple(p.widths) for p in out}
            for p in self.fallback.propose(state, memory):
                if len(out) < state.num_candidates and tuple(p.widths) not in seen:
                    seen.add(tuple(p.widths))
                    out.append(p.model_copy(update={"fallback_reason": reason}))
        return out

    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def prompt(self, state: ProxyState, memory: MemoryBank) -> str:
        """The user message: unit table, target, FLOPs formula and memory bank, as JSON."""
        space = state.space
        dense = state.dense_flops
        units = [
            {"name": u.name, "kind": u.kind, "dense_width": u.dense_width, "current_width": int(c),
             "min_width": int(lo), "quantum": u.quantum, "flops_per_channel": u.flops_per_channel,
             "dense_flops_share": round(u.flops_per_channel * u.dense_width / dense, 4)}
            for u, c, lo in zip(space.units, state.current_widths, state.lower_widths)
        ]
        recent = memory.entries[-_MAX_MEMORY_IN_PROMPT:]
        mem = [{"round": e.round, "keep": [round(k, 3) for k in e.keep], "flops_fraction": round(e.flops / dense, 4),
                "score": e.score, "accepted": e.accepted} for e in recent]
        body = {
            "round": state.round, "rounds": state.rounds,
            "target_flops": state.target_flops, "target_fraction_of_dense": round(state.target_flops / dense, 4),
            "final_budget_fraction_of_dense": round(state.budget_flops / dense, 4),
            "current_fraction_of_dense": round(state.current_flops / dense, 4),
            "tolerance": state.tolerance,
            "flops_formula": "flops = fixed_flops + sum_i flops_per_channel_i * width_i, "
                             "width_i = keep_i * dense_width_i rounded to a multiple of quantum_i, "
                             "between min_width_i and current_width_i",
            "fixed_flops": space.fixed_flops, "dense_flops": dense, "units": units, "memory": mem,
            "answer_format": {"candidates": f"list of {state.num_candidates} candidates; each a list of "
                                            f"{len(units)} keep ratios in unit order (0..1)"},
        }
        return json.dumps(body)

    def _ask(self, state: ProxyState, memory: MemoryBank, key: str) -> str:
        url = self.endpoint()
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise _LLMFailure("prune.llm_url must be an http(s) URL")
        payload = {"model": self.model, "temperature": 0,
                   "messages": [{"role": "system", "content": _SYSTEM_PROMPT},
                                {"role": "user", "content": self.prompt(state, memory)}]}
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            raise _LLMFailure(f"endpoint answered HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _LLMFailure(f"no answer within {self.timeout_s:g} s (timeout)") from None
            raise _LLMFailure(f"cannot reach the endpoint: {exc.reason}") from None
        except TimeoutError:
            raise _LLMFailure(f"no answer within {self.timeout_s:g} s (timeout)") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _LLMFailure(f"request failed: {type(exc).__name__}: {exc}") from None
        try:
            message = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _LLMFailure(f"response is not an OpenAI chat completion: {raw[:120]!r}") from None
        if not isinstance(message, str):
            raise _LLMFailure("response message content is not text")
        return message

    @staticmethod
    def _parse(content: str, state: ProxyState) -> list[np.ndarray]:
        """Answer text → raw keep vectors ``[U]`` (validated: shape, names, finite values in [0, 1])."""
        text = re.sub(r"^```(?:json)?|```$", "", content.strip(), flags=re.MULTILINE).strip()
        start, end = text.find("{"), text.rfind("}")
        try:
            answer = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("candidates"), list) or not answer["candidates"]:
            raise _LLMFailure(f"invalid answer (no JSON object with a non-empty 'candidates' list): {content[:120]!r}")
        names = state.space.names
        current = state.upper_keep
        rows = []
        for i, cand in enumerate(answer["candidates"]):
            if isinstance(cand, dict) and isinstance(cand.get("keep"), (list, dict)):
                cand = cand["keep"]
            if isinstance(cand, dict):
                unknown = sorted(set(cand) - set(names))
                if unknown:
                    raise _LLMFailure(f"invalid answer: candidate {i} names unknown units {unknown[:3]}")
                values = [cand.get(n, current[j]) for j, n in enumerate(names)]
            elif isinstance(cand, list):
                if len(cand) != len(names):
                    raise _LLMFailure(f"invalid answer: candidate {i} has {len(cand)} ratios, expected {len(names)}")
                values = cand
            else:
                raise _LLMFailure(f"invalid answer: candidate {i} is neither a list nor an object")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                       for v in values):
                raise _LLMFailure(f"invalid answer: candidate {i} has keep ratios outside [0, 1] or non-numbers")
            rows.append(np.asarray(values, dtype=np.float64))
        return rows

    def _check(self, rows: list[np.ndarray], state: ProxyState) -> tuple[list[np.ndarray], list[str]]:
        """Split into rows within the budget and reasons for the rejected ones.

        Raises:
            _LLMFailure: every row is over budget.
        """
        over = state.tolerance if self.max_overshoot is None else self.max_overshoot
        lo, up = state.lower_keep, state.upper_keep
        valid, reasons = [], []
        for i, row in enumerate(rows):
            clipped = np.clip(row, lo, up)
            w = _round_widths(clipped[None], space=state.space, lower=np.asarray(state.lower_widths),
                              upper=np.asarray(state.current_widths))[0]
            f = state.space.flops(w)
            if f > state.target_flops * (1 + over):
                reasons.append(f"over budget: candidate {i} needs {f / state.dense_flops:.3f} F, target "
                               f"{state.target_flops / state.dense_flops:.3f} F")
            else:
                valid.append(row)
        if not valid:
            raise _LLMFailure(reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
        return valid, reasons


def _redact(text: str, key: str) -> str:
    text = text.replace(key, "[redacted]") if key else text
    return text[:_MAX_REASON_CHARS]
