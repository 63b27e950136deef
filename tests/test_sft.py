"""SFT warm start: completion-only loss that goes down."""

from __future__ import annotations

import torch

from grouprl.models.forward import completion_logprobs
from grouprl.training.sft import encode_pairs, sft


def test_sft_lowers_completion_loss(tiny):
    model, tok = tiny
    prompts, comps = ["12+3=", "4+5=", "7+7="], ["15", "9", "14"]
    pid, pm, cid, cm = encode_pairs(tok, prompts, comps)

    def nll():
        with torch.no_grad():
            lp, _ = completion_logprobs(model, pid, pm, cid, cm)
        return float(-(lp * cm).sum() / cm.sum())

    start = nll()
    res = sft(
        model, tok, prompts, comps, steps=40, batch_size=3, learning_rate=3e-3, progress=False
    )
    assert res.final_loss < start
    assert nll() < 0.5 * start


def test_encode_pairs_masks_completion_and_eos(tiny):
    _, tok = tiny
    pid, pm, cid, cm = encode_pairs(tok, ["1+2=", "10+20="], ["3", "30"])
    assert pm.tolist()[0][:2] == [0.0, 0.0]  # left padding of the shorter prompt
    assert cid[0].tolist()[:2] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    assert cm.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_sft_checkpoints_resume_exactly_and_report_held_out_loss(tmp_path):
    """6 steps straight == 3 steps, a checkpoint, then 3 more resumed from it (weights,
    AdamW, the batch sampler); the held-out completion loss is logged and falls."""
    import json

    from grouprl.models.tiny import build_char_tokenizer, build_tiny_model

    prompts = [f"{a}+{b}=" for a in range(10) for b in range(3)]
    completions = [str(a + b) for a in range(10) for b in range(3)]
    held_out = (["11+2=", "12+3="], ["13", "15"])

    def fresh():
        tok = build_char_tokenizer("0123456789+=")
        return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0), tok

    kw = dict(batch_size=8, learning_rate=3e-3, progress=False, eval_pairs=held_out)
    model, tok = fresh()
    sft(model, tok, prompts, completions, steps=6, output_dir=tmp_path / "full", **kw)
    a = {k: v.clone() for k, v in model.state_dict().items()}

    model, tok = fresh()
    sft(model, tok, prompts, completions, steps=3, output_dir=tmp_path / "half", save_every=3, **kw)
    model, tok = fresh()  # a new process would start from the initial weights
    res = sft(
        model,
        tok,
        prompts,
        completions,
        steps=6,
        output_dir=tmp_path / "half",
        resume=True,
        eval_every=3,
        **kw,
    )
    b = model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [h["step"] for h in res.history] == [4, 5, 6]
    rows = [json.loads(x) for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]  # steps 3 and 6
    assert (tmp_path / "half" / "checkpoints" / "step_0000006" / "optimizer.pt").is_file()
