"""The command line: one-line errors with exit codes, help, and the quick demo end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import arith_rows, base_config

from grouprl.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sft", "eval", "demo", "recipes", "examples:"):
        assert cmd in out


def test_missing_config_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"grouprl: error: config file not found: {tmp_path / 'missing.yaml'}"
    ]


def test_bad_key_suggests(capsys, tmp_path, tiny_model_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path / "out", tiny_model_dir)))
    code, _, err = run(capsys, "train", str(cfg), "train.max_stpes=3")
    assert code == 2
    assert 'train.max_stpes: unknown key (did you mean "max_steps"?)' in err
    assert "Traceback" not in err


def test_bad_row_names_file_row_field(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    rows = arith_rows(3)
    rows[1]["prompt"] = "   "
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = base_config(tmp_path / "out", tiny_model_dir)
    cfg["data"] = {"path": str(data)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "train", str(tmp_path / "run.yaml"))
    assert code == 2
    assert "prompts.jsonl: row 2: field 'prompt'" in err
    # skip mode trains on the good rows and counts the bad one
    code, out, _ = run(
        capsys,
        "train",
        str(tmp_path / "run.yaml"),
        "data.on_bad_row=skip",
        "train.max_steps=1",
        "train.prompts_per_step=2",  # 2 usable rows
    )
    assert code == 0 and "trained 1 steps" in out


def test_train_then_eval(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in arith_rows(6)))
    cfg = base_config(tmp_path / "out", tiny_model_dir, max_steps=2)
    cfg["data"] = {"path": str(data)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(capsys, "train", str(tmp_path / "run.yaml"))
    assert code == 0, err
    ckpt = tmp_path / "out" / "checkpoints" / "step_0000002"
    assert ckpt.is_dir()
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        str(ckpt),
        "--data",
        str(data),
        "--reward",
        "exact_match",
        "-n",
        "4",
        "-k",
        "1",
        "4",
        "--max-new-tokens",
        "4",
        "--output",
        str(tmp_path / "eval.json"),
    )
    assert code == 0, err
    res = json.loads((tmp_path / "eval.json").read_text())
    for key in ("pass@1", "pass@4", "maj@4", "pass@1_ci_low", "rewards/exact_match/mean"):
        assert key in res
    assert 0.0 <= res["pass@1"] <= res["pass@4"] <= 1.0


def test_sft_command(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) for r in arith_rows(8)
        )
    )
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(data)},
        "train": {
            "output_dir": str(tmp_path / "sft"),
            "max_steps": 5,
            "learning_rate": 1e-3,
            "progress": False,
        },
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(capsys, "sft", str(tmp_path / "sft.yaml"))
    assert code == 0, err
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    assert "learning_rate not set" not in out  # the config gave 1e-3
    del cfg["train"]["learning_rate"]
    cfg["train"]["overwrite"] = True
    (tmp_path / "sft2.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(capsys, "sft", str(tmp_path / "sft2.yaml"))
    assert code == 0, err
    assert "train.learning_rate not set: 2e-05 (SFT's default)" in out
    # a row without the completion column names its place
    data.write_text(json.dumps({"prompt": "1+1="}))
    code, _, err = run(capsys, "sft", str(tmp_path / "sft.yaml"))
    assert code == 2 and "row 1: field 'completion'" in err


def test_unloadable_model_is_one_line(capsys, tmp_path):
    # a model directory that exists but holds no model: an OSError from transformers
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "empty"), "--task", "arith")
    assert code == 2 and "model.name_or_path: cannot load" in err and "Traceback" not in err


def test_recipes(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "dr_grpo" in out and "2503.20783" in out
    code, out, _ = run(capsys, "recipes", "dr_grpo")
    assert code == 0 and "seq_mean_token_sum_norm" in out


@pytest.mark.slow
def test_quick_demo_writes_a_run_directory(capsys, tmp_path):
    code, out, err = run(
        capsys, "demo", "--quick", "--output-dir", str(tmp_path / "demo"), "--no-progress"
    )
    assert code == 0, err
    d = tmp_path / "demo"
    for f in (
        "summary.md",
        "summary.json",
        "curves.png",
        "grpo/metrics.jsonl",
        "sft/metrics.jsonl",
        "final_model/model.safetensors",
        "final_model/README.md",  # its model card
    ):
        assert (d / f).is_file(), f
    assert "eval/pass@1" in (d / "final_model" / "README.md").read_text()
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((d / "summary.json").read_text())["summary"]
    assert 0.0 <= summary["heldout_pass@1_after_grpo"] <= 1.0
    assert "held-out pass@1" in out


def test_debug_shows_the_exception(tmp_path):
    from grouprl.config import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_ttrl_on_unlabeled_questions(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "questions.jsonl"
    rows = arith_rows(6)
    data.write_text(
        "\n".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) for r in rows)
    )
    code, out, err = run(
        capsys,
        "ttrl",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--recipe",
        "spine",
        "--output-dir",
        str(tmp_path / "tt"),
        "--mode",
        "math",
        "rollout.num_generations=4",
        "rollout.num_train_samples=2",
        "rollout.max_new_tokens=4",
        "train.max_steps=2",
        "train.prompts_per_step=2",
        "train.progress=false",
        "train.learning_rate=1e-3",
    )
    assert code == 0, err
    assert "spine: 2 steps" in out
    lines = [json.loads(x) for x in (tmp_path / "tt" / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "ttrl/majority_ratio",
        "ttrl/label_accuracy",
        "ttrl/reward_accuracy",
        "forking_tokens/kept_frac",
        "entropy_band/low",
        "completions/mean_length",
        "selection/kept_token_frac",
    ):
        assert key in lines[-1], key


def test_sft_on_chat_conversations(capsys, tmp_path, tiny_model_dir):
    """TRL's conversational SFT rows: the last assistant message is the completion, the
    messages before it the prompt (data.prompt_column: messages)."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in arith_rows(6)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(data), "prompt_column": "messages", "chat_template": "never"},
        "train": {"output_dir": str(tmp_path / "sft"), "max_steps": 3, "progress": False},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(capsys, "sft", str(tmp_path / "sft.yaml"))
    assert code == 0, err
    assert "sft: 3 steps" in out
    from grouprl.data import load_prompts

    ds = load_prompts(
        data, prompt_column="messages", chat_template="never", completion_from_messages="completion"
    )
    assert ds[0].text.strip() == f"user: {rows[0]['messages'][0]['content']}"
    assert ds[0].columns["completion"] == rows[0]["messages"][1]["content"]


@pytest.mark.slow
def test_quick_tools_demo_runs_multi_turn_with_the_calculator(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "demo",
        "--task",
        "tools",
        "--quick",
        "--output-dir",
        str(tmp_path / "demo"),
        "--no-progress",
    )
    assert code == 0, err
    d = tmp_path / "demo"
    summary = json.loads((d / "summary.json").read_text())["summary"]
    assert "heldout_tool_calls_per_correct_after_grpo" in summary
    assert "tool calls per correct answer" in out
    lines = [json.loads(x) for x in (d / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert "tools/calls_mean" in lines[-1] and "turns/mean" in lines[-1]


def test_eval_samples_trajectories_with_an_environment(capsys, tmp_path):
    """`grouprl eval --task tools` takes the task's calculator environment: the results
    report tool calls; `--environment` names one for a data file; a bad one is one line."""
    from grouprl.data.tasks import get_task
    from grouprl.models.tiny import build_tiny_model, save_model

    task = get_task("tools")
    tok = task.build_tokenizer()
    model_dir = save_model(
        build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2), tok, tmp_path / "m"
    )
    base = ["eval", "--model", str(model_dir), "-n", "2", "--limit", "3", "--max-new-tokens", "6"]
    code, out, err = run(capsys, *base, "--task", "tools", "--output", str(tmp_path / "a.json"))
    assert code == 0, err
    res = json.loads((tmp_path / "a.json").read_text())
    assert "tools/calls_mean" in res and res["num_problems"] == 3
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "12*34=", "answer": "408"}))
    env = '{"name": "tools", "tools": ["calculator"]}'
    code, out, err = run(
        capsys, *base, "--data", str(data), "--reward", "exact_match", "--environment", env
    )
    assert code == 0, err
    assert "tools/calls_mean" in out
    code, out, err = run(capsys, *base, "--task", "tools", "--environment", "nope")
    assert code != 0 and "unknown environment 'nope'" in err


def test_sft_command_takes_row_transforms(capsys, tmp_path, tiny_model_dir):
    """--transform thought_dropout:ratio=1.0 runs (no row has a think block here, so the
    pairs are unchanged); an unknown transform or parameter is refused before loading."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) for r in arith_rows(4)
        )
    )
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "progress": False},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(
        capsys, "sft", str(tmp_path / "sft.yaml"), "--transform", "thought_dropout:ratio=1.0"
    )
    assert code == 0, err
    code, out, err = run(capsys, "sft", str(tmp_path / "sft.yaml"), "--transform", "nope")
    assert code != 0 and "--transform" in err and "nope" in err
    code, out, err = run(
        capsys, "sft", str(tmp_path / "sft.yaml"), "--transform", "thought_dropout:rate=0.5"
    )
    assert code != 0 and "rate" in err
