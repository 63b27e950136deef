"""The RolloutEngine protocol: build_engine, HFEngine's weight sync and close, custom engines."""

from __future__ import annotations

import warnings

import pytest
import torch

from grouprl.config import ConfigError, RolloutConfig
from grouprl.data.datasets import PromptExample
from grouprl.eval.run import evaluate
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model
from grouprl.rewards import RewardSet
from grouprl.rollout import (
    ROLLOUT_ENGINES,
    HFEngine,
    RolloutEngine,
    RolloutEngineError,
    Rollouts,
    SamplingParams,
    build_engine,
    sampling_params,
)

CHARS = "0123456789+-="
GREEDY = SamplingParams(num_generations=2, temperature=0.0, max_new_tokens=6)


@pytest.fixture
def engines(monkeypatch):
    """ROLLOUT_ENGINES, restored after the test (so test-only engines do not leak)."""
    for attr in ("_items", "_caps"):
        if hasattr(ROLLOUT_ENGINES, attr):
            monkeypatch.setattr(ROLLOUT_ENGINES, attr, dict(getattr(ROLLOUT_ENGINES, attr)))
    return ROLLOUT_ENGINES


def _model(seed: int, scramble: bool = False):
    """A tiny model; `scramble` redraws every weight at a larger scale, since freshly built
    tiny models all greedily repeat one token and so could not tell weights apart."""
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    if scramble:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model, tok


def test_unknown_engine_is_a_config_error_with_a_suggestion(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match=r'^rollout\.engine: .*did you mean "hf"'):
        build_engine(RolloutConfig(engine="hff"), model, tok)


def test_registered_non_engine_is_a_config_error(tiny, engines):
    @engines.register("half_engine")
    class HalfEngine:  # generate only: no from_config, update_weights, close
        def generate(self, prompts, params): ...

    model, tok = tiny
    with pytest.raises(ConfigError, match=r"rollout\.engine: 'half_engine'.*lacks from_config"):
        build_engine(RolloutConfig(engine="half_engine"), model, tok)


def test_hf_engine_satisfies_the_protocol(tiny):
    model, tok = tiny
    cfg = RolloutConfig(share_prefill=False, num_generations=3, top_k=5)
    eng = build_engine(cfg, model, tok, max_prompt_length=17)
    assert isinstance(eng, HFEngine) and isinstance(eng, RolloutEngine)
    assert eng.model is model and not eng.share_prefill and eng.max_prompt_length == 17
    assert sampling_params(cfg) == SamplingParams(num_generations=3, top_k=5)


def test_update_weights_makes_the_engine_sample_the_new_weights():
    policy, tok = _model(seed=0)
    other, _ = _model(seed=1, scramble=True)
    eng = HFEngine(policy, tok)
    prompts = ["12+3=", "7+8="]
    want = HFEngine(other, tok).generate(prompts, GREEDY).completion_ids_NT
    before = eng.generate(prompts, GREEDY).completion_ids_NT
    assert not torch.equal(before, want)  # the two models disagree to begin with

    eng.update_weights(other, step=1)
    assert torch.equal(eng.generate(prompts, GREEDY).completion_ids_NT, want)
    # a copy, not a reference: the engine's model is still its own
    assert eng.model is policy
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(policy.parameters(), other.parameters(), strict=True)
    )


def test_update_weights_with_its_own_model_is_a_no_op(tiny, monkeypatch):
    model, tok = tiny
    eng = HFEngine(model, tok)
    monkeypatch.setattr(model, "load_state_dict", lambda *a, **k: pytest.fail("copied"))
    eng.update_weights(model, step=3)


def test_close_is_idempotent(tiny):
    eng = HFEngine(*tiny)
    eng.close()
    eng.close()


def test_shared_prefill_issues_no_future_warning(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok, share_prefill=True)
    params = SamplingParams(num_generations=3, temperature=1.0, max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng.generate(["12+34=", "1+2="], params)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


class ScriptedEngine:
    """Answers every prompt with its scripted completions; records what it was asked."""

    script: dict[str, list[str]] = {}
    reports_sampling_logp = False
    default_mismatch_correction = "none"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], SamplingParams]] = []
        self.closed = 0

    @classmethod
    def from_config(cls, rollout_cfg, model, tokenizer, *, max_prompt_length=None):
        return cls()

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        self.calls.append((prompts, params))
        G = params.num_generations
        texts = [t for p in prompts for t in self.script[p][:G]]
        N = len(texts)
        ones = torch.ones(N, 1)
        return Rollouts(
            prompt_ids_NP=torch.zeros(N, 1, dtype=torch.long),
            prompt_mask_NP=ones,
            completion_ids_NT=torch.zeros(N, 1, dtype=torch.long),
            attention_mask_NT=ones,
            loss_mask_NT=ones,
            truncated_N=torch.zeros(N, dtype=torch.bool),
            completions=texts,
            group_size=G,
        )

    def update_weights(self, model: torch.nn.Module, *, step: int) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


def _examples() -> list[PromptExample]:
    ScriptedEngine.script = {"1+2=": ["3", "4"], "2+2=": ["4", "4"]}
    return [
        PromptExample(prompt="1+2=", text="1+2=", columns={"answer": "3"}, row=1),
        PromptExample(prompt="2+2=", text="2+2=", columns={"answer": "4"}, row=2),
    ]


def test_evaluate_uses_a_custom_engine(tiny, engines):
    engines.register("scripted")(ScriptedEngine)
    model, tok = tiny
    eng = build_engine(RolloutConfig(engine="scripted"), model, tok)
    assert isinstance(eng, ScriptedEngine)
    rewards = RewardSet(["exact_match"])
    res = evaluate(model, tok, _examples(), rewards, n=2, ks=(1, 2), max_new_tokens=3, engine=eng)
    assert res["pass@1"] == pytest.approx(0.75) and res["pass@2"] == 1.0
    (prompts, params), *more = eng.calls
    assert prompts == ["1+2=", "2+2="] and not more
    assert params.num_generations == 2 and params.max_new_tokens == 3
    assert eng.closed == 0  # the caller's engine stays open


def test_evaluate_builds_a_registered_engine_by_name(tiny, engines, monkeypatch):
    built: list[ScriptedEngine] = []
    real = ScriptedEngine.from_config.__func__

    def spy(cls, *a, **k):
        built.append(real(cls, *a, **k))
        return built[-1]

    monkeypatch.setattr(ScriptedEngine, "from_config", classmethod(spy))
    engines.register("scripted")(ScriptedEngine)
    model, tok = tiny
    res = evaluate(model, tok, _examples(), RewardSet(["exact_match"]), n=2, engine="scripted")
    assert res["pass@1"] == pytest.approx(0.75)
    assert len(built) == 1 and built[0].closed == 1  # built for the call, closed after it
    with pytest.raises(ConfigError, match="rollout.engine"):
        evaluate(model, tok, _examples(), RewardSet(["exact_match"]), n=2, engine="scriptd")


class FailingEngine(HFEngine):
    """The HF engine, failing the way a dead or stuck vLLM server does: at the n-th generate
    or the n-th weight sync (failure injection through the engine protocol)."""

    fail_generate_at = 0
    fail_sync_at = 0

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.generates = self.syncs = 0

    def generate(self, prompts, params):
        self.generates += 1
        if self.generates == self.fail_generate_at:
            raise RolloutEngineError(f"step {self.generates}: sampling: server http://x gone")
        return super().generate(prompts, params)

    def update_weights(self, model, *, step):
        self.syncs += 1
        if self.syncs == self.fail_sync_at:
            raise RolloutEngineError(f"step {step}: weight sync: server http://x stuck")
        super().update_weights(model, step=step)


@pytest.mark.parametrize("where", ["generate", "sync"])
def test_a_failing_engine_stops_the_run_with_a_checkpoint_and_it_resumes(
    tmp_path, tiny_model_dir, engines, monkeypatch, where
):
    """A sampling failure in step 3 keeps steps 1-2 (step 3 repeats on resume); a sync failure
    after step 3's update keeps step 3. Either way the error names the step, the server and
    the checkpoint, and train.resume=true finishes the run."""
    from conftest import arith_rows, base_config

    from grouprl.training.checkpoint import list_checkpoints
    from grouprl.training.trainer import Trainer

    engines.register("failing")(FailingEngine)
    monkeypatch.setattr(FailingEngine, f"fail_{where}_at", 3)
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=4)
    cfg["rollout"]["engine"] = "failing"
    with pytest.raises(RolloutEngineError) as err:
        with Trainer(cfg, train_dataset=arith_rows()) as tr:
            tr.train()
    kept = 2 if where == "generate" else 3
    msg = str(err.value)
    assert "http://x" in msg and f"saved at step {kept}" in msg and "train.resume=true" in msg
    assert list_checkpoints(tmp_path / "run")[-1].name.endswith(str(kept))
    monkeypatch.setattr(FailingEngine, f"fail_{where}_at", 0)
    cfg["train"]["resume"] = True
    with Trainer(cfg, train_dataset=arith_rows()) as tr:
        res = tr.train()
    assert res.steps == 4 and res.history[0]["step"] == kept + 1


def test_a_failing_engine_during_evaluation_keeps_the_step(
    tmp_path, tiny_model_dir, engines, monkeypatch
):
    import json

    from conftest import arith_rows, base_config

    from grouprl.training.checkpoint import list_checkpoints
    from grouprl.training.trainer import Trainer

    engines.register("failing")(FailingEngine)
    monkeypatch.setattr(FailingEngine, "fail_generate_at", 2)  # 1: step 1, 2: its evaluation
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(4)))
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=3, eval_every=1, eval_limit=2)
    cfg["rollout"]["engine"] = "failing"
    cfg["data"] = {"eval_path": str(held_out)}
    with pytest.raises(RolloutEngineError, match="saved at step 1"):
        with Trainer(cfg, train_dataset=arith_rows()) as tr:
            tr.train()
    assert list_checkpoints(tmp_path / "run")[-1].name.endswith("1")
