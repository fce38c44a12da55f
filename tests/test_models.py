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


# -- stage-only construction: the meta device, then only the stage's weights, keyed by name ----

from hvdllm.models import empty_model, fill_weights, model_config  # noqa: E402
from hvdllm.models.init import name_seed  # noqa: E402


def stage_only(family: str, layers: range, first: bool, last: bool, **sizes) -> Stage:
    cfg = ModelConfig(family=family, n_layer=4, n_embd=32, n_head=4, **sizes)
    stage = Stage(empty_model(model_config(cfg, 300, SEQ)), layers, first, last)
    fill_weights(stage.model, cfg, seed=3)
    return stage


@pytest.mark.parametrize("family,sizes", [("gpt2", {}), ("llama", {}), ("qwen2", {"tie_embeddings": True})])
def test_stage_only_construction_gives_the_full_models_weights(family, sizes):
    full = model(family, **sizes).state_dict()
    cuts = [(range(0, 1), True, False), (range(1, 3), False, False), (range(3, 4), False, True)]
    for layers, first, last in cuts:
        stage = stage_only(family, layers, first, last, **sizes)
        assert not any(p.is_meta for p in stage.model.parameters())
        for name, tensor in stage.model.state_dict().items():
            assert torch.equal(tensor, full[name]), name
    tied = spec_for(family).tied_names(model(family, **sizes).config)
    if tied:  # the last stage's head starts as the first stage's embedding
        assert torch.equal(stage_only(family, range(3, 4), False, True, **sizes)
                           .model.get_parameter(tied[1]), full[tied[0]])


def test_init_follows_each_familys_rules():
    g = model("gpt2", n_layer=8).state_dict()
    assert torch.equal(g["transformer.h.0.ln_1.weight"], torch.ones(32))
    assert torch.equal(g["transformer.h.0.attn.c_attn.bias"], torch.zeros(96))
    assert g["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    # GPT-2's residual projections: 0.02 / sqrt(2 x 8 layers) = 0.005
    assert g["transformer.h.5.mlp.c_proj.weight"].std().item() == pytest.approx(0.005, rel=0.05)
    q = model("qwen2").state_dict()
    assert torch.equal(q["model.norm.weight"], torch.ones(32))
    assert torch.equal(q["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    assert q["model.layers.1.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_init_seeds_are_stable_across_processes_and_names():
    # SHA-256 of "seed:name", not Python's salted hash(): the same on every rank and machine.
    assert name_seed(1234, "transformer.wte.weight") == 6610582443501905251
    assert name_seed(1234, "transformer.wte.weight") != name_seed(1235, "transformer.wte.weight")


def test_pretrained_folder_loads_only_the_stages_tensors(tmp_path):
    for family, sizes in [("gpt2", {}), ("llama", {"tie_embeddings": False})]:
        saved = model(family, **sizes)
        saved.save_pretrained(tmp_path / family)
        cfg = ModelConfig(family=family, pretrained=str(tmp_path / family))
        for layers, first, last in [(range(0, 2), True, False), (range(2, 4), False, True)]:
            stage = Stage(empty_model(model_config(cfg, 300, SEQ)), layers, first, last)
            fill_weights(stage.model, cfg, seed=99)  # the seed plays no part with weights given
            want = saved.state_dict()
            for name, tensor in stage.model.state_dict().items():
                key = name if name in want else "transformer.wte.weight"
                assert torch.equal(tensor, want[key]), name


def test_building_a_stage_takes_the_stages_memory_not_the_models():
    """Peak RSS growth while building (llama 8 x 512, 136 MB of fp32 weights): the whole model
    against the middle and last stage of 4. A full build followed by a cut would show the
    whole model's 136 MB on every stage. Measured here: 174 MB whole, 45 MB stage 1 (26 MB
    of weights), 65 MB stage 3 (30 MB; the head's init draws a 17 MB temporary)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "build_memory.py"

    def build(stages: int, stage: int) -> dict:
        out = subprocess.run([sys.executable, script, "llama", "8", "512", str(stages), str(stage)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    whole, middle, last = build(1, 0), build(4, 1), build(4, 3)
    assert whole["peak_growth"] >= whole["param_bytes"]
    for stage in (middle, last):
        assert stage["peak_growth"] < 0.45 * whole["peak_growth"], (stage, whole)
        assert stage["peak_growth"] < 2 * stage["param_bytes"] + 16 * 2**20, stage
