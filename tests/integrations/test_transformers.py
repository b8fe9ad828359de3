"""patterndsl inside tiny Hugging Face models (random weights, built from configs, CPU, float32).

Each check compares a patterndsl model against the same weights under ``sdpa`` (or against a
dense recompute), on real tokens only: padded positions are not part of any contract.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from patterndsl.integrations.transformers import register  # noqa: E402

TOL = {"atol": 2e-4, "rtol": 2e-4}
VOCAB = 97


def _config(kind: str, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    common.update(extra)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    if kind == "gemma2":
        return transformers.Gemma2Config(
            head_dim=8, sliding_window=common.pop("sliding_window", 5), query_pre_attn_scalar=8, **common
        )
    raise AssertionError(kind)


def _pair(kind: str, name: str = "pdsl", **extra):
    """The same random model twice: under patterndsl and under sdpa."""
    torch.manual_seed(0)
    config = _config(kind, **extra)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name).eval()
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register("pdsl")


def _ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_prefill_equals_sdpa(kind):
    ours, theirs = _pair(kind)
    ids = _ids(2, 19)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_sdpa(kind, side):
    ours, theirs = _pair(kind)
    ids = _ids(3, 17)
    mask = torch.ones_like(ids)
    real = [17, 11, 6]
    for b, n in enumerate(real):
        if side == "left":
            mask[b, : 17 - n] = 0
        else:
            mask[b, n:] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        b = theirs(ids, attention_mask=mask, position_ids=position_ids).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], **TOL)
    # each row equals the example run alone
    with torch.no_grad():
        for row in range(len(real)):
            alone = ids[row][keep[row]][None]
            torch.testing.assert_close(a[row][keep[row]], theirs(alone).logits[0], **TOL)
