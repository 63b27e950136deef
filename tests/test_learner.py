"""The learner's update on rollouts whose completions contain context tokens (tool output):
attention 1, loss mask 0. The gradient must be the hand-derived policy gradient over the
action tokens only, in both layouts, from log-probs of a plain full-logits forward."""

from __future__ import annotations

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.rollout.base import Rollouts
from grouprl.training.plan import make_train_batch
from grouprl.training.trainer import Trainer


def _rollouts(tok, G: int = 3) -> Rollouts:
    prompt = torch.tensor(tok("12+34=", add_special_tokens=False)["input_ids"])
    P = len(prompt)
    # rows of lengths 5, 4, 2 (right-padded to 5); row 0 has context at positions 1-2
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    att = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    loss = att.clone()
    loss[0, 1:3] = 0.0  # context inside the completion: seen, not trained on
    return Rollouts(
        prompt_ids_NP=prompt.repeat(G, 1),
        prompt_mask_NP=torch.ones(G, P),
        completion_ids_NT=ids,
        attention_mask_NT=att,
        loss_mask_NT=loss,
        truncated_N=torch.zeros(G, dtype=torch.bool),
        completions=["", "", ""],
        group_size=G,
    )


def _naive_logp(model, ro: Rollouts) -> torch.Tensor:
    """log π(token) from the model's own full logits on [prompt; completion] rows."""
    ids = torch.cat([ro.prompt_ids_NP, ro.completion_ids_NT], 1)
    mask = torch.cat([ro.prompt_mask_NP, ro.attention_mask_NT], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    P, T = ro.prompt_ids_NP.shape[1], ro.completion_ids_NT.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float(), -1)
    return logp.gather(-1, ro.completion_ids_NT[..., None]).squeeze(-1)


@pytest.mark.parametrize("shared_prefix", ["off", "on"])
def test_context_tokens_carry_no_gradient_of_their_own(tmp_path, tiny_model_dir, shared_prefix):
    cfg = base_config(
        tmp_path / "run", tiny_model_dir, max_steps=1, micro_batch_size=2, max_grad_norm=1e9
    )
    cfg["model"]["shared_prefix"] = shared_prefix
    tr = Trainer(cfg, train_dataset=arith_rows())
    assert tr.shared_prefix == (shared_prefix == "on")
    ro = _rollouts(tr.tokenizer)
    adv = torch.tensor([1.0, -0.5, -0.5])
    opt = torch.optim.SGD(tr.model.parameters(), lr=0.0)
    tr.learner.optimizer = opt
    tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr.learner.update(make_train_batch(ro, adv, max_new_tokens=5), step=0)
    got = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}

    # ppo_clip at ratio 1 with token_mean: L = -(1/Σm) Σ_n,t A_n m_nt logπ_nt (+ const)
    tr.model.zero_grad(set_to_none=True)
    m = ro.loss_mask_NT
    (-(adv[:, None] * m * _naive_logp(tr.model, ro)).sum() / m.sum()).backward()
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)

    # and the context tokens did matter as inputs: training on them too differs
    tr.model.zero_grad(set_to_none=True)
    a = ro.attention_mask_NT
    (-(adv[:, None] * a * _naive_logp(tr.model, ro)).sum() / a.sum()).backward()
    diff = max(float((got[n] - p.grad).abs().max()) for n, p in tr.model.named_parameters())
    assert diff > 1e-6


def test_prepass_rescores_tokens_at_another_temperature(tmp_path, tiny_model_dir):
    """DCPO's inputs: the same tokens scored at 1.2x the sampling temperature equal the
    model's own logits divided by 1.2 (log-softmax), and differ from the plain pass."""
    cfg = base_config(tmp_path / "t", tiny_model_dir)
    tr = Trainer(cfg, train_dataset=arith_rows())
    ro = _rollouts(tr.tokenizer)
    with torch.no_grad():
        hot = tr.learner.prepass(ro, False, temperature_scale=1.2)["old_logp_NT"]
        plain = tr.learner.prepass(ro, False)["old_logp_NT"]
        ids = torch.cat([ro.prompt_ids_NP, ro.completion_ids_NT], 1)
        mask = torch.cat([ro.prompt_mask_NP, ro.attention_mask_NT], 1)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = tr.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        P, T = ro.prompt_ids_NP.shape[1], ro.completion_ids_NT.shape[1]
        want = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float() / 1.2, -1)
        want = want.gather(-1, ro.completion_ids_NT[..., None]).squeeze(-1)
    real = ro.attention_mask_NT.bool()
    torch.testing.assert_close(hot[real], want[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hot[real], plain[real])
    tr.close()


def test_prepass_gives_the_head_curvature_capo_ranks(tmp_path, tiny_model_dir):
    """second="curvature": ‖h_t‖²·‖onehot − softmax‖² from the decoder's last hidden state
    and the model's own logits, per real completion token."""
    from grouprl.models.head import head_curvature

    tr = Trainer(base_config(tmp_path / "c", tiny_model_dir), train_dataset=arith_rows())
    ro = _rollouts(tr.tokenizer)
    with torch.no_grad():
        got = tr.learner.prepass(ro, True, second="curvature")["entropy_NT"]
        ids = torch.cat([ro.prompt_ids_NP, ro.completion_ids_NT], 1)
        mask = torch.cat([ro.prompt_mask_NP, ro.attention_mask_NT], 1)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        hid = tr.model.get_decoder()(
            input_ids=ids, attention_mask=mask.long(), position_ids=pos
        ).last_hidden_state
        logits = tr.model.get_output_embeddings()(hid)
        P, T = ro.prompt_ids_NP.shape[1], ro.completion_ids_NT.shape[1]
        h, lg = hid[:, P - 1 : P - 1 + T], logits[:, P - 1 : P - 1 + T]
        want = head_curvature(
            lg.reshape(-1, lg.shape[-1]),
            ro.completion_ids_NT.reshape(-1),
            h.reshape(-1, h.shape[-1]),
            1.0,
        ).view(ro.completion_ids_NT.shape)
    real = ro.attention_mask_NT.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    tr.close()
