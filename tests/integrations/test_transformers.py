"""patterndsl inside tiny Hugging Face models (random weights, built from configs, CPU, float32).

Each check compares a patterndsl model against the same weights under ``sdpa`` (or against a
dense recompute), on real tokens only: padded positions are not part of any contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from patterndsl import PatternError  # noqa: E402
from patterndsl.integrations.transformers import register, twins  # noqa: E402

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
        gemma = {"head_dim": 8, "sliding_window": 5, "query_pre_attn_scalar": 8, **common}
        return transformers.Gemma2Config(**gemma)
    raise AssertionError(kind)


def _pair(kind: str, name: str = "pdsl", **extra):
    """The same random model twice: under patterndsl and under sdpa (eager for Gemma 2's softcap)."""
    return twins(_config(kind, **extra), name, "eager" if kind == "gemma2" else "sdpa")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register("pdsl")


def _ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _padded_logits_agree(ours, theirs, ids, mask):
    """Both models' logits on a padded batch (positions count real tokens) agree on the real tokens."""
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        b = theirs(ids, attention_mask=mask, position_ids=position_ids).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], **TOL)
    return a, keep


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
    a, keep = _padded_logits_agree(ours, theirs, ids, mask)
    # each row equals the example run alone
    with torch.no_grad():
        for row in range(len(real)):
            alone = ids[row][keep[row]][None]
            torch.testing.assert_close(a[row][keep[row]], theirs(alone).logits[0], **TOL)


def _left_padded(batch=3, length=15, real=(15, 9, 4), seed=3):
    ids = _ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for b, n in enumerate(real):
        mask[b, : length - n] = 0
    return ids, mask


def test_gemma2_softcap_sliding_and_scaling():
    # query_pre_attn_scalar=3: a scaling (3 ** -0.5) other than head_dim ** -0.5
    ours, theirs = _pair("gemma2", attn_logit_softcapping=1.5, final_logit_softcapping=None, query_pre_attn_scalar=3)
    ids, mask = _left_padded()
    _padded_logits_agree(ours, theirs, ids, mask)
    patterns = [layer.self_attn._patterndsl_patterns.plain for layer in ours.model.layers]
    assert "window(4)" in str(patterns[0]) and "tanh" in str(patterns[0])
    assert "window" not in str(patterns[1]) and "tanh" in str(patterns[1])


PACKED = [[7, 5, 8], [11, 9]]  # two rows of packed documents (position_ids restart at 0), no mask


def _packed_ids():
    ids = _ids(len(PACKED), sum(PACKED[0]), seed=4)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED])
    return ids, position_ids


def _assert_packed(logits, theirs, ids):
    """Every packed document equals the document run alone."""
    with torch.no_grad():
        for row, lengths in enumerate(PACKED):
            start = 0
            for n in lengths:
                alone = theirs(ids[row : row + 1, start : start + n]).logits[0]
                torch.testing.assert_close(logits[row, start : start + n], alone, **TOL)
                start += n


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_position_ids(kind):
    ours, theirs = _pair(kind)
    ids, position_ids = _packed_ids()
    with torch.no_grad():
        _assert_packed(ours(ids, position_ids=position_ids).logits, theirs, ids)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_greedy_generation_equals_sdpa(kind):
    ours, theirs = _pair(kind)
    ids, mask = _left_padded(real=(15, 10, 6))
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ours.generate(ids, **kw)
        b = theirs.generate(ids, **kw)
    assert torch.equal(a, b)


def test_unpadded_decoding_takes_the_ragged_path(monkeypatch):
    """Decoding steps over an unpadded cache run with full kv_lengths and generate what sdpa generates."""
    import patterndsl.integrations.transformers as integration

    ours, theirs = _pair("mistral")
    calls = []
    real = integration.attention
    monkeypatch.setattr(integration, "attention", lambda *a, **kw: calls.append(kw.get("kv_lengths")) or real(*a, **kw))
    ids = _ids(2, 9, seed=6)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))
    decoding = [c for c in calls if c is not None]
    assert len(decoding) == 2 * 4 and all(c.tolist() == [c[0].item()] * 2 for c in decoding)


def test_static_cache_generation():
    ours, theirs = _pair("llama")
    ids, mask = _left_padded(real=(15, 10, 6))
    # prefill into a static cache: 32 key slots, queries not end-aligned to them
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, past_key_values=transformers.StaticCache(ours.config, 32)).logits
        b = theirs(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], **TOL)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ours.generate(ids, cache_implementation="static", **kw)
        b = theirs.generate(ids, **kw)
    assert torch.equal(a, b)


def test_refusals():
    ours, _ = _pair("llama", attention_dropout=0.1)
    ids = _ids(1, 6)
    ours.train()
    with pytest.raises(PatternError, match="dropout"):
        ours(ids)
    ours.eval()
    with pytest.raises(PatternError, match="output_attentions"):
        ours(ids, output_attentions=True)
    with pytest.raises(PatternError, match="4-D"):
        ours(ids, attention_mask=torch.ones(1, 1, 6, 6))


def test_register_installs_both_interfaces_and_per_layer_choices():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from patterndsl.integrations.transformers import layer_patterns

    register(
        "pdsl_by_type",
        {"sliding_attention": "pattern s { causal & window(1) }", "full_attention": "pattern f { full }"},
    )
    register("pdsl_by_call", lambda index, kind: "pattern second { causal & sink(2) }" if index == 1 else None)
    for name in ("pdsl_by_type", "pdsl_by_call"):
        assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
    config = _config("gemma2", attn_logit_softcapping=None)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    by_type = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="pdsl_by_type")
    assert [p.name for p in layer_patterns(by_type)] == ["s", "f"]
    by_call = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="pdsl_by_call")
    first, second = layer_patterns(by_call)
    assert "window(4)" in str(first)  # None: the config's own sliding layer (sliding_window = 5)
    assert second.name == "second"
    with pytest.raises(PatternError, match="no entry for layer 0"):
        register("pdsl_partial", {7: "pattern x { causal }"})
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="pdsl_partial")


def _saved(tmp_path):
    register("pdsl_layers", {0: "pattern a { causal & window(2) }", 1: "pattern b { causal }"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="pdsl_layers").eval()
    ids = _ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    return ids, before


def test_layer_mapping_and_save_load(tmp_path):
    ids, before = _saved(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "pdsl_layers"
    assert loaded.config.patterndsl["layers"][0].startswith("pattern a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before)


def test_training_steps_match_sdpa():
    ours, theirs = _pair("llama")
    ours.train()
    theirs.train()
    ids = _ids(2, 16, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for _ in range(3):
        losses = []
        for m, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad()
            labels = ids.masked_fill(mask == 0, -100)
            loss = m(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], **TOL)
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)
        for opt in opts:
            opt.step()


@pytest.mark.slow
def test_compile_fullgraph_prefill_and_training_step():
    ours, theirs = _pair("llama")
    ids, mask = _left_padded(batch=2, length=16, real=(16, 11))
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], **TOL)
    packed_ids, position_ids = _packed_ids()
    with torch.no_grad():
        _assert_packed(compiled(packed_ids, position_ids=position_ids).logits, theirs, packed_ids)
    ours.train()
    theirs.train()
    compiled = torch.compile(ours, fullgraph=True)
    loss = compiled(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    want = theirs(ids, attention_mask=mask, labels=labels).loss
    want.backward()
    torch.testing.assert_close(loss, want, **TOL)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3)


STREAM = "pattern streaming(s = 3, w = 6) { causal & (sink(s) | window(w)) }"


def _dense_greedy(model, ids, mask, steps):
    """Greedy decoding by recomputing the whole (left-padded) sequence at every step: no cache."""
    for _ in range(steps):
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
        mask = torch.cat((mask, torch.ones_like(nxt)), 1)
    return ids


@pytest.mark.parametrize("padded", [False, True])
def test_streaming_generation_equals_dense_recompute(padded):
    from patterndsl.integrations.transformers import PatternCache

    register("pdsl_stream", STREAM)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="pdsl_stream").eval()
    ids, mask = _left_padded(batch=2, length=12, real=(12, 7) if padded else (12, 12))
    cache = PatternCache(model, num_pages=64, page_size=2)
    steps = 14
    with torch.no_grad():
        got = model.generate(
            ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    assert torch.equal(got, _dense_greedy(model, ids, mask, steps))
    # memory follows the pattern: sinks + window + a page of slack per row, not the 26 positions
    per_row = -(-3 // 2) + -(-6 // 2) + 2
    assert max(cache.pages_in_use()) <= 2 * per_row


@pytest.mark.slow
def test_fresh_process_restores_the_implementation(tmp_path):
    ids, before = _saved(tmp_path)
    # a fresh process that only imports the integration restores it too
    torch.save({"ids": ids, "logits": before}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, transformers\n"
        "import patterndsl.integrations.transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert m.config._attn_implementation == 'pdsl_layers', m.config._attn_implementation\n"
        "e = torch.load(sys.argv[1] + '/expected.pt')\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(m(e['ids']).logits, e['logits'])\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_pattern_cache_under_torch_compile():
    """A compiled forward generates with a PatternCache (its cache steps run eagerly) exactly as the dense
    recompute and refuses output_attentions; fullgraph=True refuses the cache step with the reason
    patterndsl gives."""
    from patterndsl.integrations.hf_cache import EAGER_REASON
    from patterndsl.integrations.transformers import PatternCache

    register("pdsl_stream", STREAM)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="pdsl_stream").eval()
    ids, mask = _left_padded(batch=2, length=12, real=(12, 7))
    steps = 4  # prefill, the first decoding step, and steps after dynamo's recompile for dynamic lengths
    want = _dense_greedy(model, ids, mask, steps)
    eager_forward = model.forward
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    # dynamo's tracing and graph breaks are what is tested; the "eager" backend skips inductor's codegen
    model.forward = torch.compile(eager_forward, backend="eager")
    with torch.no_grad():
        got = model.generate(ids, past_key_values=PatternCache(model, num_pages=64, page_size=2), **kw)
    assert torch.equal(got, want)
    with torch.no_grad(), pytest.raises(PatternError, match="output_attentions"):
        model(ids, output_attentions=True)  # refused in a compiled forward too, never an empty tuple
    torch._dynamo.reset()
    model.forward = torch.compile(eager_forward, backend="eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="PatternCache keeps its pages") as caught:
        model.generate(ids, past_key_values=PatternCache(model, num_pages=64, page_size=2), **kw)
    assert EAGER_REASON in str(caught.value)
    torch._dynamo.reset()


def test_a_stray_five_dimensional_key_is_refused():
    from patterndsl.integrations.hf_cache import commit

    with pytest.raises(PatternError, match="without a PatternCache update"):
        commit(torch.zeros(1, 1, 1, 1, 1), None)


def test_a_derived_input_is_one_tensor_for_every_layer_of_a_forward():
    """Layers passing the same mask get the same doc tensor (so the call-time plan is built once), and a
    mask written in place or a new mask get a new one."""
    from patterndsl.integrations.transformers import _per_forward

    mask = torch.ones(2, 6, dtype=torch.bool)
    first = _per_forward(mask, lambda: mask.to(torch.int32))
    assert _per_forward(mask, lambda: mask.to(torch.int32)) is first
    mask[0, 0] = False
    again = _per_forward(mask, lambda: mask.to(torch.int32))
    assert again is not first and again[0, 0] == 0
    other = mask.clone()
    assert _per_forward(other, lambda: other.to(torch.int32)) is not again


def test_run_time_inputs_pass_through_the_model_forward():
    register(
        "pdsl_tag", "pattern tagged(w = 2) { input tag: int[batch, token]\n causal & (window(w) | where(tag[k] == 1)) }"
    )
    ours, theirs = _pair("llama", name="pdsl_tag")
    ids = _ids(2, 10, seed=7)
    with torch.no_grad():
        every_key = ours(ids, tag=torch.ones_like(ids)).logits  # every key tagged: plain causal
        torch.testing.assert_close(every_key, theirs(ids).logits, **TOL)
        assert not torch.allclose(ours(ids, tag=torch.zeros_like(ids)).logits, every_key, **TOL)
        with pytest.raises(PatternError, match="tag"):
            ours(ids)
