"""Every recipe runs: 2 GRPO-family steps on a tiny model; components compose or refuse clearly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import arith_rows, base_config

from grouprl.components import load_config
from grouprl.config import ConfigError, load_recipe, recipe_info, recipe_names, required_keys
from grouprl.training.trainer import Trainer

ISSUE_RECIPES = [
    "grpo",
    "dr_grpo",
    "dapo",
    "gspo",
    "cispo",
    "rloo",
    "remax",
    "bnpo",
    "ngrpo",
    "gdpo",
    "riskpo",
    "disco",
    "drpo",
    "reg_grpo",
    "gtpo",
    "llds",
    "rec",
    "opmd",
    "dhpo",
    "forking_tokens",
    "d3s",
    "clip_cov",
    "kl_cov",
    "seed_grpo",
    "single_stream",
    "dgpo",
    "trpa",
    "p3o",
    "etr",
    "dagrpo_pairs",
    "vas",
    "cures",
    "vade",
    "spo_priority",
    "hard_mining",
    "scaf_hints",
    "sage_hints",
    "knapsack",
    "icl_seed",
    "igrpo",
    "xrpo_alloc",
    "judge_constraints",
    "difficulty_scale",
    "dcpo",
    "dataset_reset",
    "serial_exit",
    "cures_alloc",
    "segment",
    "capo",
    "guide_hints",
    "icpo",
    "expo",
    "aepo",
    "difficulty_aug",
    "offpolicy_anchors",
    "brpo",
]


def even_first_digit(prompts, completions, **kw):
    """1 when the completion starts with an even digit: a coin-flip-like binary reward."""
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def starts_with_digit(prompts, completions, **kw):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


NEEDS_MODEL = {
    "reward_ensemble": 1,
    "pairwise_winrate": 1,
    "multihead_rm": 2,
    "rubric_reward": 0,
    "posterior_gate": 1,
}  # recipe -> heads of the tiny classifier its reward needs (0: a judge server)


def model_overrides(name: str, models: dict[int, Path], url: str) -> list[str]:
    """`key=value` for every <required: ...> value of the recipe."""
    out = []
    for key, _ in required_keys(load_recipe(name)):
        if key.endswith("base_url"):
            out.append(f"{key}={url}")
        elif key.endswith(".model"):
            out.append(f"{key}=judge")
        else:
            out.append(f"{key}={models[NEEDS_MODEL[name]]}")
    return out


def test_catalog_is_complete_and_documented():
    from grouprl.components import build_rewards

    assert set(ISSUE_RECIPES) <= set(recipe_names())
    for name in recipe_names():
        info = recipe_info(name)
        assert info["description"] and info["changes"] and info["confidence"], name
        assert "arXiv" in info["source"], name
        if name in NEEDS_MODEL:  # test_recipes_that_need_a_model_...
            continue
        cfg = load_config({"recipe": name})
        if cfg.rewards:  # a recipe's own rewards must all be registered
            assert build_rewards(cfg).names, name
        assert info["description"] and info["changes"] and info["confidence"], name
        assert "arXiv" in info["source"], name


@pytest.mark.parametrize("name", ISSUE_RECIPES)
def test_recipe_smoke(tmp_path, tiny_model_dir, name):
    cfg = base_config(tmp_path / name, tiny_model_dir, max_steps=2, micro_batch_size=4)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)  # let the recipe decide
    cfg["recipe"] = name
    cfg["rollout"]["num_generations"] = 1 if name == "single_stream" else 4
    # two rewards (gdpo normalizes each separately), weighted so the sum stays in [0, 1] (bnpo)
    rewards = [{"fn": even_first_digit, "weight": 0.5}, {"fn": starts_with_digit, "weight": 0.5}]
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=rewards)
    res = tr.train()
    assert res.steps == 2
    last = res.history[-1]
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    assert last.get("train/skipped_updates", 0) == 0


def test_components_compose_dapo_forking_kl(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "mix", tiny_model_dir, max_steps=2)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg["recipe"] = "dapo"
    cfg["token_mask"] = {"name": "forking_tokens", "rho": 0.2}
    cfg["regularizers"] = [{"name": "kl", "beta": 0.01}]
    res = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[even_first_digit]).train()
    last = res.history[-1]
    assert (
        "kl" in last
        and "forking_tokens/threshold" in last
        and "dynamic_sampling/dropped_groups" in last
    )
    assert 0.0 < last["selection/kept_token_frac"] < 0.5


def test_incompatible_combination_fails_at_start():
    with pytest.raises(ConfigError, match="token_mask: loss 'disco' scores whole sequences"):
        load_config({"recipe": "disco", "token_mask": {"name": "forking_tokens"}})
    with pytest.raises(
        ConfigError,
        match="rollout.num_generations: advantage 'single_stream' needs exactly 1 completions",
    ):
        load_config({"recipe": "single_stream"}, ["rollout.num_generations=4"])
    with pytest.raises(
        ConfigError,
        match="token_mask: token mask 'forking_tokens' has no parameter 'roh' \\(did you mean \"rho\"\\?\\)",
    ):
        load_config({"recipe": "forking_tokens"}, ["token_mask.roh=0.1"])


@pytest.mark.parametrize("name", ["crpo", "crpo_gdpo"])
def test_crpo_recipes_train_on_the_clinical_task_with_their_own_rewards(tmp_path, name):
    from grouprl.data.tasks.clinical import clinical_tokenizer, sft_rows
    from grouprl.models.tiny import build_tiny_model, save_model
    from grouprl.rewards import RewardSet

    tok = clinical_tokenizer()
    model_dir = save_model(build_tiny_model(tok, hidden_size=32, num_layers=1), tok, tmp_path / "m")
    cfg = base_config(tmp_path / name, model_dir, max_steps=2, micro_batch_size=8)
    for key in ("rewards", "advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg.update(
        recipe=name, data={"task": "clinical", "task_params": {"num_train": 8, "num_eval": 2}}
    )
    cfg["rollout"]["max_new_tokens"] = 12
    resolved = load_config(cfg)
    names = [r["name"] if isinstance(r, dict) else r for r in resolved.rewards]
    assert names == [
        "choice_accuracy",
        "format",
        "clinical_faithfulness",
        "clinical_comprehensiveness",
    ]
    res = Trainer(resolved).train()
    assert res.steps == 2
    for reward in names:
        assert f"rewards/{reward}/mean" in res.history[-1]
    # the recipe's comprehensiveness pays nothing for a trace with an invented finding
    from grouprl.data.tasks import get_task

    rows = get_task("clinical", num_train=20, num_eval=2).train_rows
    pairs = sft_rows(rows=rows, seed=0)
    k = next(i for i, p in enumerate(pairs) if p["kind"] == "invented")
    cols = {key: [v] for key, v in rows[k].items() if key != "prompt"}
    rs = RewardSet.from_config(resolved.rewards)
    values = rs([rows[k]["prompt"]], [pairs[k]["completion"]], cols).rewards_NK[0].tolist()
    assert values[0] == 1.0 and values[3] == 0.0  # a correct answer, yet no comprehensiveness
    assert values[2] < 1.0  # and faithfulness check (a) fails


def test_token_level_advantages_reach_the_completions_table(tmp_path, tiny_model_dir):
    """dcpo's advantages are per token: the completions table shows each row's mean."""
    cfg = base_config(tmp_path / "dcpo", tiny_model_dir, max_steps=1, micro_batch_size=4)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg["recipe"] = "dcpo"
    cfg["train"]["log_completions_every"] = 1
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[even_first_digit])
    res = tr.train()
    tr.close()
    assert res.steps == 1
    table = (tmp_path / "dcpo" / "completions.jsonl").read_text().splitlines()
    assert table and all(math.isfinite(json.loads(x)["advantage"]) for x in table)


def test_recipes_that_need_a_model_name_the_key_and_train_with_one(tmp_path, tiny_model_dir):
    """Without the model (or judge URL) the recipe is refused naming the key; with a tiny
    local classifier (or a judge server that answers "Score: 1") it trains 2 steps."""
    import http.server
    import json as _json
    import threading

    from grouprl.models.tiny import build_char_tokenizer, save_model
    from grouprl.rewards.models import build_tiny_classifier

    assert {n for n in recipe_names() if required_keys(load_recipe(n))} == set(NEEDS_MODEL)
    tok = build_char_tokenizer("0123456789+-=")
    models = {
        k: save_model(build_tiny_classifier(tok, num_labels=k, seed=0), tok, tmp_path / f"rm{k}")
        for k in (1, 2)
    }

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # an OpenAI-compatible chat completion that says "Score: 1"
            self.rfile.read(int(self.headers["Content-Length"]))
            body = _json.dumps({"choices": [{"message": {"content": "Score: 1"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rows = [{**r, "rubric": ["the answer is a number"]} for r in arith_rows()]
    try:
        for name in sorted(NEEDS_MODEL):
            keys = [k for k, _ in required_keys(load_recipe(name))]
            with pytest.raises(ConfigError, match=f"recipe {name}: set {re.escape(keys[0])}"):
                load_config({"recipe": name})
            cfg = base_config(tmp_path / name, tiny_model_dir, max_steps=2, micro_batch_size=4)
            for key in ("advantage", "loss", "regularizers", "rewards"):
                cfg.pop(key, None)
            cfg["recipe"] = name
            tr = Trainer(load_config(cfg, model_overrides(name, models, url)), train_dataset=rows)
            res = tr.train()
            tr.close()
            assert res.steps == 2 and math.isfinite(res.history[-1]["loss"]), name
    finally:
        server.shutdown()
