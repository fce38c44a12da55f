"""Activation checkpointing: the same losses and gradients, fewer bytes kept for backward.

One process, no MPI (the 2-stage run under mpirun is in test_pipeline.py). Recomputing a block
replays the same operations on the same inputs with the RNG state of its first forward, so with
dropout on, the losses and every gradient are bit-identical to the run without checkpointing
(torch.equal, on CPU fp32); the saved-bytes ratios are measured on these sizes, with margin.
"""

from __future__ import annotations

import pytest
import torch

from hvdllm.config import ConfigError, JobConfig, ModelConfig, validate
from hvdllm.models import Stage, build_model, causal_lm_loss
from hvdllm.models.activations import SavedActivations, checkpointed_blocks

pytestmark = pytest.mark.unit

SEQ, BATCH, LAYERS = 64, 2, 4
FAMILIES = {"gpt2": 0.1, "llama": 0.0}
"""Family -> dropout (GPT-2's dropout is where the recomputation must replay the RNG)."""


def stage(family: str, blocks: range = range(LAYERS), checkpointed=frozenset()) -> Stage:
    cfg = ModelConfig(family=family, n_layer=LAYERS, n_embd=64, n_head=4, dropout=FAMILIES[family])
    model = build_model(cfg, vocab_size=300, seq_len=SEQ, seed=3).train()
    s = Stage(model, blocks, blocks.start == 0, blocks.stop == LAYERS)
    s.checkpointed = checkpointed
    return s


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 300, (BATCH, SEQ), generator=g),
            torch.randint(0, 300, (BATCH, SEQ), generator=g))


def loss_and_grads(s: Stage, seed: int = 7) -> tuple[torch.Tensor, dict, SavedActivations]:
    """One training forward/backward under a fixed dropout seed; the saved bytes counted."""
    x, y = batch()
    torch.manual_seed(seed)
    with SavedActivations(s.model.parameters()) as saved:
        loss = causal_lm_loss(s.forward(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in s.model.named_parameters()}, saved


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_which_blocks_by_global_index():
    assert checkpointed_blocks("none", 1, 6) == frozenset()
    assert checkpointed_blocks("blocks", 1, 6) == frozenset(range(6))
    assert checkpointed_blocks("blocks", 2, 6) == {0, 2, 4}
    assert checkpointed_blocks("blocks", 4, 6) == {0, 4}
    assert checkpointed_blocks("blocks", 9, 6) == {0}
    with pytest.raises(ValueError):
        checkpointed_blocks("blocks", 0, 6)


def test_config_keys_and_validation():
    job = JobConfig()
    assert (job.training.activation_checkpointing, job.training.checkpoint_every_blocks) == ("none", 1)
    job.training.checkpoint_every_blocks = 0
    with pytest.raises(ConfigError, match="checkpoint_every_blocks must be >= 1"):
        validate(job)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("every", [1, 2])
def test_same_loss_and_gradients_bit_for_bit(family, every):
    loss, grads, _ = loss_and_grads(stage(family))
    ck_loss, ck_grads, _ = loss_and_grads(stage(family, checkpointed=checkpointed_blocks(
        "blocks", every, LAYERS)))
    assert torch.equal(ck_loss, loss)
    assert_identical(ck_grads, grads)


def test_dropout_is_really_on():
    """Guard for the test above: another dropout seed gives another loss."""
    assert not torch.equal(loss_and_grads(stage("gpt2"), seed=7)[0],
                           loss_and_grads(stage("gpt2"), seed=8)[0])


@pytest.mark.parametrize("family,min_ratio", [("gpt2", 10.0), ("llama", 6.0)])
def test_saved_activation_bytes_cut(family, min_ratio):
    """Measured at these sizes: gpt2 5.77 MB -> 0.39 MB (14.9x), llama 3.16 MB -> 0.39 MB (8.2x);
    every 2nd block about halves them (1.87x, 1.78x). What stays: block inputs, head, loss."""
    full = loss_and_grads(stage(family))[2].bytes
    every = loss_and_grads(stage(family, checkpointed=checkpointed_blocks("blocks", 1, LAYERS)))[2]
    half = loss_and_grads(stage(family, checkpointed=checkpointed_blocks("blocks", 2, LAYERS)))[2]
    assert full / every.bytes > min_ratio
    assert 1.5 < full / half.bytes < 2.5
    assert every.tensors < 20  # each block's input, plus embedding, final norm, head and loss


def test_evaluation_never_checkpoints():
    x, _ = batch()
    plain, ck = stage("gpt2"), stage("gpt2", checkpointed=frozenset(range(LAYERS)))
    for s in (plain, ck):
        s.model.eval()
    with SavedActivations(plain.model.parameters()) as a:
        out = plain.forward(x)
    with SavedActivations(ck.model.parameters()) as b:
        ck_out = ck.forward(x)
    assert b.bytes == a.bytes > 0 and torch.equal(out, ck_out)
    with torch.no_grad(), SavedActivations() as c:
        assert torch.equal(ck.forward(x), out)
    assert c.bytes == 0


def pipeline_grads(checkpointed: frozenset) -> tuple[list[torch.Tensor], dict]:
    """Two stages in one process, two micro-batches forwarded before either backward (GPipe),
    activations passed as leaves the way ranks receive them; returns losses and gradients."""
    stages = [stage("gpt2", range(0, 2), checkpointed), stage("gpt2", range(2, 4), checkpointed)]
    torch.manual_seed(11)
    live = []
    for micro in range(2):
        x, y = batch(micro)
        h = stages[0].forward(x)
        received = h.detach().requires_grad_()
        live.append((h, received, causal_lm_loss(stages[1].forward(received), y)))
    for h, received, loss in live:
        (loss / 2).backward()
        h.backward(received.grad)
    grads = {f"{i}:{n}": p.grad for i, s in enumerate(stages) for n, p in s.model.named_parameters()}
    return [loss.detach() for _, _, loss in live], grads


def test_pipeline_micro_batches_recompute_their_own_masks():
    losses, grads = pipeline_grads(frozenset())
    ck_losses, ck_grads = pipeline_grads(frozenset(range(LAYERS)))
    assert all(torch.equal(a, b) for a, b in zip(losses, ck_losses))
    assert_identical(ck_grads, grads)
