"""Checkpoint files: atomic rename, pruning, and loading back into a model."""

from __future__ import annotations

import torch

from grouprl.config import ModelConfig
from grouprl.models.loading import load_model_and_tokenizer
from grouprl.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    save_checkpoint,
)


def test_half_written_checkpoint_is_ignored_and_old_ones_pruned(tmp_path, tiny):
    model, tok = tiny
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            step,
            model=model,
            tokenizer=tok,
            optimizer=None,
            scheduler=None,
            trainer_state={"data_cursor": {}},
            keep=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    # a kill during the write of step 4 leaves only a .tmp directory behind
    (tmp_path / "checkpoints" / "step_0000004.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000003"


def test_weights_round_trip_with_tied_embeddings(tmp_path, tiny):
    model, tok = tiny
    path = save_checkpoint(
        tmp_path, 1, model=model, tokenizer=tok, optimizer=None, scheduler=None, trainer_state={}
    )
    fresh, _tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(path), device="cpu"))
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_weights(fresh, path)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert (
        fresh.get_output_embeddings().weight.data_ptr()
        == fresh.get_input_embeddings().weight.data_ptr()
    )
