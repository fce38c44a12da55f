"""Model families behind one spec: stages compose to the full model, ties, sliding windows, FLOPs.

Runs in one process (no MPI); the multi-rank parity of every family is in test_pipeline.py.
Stage forwards are the same operations as Hugging Face's own forward in the same order, so the
comparisons here are exact (torch.equal), not approximate.
"""

from __future__ import annotations

import pytest
import torch

from hvdllm.config import ModelConfig
from hvdllm.errors import UserError
from hvdllm.models import Stage, build_model, causal_lm_loss, flops_per_token, spec_for

FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]
SEQ = 16


def model(family: str, n_layer: int = 4, **sizes):
    cfg = ModelConfig(family=family, n_layer=n_layer, n_embd=32, n_head=4, **sizes)
    return build_model(cfg, vocab_size=300, seq_len=SEQ, seed=3).eval()


def chained(family: str, cuts: list[range], x: torch.Tensor, **sizes) -> tuple[torch.Tensor, list]:
    """Run x through stages cut at `cuts`, each built from its own fresh model (as ranks do)."""
    parts = [Stage(model(family, **sizes), r, i == 0, i == len(cuts) - 1)
             for i, r in enumerate(cuts)]
    h = x
    for stage in parts:
        h = stage.forward(h)
    return h, parts


CASES = [(f, {}) for f in FAMILIES] + [
    ("qwen2", {"tie_embeddings": True}),
    ("llama", {"tie_embeddings": True, "n_kv_head": 2}),
    ("mistral", {"sliding_window": 4}),     # a window shorter than the sequence
    ("qwen2", {"sliding_window": 4, "tie_embeddings": True}),
]


@pytest.mark.parametrize("family,sizes", CASES, ids=[f"{f}-{'-'.join(s) or 'plain'}" for f, s in CASES])
@torch.no_grad()
def test_stages_compose_to_the_full_model(family, sizes):
    x = torch.randint(0, 300, (2, SEQ))
    expected = model(family, **sizes)(input_ids=x).logits
    one, _ = chained(family, [range(0, 4)], x, **sizes)
    assert torch.equal(one, expected)
    three, parts = chained(family, [range(0, 1), range(1, 3), range(3, 4)], x, **sizes)
    assert torch.equal(three, expected)
    names = [set(dict(p.model.named_parameters())) for p in parts]
    assert not names[0] & names[1] and not names[1] & names[2]  # each stage keeps only its part
    tied = spec_for(family).tied_names(parts[0].model.config)
    assert (tied is not None) == (family == "gpt2" or bool(sizes.get("tie_embeddings")))
    if tied:  # the end stages each hold one copy of the shared weight, the middle none
        assert parts[0].tied_weight is parts[0].model.get_parameter(tied[0])
        assert parts[2].tied_weight is parts[2].model.get_parameter(tied[1])
        assert parts[1].tied_weight is None
    else:
        assert all(p.tied_weight is None for p in parts)


@torch.no_grad()
def test_sliding_window_really_restricts_attention():
    """A window shorter than the sequence changes late positions and leaves the first W alone."""
    x = torch.randint(0, 300, (1, SEQ))
    for family in ("mistral", "qwen2"):
        full = model(family)(input_ids=x).logits
        windowed = model(family, sliding_window=4)(input_ids=x).logits
        assert torch.equal(windowed[:, :4], full[:, :4])  # no earlier token is outside the window
        assert not torch.allclose(windowed[:, 8:], full[:, 8:])


def test_tied_qwen2_head_is_the_embedding():
    m = model("qwen2", tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert model("qwen2").lm_head.weight is not model("qwen2").model.embed_tokens.weight


def test_flops_per_token_counts_matmuls_only():
    def matmul_params(m, lookups):
        return sum(p.numel() for p in m.parameters()) - sum(t.numel() for t in lookups)

    attention = 12 * 4 * 32 * SEQ
    g = model("gpt2")  # tied: the embedding does the head's matmul; positions are a lookup
    assert flops_per_token(g, SEQ) == 6 * matmul_params(g, [g.transformer.wpe.weight]) + attention
    llama = model("llama")
    assert flops_per_token(llama, SEQ) == 6 * matmul_params(llama, [llama.model.embed_tokens.weight]) + attention
    tied = model("qwen2", tie_embeddings=True)
    assert flops_per_token(tied, SEQ) == 6 * matmul_params(tied, []) + attention


def test_loss_is_fp32_cross_entropy():
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 3))
    loss = causal_lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    want = torch.nn.functional.cross_entropy(logits.float().reshape(6, 7), targets.reshape(6))
    assert torch.equal(loss, want)


def test_unknown_family_is_one_line():
    with pytest.raises(UserError, match="model type 'bert' is not supported; hvdllm trains gpt2"):
        spec_for("bert")
