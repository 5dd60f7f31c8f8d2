"""Pruning proxies, the projection onto the FLOPs target, and the memory bank."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tdc_core.config import PruneConfig
from tdc_core.errors import ConfigError
from tdc_core.method.pruning.proxies.evolutionary import EvolutionaryProxy
from tdc_core.method.pruning.proxies.factory import make_proxy
from tdc_core.method.pruning.proxies.llm import LLMProxy
from tdc_core.method.pruning.proxies.projection import project_many
from tdc_core.method.pruning.proxies.random_proxy import RandomProxy
from tdc_core.method.pruning.proxies.records import MemoryBank, ProxyState
from tdc_core.method.pruning.proxies.replay import ReplayProxy
from tdc_core.method.pruning.proxies.surrogate import SurrogateProxy
from tdc_core.method.pruning.search import RecoveryOutcome, search_rounds
from tdc_core.method.pruning.space import PruneSpace, Unit
from tdc_core.reporter import RecordingReporter

KEY = "sk-test-5ecr3t-DO-NOT-LEAK-0123456789"
IMPORTANT = [1, 4, 6]  # units whose pruning hurts; the others barely matter


def synthetic_space(*, units: int = 8, attention: int = 0) -> PruneSpace:
    """Residual units of 64 channels (quantum 4), equal FLOPs per channel, no fixed FLOPs."""
    table = [Unit(name=f"res{i}", kind="res", dense_width=64, quantum=4, flops_per_channel=1000.0)
             for i in range(units)]
    table += [Unit(name=f"attn{i}", kind="attn", dense_width=32, quantum=2, flops_per_channel=300.0)
              for i in range(attention)]
    return PruneSpace(units=table, fixed_flops=5000.0, min_keep=0.1)


def known_score(keep: list[float]) -> float:
    """Loss rises steeply when an important unit is pruned, hardly otherwise."""
    k = np.asarray(keep)
    weight = np.full(len(k), 0.05)
    weight[IMPORTANT] = 4.0
    return float(np.sum(weight * (1 - k) ** 2))


def run_search(proxy, *, space: PruneSpace, seed: int = 0, rounds: int = 3, candidates: int = 6, fraction: float = 0.5,
               reporter=None) -> MemoryBank:
    """The real round loop with the synthetic score and no model."""
    prune = PruneConfig(rounds=rounds, candidates_per_round=candidates, seed=seed, tolerance=0.02, min_keep=0.1)
    budget = fraction * space.dense_flops
    memory = MemoryBank(units=space.units, dense_flops=space.dense_flops, budget_flops=budget, tolerance=0.02,
                        proxy=proxy.name, importance="magnitude", seed=seed)
    search_rounds(
        space=space, memory=memory, current_widths=[int(w) for w in space.dense_widths],
        lower_widths=[int(w) for w in space.min_widths], budget_flops=budget, prune=prune, proxy=proxy,
        evaluate=lambda r, props: [known_score(p.keep) for p in props],
        accept=lambda r, p: RecoveryOutcome(flops=p.flops, recovered_score=None, recovery_steps=0),
        reporter=reporter,
    )
    return memory


def final_score(memory: MemoryBank) -> float:
    return memory.rounds[-1].score


def state_for(space: PruneSpace, *, fraction: float, seed: int = 0, candidates: int = 4, current=None,
              lower=None) -> ProxyState:
    current = [int(w) for w in space.dense_widths] if current is None else current
    lower = [int(w) for w in space.min_widths] if lower is None else lower
    return ProxyState(round=1, rounds=1, space=space, current_widths=current, lower_widths=lower,
                      target_flops=fraction * space.dense_flops, budget_flops=fraction * space.dense_flops,
                      tolerance=0.02, num_candidates=candidates, seed=seed)


# --- projection -------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.95, 0.8, 0.6, 0.45, 0.3])
def test_projection_meets_the_target_within_tolerance_and_bounds(fraction):
    space = synthetic_space(units=6, attention=3)
    rng = np.random.default_rng(0)
    current = [56, 64, 48, 64, 64, 32, 32, 24, 32]
    lower = [int(w) for w in space.min_widths]
    lower[7] = current[7]  # a frozen unit
    target = fraction * space.flops(current)
    widths, flops = project_many(rng.uniform(0, 1.2, (200, len(current))), space=space, lower_widths=lower,
                                 upper_widths=current, target_flops=target, tolerance=0.02)
    assert np.all(np.abs(flops - target) <= 0.02 * target)
    assert np.all(flops == space.flops(widths))
    assert np.all((widths >= lower) & (widths <= current))
    assert np.all(widths % space.quanta == 0)
    assert np.all(widths[:, 7] == current[7])


def test_an_unreachable_target_leaves_every_unit_at_its_minimum():
    space = synthetic_space()
    state = state_for(space, fraction=0.01)
    empty = MemoryBank(units=space.units, dense_flops=1, budget_flops=1, tolerance=0.02, proxy="random",
                       importance="magnitude", seed=0)
    proposals = RandomProxy().propose(state, empty)
    assert [p.widths for p in proposals] == [[8] * 8]
    assert not proposals[0].within_tolerance


# --- the proxies find the units that matter ---------------------------------------------------------


def test_surrogate_beats_random_where_the_answer_is_known():
    space = synthetic_space()
    for seed in range(4):
        surrogate = run_search(SurrogateProxy(), space=space, seed=seed)
        random = run_search(RandomProxy(), space=space, seed=seed)
        assert final_score(surrogate) < 0.5 * final_score(random), seed
        accepted = next(e for e in surrogate.entries if e.round == 3 and e.accepted)
        # the important units survive, the budget is taken from the others
        others = [k for i, k in enumerate(accepted.keep) if i not in IMPORTANT]
        assert np.mean([accepted.keep[i] for i in IMPORTANT]) > np.mean(others) + 0.3, accepted.keep
        assert abs(accepted.flops - surrogate.budget_flops) <= 0.02 * surrogate.budget_flops


def test_evolutionary_beats_random_on_average():
    space = synthetic_space()
    evolutionary = [final_score(run_search(EvolutionaryProxy(), space=space, seed=s)) for s in range(4)]
    random = [final_score(run_search(RandomProxy(), space=space, seed=s)) for s in range(4)]
    assert np.mean(evolutionary) < 0.8 * np.mean(random)


def test_surrogate_without_memory_starts_from_uniform_pruning():
    space = synthetic_space()
    state = state_for(space, fraction=0.5)
    empty = MemoryBank(units=space.units, dense_flops=space.dense_flops, budget_flops=1.0, tolerance=0.02,
                       proxy="surrogate", importance="magnitude", seed=0)
    proposals = SurrogateProxy().propose(state, empty)
    assert len(proposals) == 4 and len({tuple(p.widths) for p in proposals}) == 4
    # every unit scaled alike (up to one quantum that the rounding needs to meet the target)
    assert max(proposals[0].widths) - min(proposals[0].widths) <= 4
    assert all(p.within_tolerance and p.proxy == "surrogate" for p in proposals)


@pytest.mark.parametrize("proxy", [SurrogateProxy(), EvolutionaryProxy(), RandomProxy()], ids=lambda p: p.name)
def test_same_seed_same_decisions(proxy):
    space = synthetic_space(units=5, attention=2)
    a = run_search(proxy, space=space, seed=7, candidates=4)
    b = run_search(proxy, space=space, seed=7, candidates=4)
    assert a.model_dump_json() == b.model_dump_json()
    c = run_search(proxy, space=space, seed=8, candidates=4)
    assert [e.widths for e in c.entries] != [e.widths for e in a.entries]


def test_memory_bank_round_trips_through_json_and_replays_exactly(tmp_path):
    space = synthetic_space()
    memory = run_search(SurrogateProxy(), space=space, seed=1)
    path = memory.save(tmp_path / "memory.json")
    loaded = MemoryBank.load(path)
    assert loaded == memory
    assert len(loaded.entries) == 3 * 6 and sum(e.accepted for e in loaded.entries) == 3
    assert [r.round for r in loaded.rounds] == [1, 2, 3]
    replayed = run_search(ReplayProxy(loaded), space=space, seed=1)
    def decisions(m: MemoryBank) -> list:
        return [(e.widths, e.score, e.accepted) for e in m.entries]

    assert decisions(replayed) == decisions(memory)


def test_make_proxy_names_and_errors():
    assert make_proxy(PruneConfig()).name == "surrogate"
    assert make_proxy(PruneConfig(proxy="evolutionary")).name == "evolutionary"
    assert make_proxy(PruneConfig(proxy="random")).name == "random"
    with pytest.raises(ConfigError, match="llm_url"):
        make_proxy(PruneConfig(proxy="llm"))


# --- the LLM proxy against a local fake endpoint ---------------------------------------------------


class FakeLLM:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 whose answer the test chooses."""

    def __init__(self) -> None:
        self.mode = "valid"
        self.answer: dict = {}
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if fake.mode == "slow":
                    time.sleep(1.5)
                if fake.mode == "http500":
                    self.send_response(500)
                    self.end_headers()
                    return
                content = {"valid": json.dumps(fake.answer), "over": json.dumps(fake.answer),
                           "garbage": f"Sorry, I can't do that. (debug: {self.headers.get('Authorization')})",
                           "slow": json.dumps(fake.answer)}[fake.mode]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must be reached directly
    server = FakeLLM()
    yield server
    server.close()


def llm_proxy(fake: FakeLLM, monkeypatch, *, timeout_s: float = 5.0):
    monkeypatch.setenv("TDC_TEST_LLM_KEY", KEY)
    return make_proxy(PruneConfig(proxy="llm", llm_url=fake.url, llm_model="fake-1",
                                  llm_api_key_env="TDC_TEST_LLM_KEY", llm_timeout_s=timeout_s))


def test_llm_answer_is_used_and_the_prompt_carries_table_target_and_memory(fake_llm, monkeypatch):
    space = synthetic_space()
    good = [1.0 if i in IMPORTANT else 0.2 for i in range(8)]  # 3·1.0 + 5·0.2 = 4 of 8 → 0.5 F
    fake_llm.answer = {"candidates": [good, {"res0": 0.3, "res1": 1.0, "res2": 0.3, "res3": 0.3, "res4": 1.0,
                                             "res5": 0.3, "res6": 0.4, "res7": 0.3}]}
    reporter = RecordingReporter()
    memory = run_search(llm_proxy(fake_llm, monkeypatch), space=space, rounds=1, candidates=3, reporter=reporter)
    entries = memory.round_entries(1)
    assert [e.proxy for e in entries] == ["llm", "llm", "surrogate"]
    assert entries[0].widths == [12, 64, 12, 12, 64, 12, 64, 12]  # already on budget: used as given
    assert entries[0].proposal == good and entries[0].fallback_reason is None
    assert abs(entries[0].flops - 0.5 * space.dense_flops) <= 0.02 * 0.5 * space.dense_flops
    assert "2 usable of 3" in entries[2].fallback_reason
    assert entries[0].accepted  # the known answer wins
    request = fake_llm.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "fake-1"
    prompt = json.loads(request["body"]["messages"][1]["content"])
    assert [u["name"] for u in prompt["units"]] == space.names
    assert prompt["target_fraction_of_dense"] == 0.5 and prompt["memory"] == []
    # the second round's prompt carries the first round's memory
    memory2 = run_search(llm_proxy(fake_llm, monkeypatch), space=space, rounds=2, candidates=3)
    assert len(json.loads(fake_llm.requests[-1]["body"]["messages"][1]["content"])["memory"]) == 3
    assert KEY not in memory.model_dump_json() + memory2.model_dump_json() + "\n".join(reporter.messages)


@pytest.mark.parametrize(("mode", "reason"), [
    ("garbage", "invalid answer"),
    ("slow", "timeout"),
    ("over", "over budget"),
    ("http500", "HTTP 500"),
])
def test_llm_failures_fall_back_to_the_surrogate_with_a_logged_reason(fake_llm, monkeypatch, mode, reason):
    space = synthetic_space()
    fake_llm.mode = mode
    fake_llm.answer = {"candidates": [[1.0] * 8, [0.9] * 8]}  # all far above 0.5 F (used by "over")
    if mode == "slow":
        fake_llm.answer = {"candidates": [[0.5] * 8]}
    reporter = RecordingReporter()
    memory = run_search(llm_proxy(fake_llm, monkeypatch, timeout_s=0.3), space=space, rounds=2, candidates=3,
                        reporter=reporter)
    assert all(e.proxy == "surrogate" and reason in e.fallback_reason for e in memory.entries)
    assert all(reason in r.fallback_reason and r.proxies_used == ["surrogate"] for r in memory.rounds)
    assert any(reason in m for m in reporter.messages)
    assert abs(memory.rounds[-1].flops - memory.budget_flops) <= 0.02 * memory.budget_flops
    logs = memory.model_dump_json() + "\n".join(reporter.messages)
    assert KEY not in logs  # even when the endpoint echoes it back
    if mode == "garbage":
        assert "[redacted]" in memory.entries[0].fallback_reason


def test_llm_without_a_key_falls_back_without_calling(fake_llm, monkeypatch):
    monkeypatch.delenv("TDC_NO_SUCH_KEY", raising=False)
    proxy = LLMProxy(url=fake_llm.url, model="m", api_key_env="TDC_NO_SUCH_KEY", timeout_s=1.0)
    memory = run_search(proxy, space=synthetic_space(), rounds=1, candidates=2)
    assert fake_llm.requests == []
    assert all("TDC_NO_SUCH_KEY is not set" in e.fallback_reason for e in memory.entries)


def test_llm_refuses_non_http_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("TDC_TEST_LLM_KEY", KEY)
    proxy = LLMProxy(url=f"file://{tmp_path}", model="m", api_key_env="TDC_TEST_LLM_KEY", timeout_s=1.0)
    memory = run_search(proxy, space=synthetic_space(), rounds=1, candidates=2)
    assert all("http(s)" in e.fallback_reason for e in memory.entries)


def test_memory_bank_off_hides_earlier_candidates_from_the_proxy_but_records_them():
    """prune.memory=false (the paper's memory-bank ablation): every round's proxy call sees an
    empty bank, while the search's own record still holds every candidate."""
    from tdc_core.method.pruning.proxies.random_proxy import RandomProxy

    seen: list[int] = []

    class Spy(RandomProxy):
        def propose(self, state, memory):
            seen.append(len(memory.entries))
            return super().propose(state, memory)

    space = synthetic_space()
    for remember, expected in ((True, [0, 4, 8]), (False, [0, 0, 0])):
        seen.clear()
        prune = PruneConfig(rounds=3, candidates_per_round=4, seed=0, tolerance=0.02, min_keep=0.1, memory=remember)
        budget = 0.5 * space.dense_flops
        memory = MemoryBank(units=space.units, dense_flops=space.dense_flops, budget_flops=budget, tolerance=0.02,
                            proxy="random", importance="magnitude", seed=0)
        search_rounds(
            space=space, memory=memory, current_widths=[int(w) for w in space.dense_widths],
            lower_widths=[int(w) for w in space.min_widths], budget_flops=budget, prune=prune, proxy=Spy(),
            evaluate=lambda r, props: [known_score(p.keep) for p in props],
            accept=lambda r, p: RecoveryOutcome(flops=p.flops, recovered_score=None, recovery_steps=0))
        assert seen == expected
        assert len(memory.entries) == 12 and len(memory.rounds) == 3
