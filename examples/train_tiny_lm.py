"""Train a tiny character-level causal LM with a StreamingLLM pattern through Hugging Face transformers.

What it shows: ``register("pdsl_stream", pattern)`` makes ``attn_implementation="pdsl_stream"``
run patterndsl inside a stock ``LlamaForCausalLM``; the same model (same initial weights, same
batches) is trained with ``sdpa`` (full causal attention) for comparison; then both generate,
the patterndsl model through a ``PatternCache`` that keeps only the sinks and the window.
Prints the training loss of each every few steps, their training and generation tokens/s, and
a sample. The text is this repository's own documentation, read as characters.

Runs on CPU in a few minutes on two cores:

    python examples/train_tiny_lm.py            # 200 steps
    python examples/train_tiny_lm.py --steps 50 # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from patterndsl.integrations.transformers import PatternCache, register, twins

PATTERN = "pattern streaming(sinks = 4, w = 32) { causal & (sink(sinks) | window(w)) }"
ROOT = Path(__file__).resolve().parent.parent


def corpus() -> str:
    files = [ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"]
    return "\n".join(p.read_text(encoding="utf-8") for p in files if p.exists())


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--generate", type=int, default=120, help="characters to generate")
    args = ap.parse_args(argv)

    text = corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    print(f"corpus: {len(text):,} characters, vocabulary {len(chars)}; pattern: {PATTERN}")

    register("pdsl_stream", PATTERN)
    config = transformers.LlamaConfig(
        vocab_size=len(chars),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    ours, theirs = twins(config, "pdsl_stream")
    models = {"patterndsl": ours, "sdpa": theirs}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=3e-3) for name, m in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    stream = batches(data, args.batch, args.length, torch.Generator().manual_seed(1))

    print(f"{'step':>5} {'loss patterndsl':>16} {'loss sdpa':>10}")
    for step in range(1, args.steps + 1):
        ids = next(stream)
        losses = {}
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = model(ids, labels=ids).loss
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            seconds[name] += time.perf_counter() - start
            losses[name] = loss.item()
        if step == 1 or step % 25 == 0 or step == args.steps:
            print(f"{step:>5} {losses['patterndsl']:>16.3f} {losses['sdpa']:>10.3f}")
    tokens = args.steps * args.batch * args.length
    for name in models:
        print(f"training {name:<10}: {tokens / seconds[name]:>9,.0f} tokens/s")

    prompt = torch.tensor([[index[c] for c in "The pattern "]])
    for name, model in models.items():
        model.eval()
        extra = {"past_key_values": PatternCache(model, num_pages=64, page_size=8)} if name == "patterndsl" else {}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=args.generate, do_sample=False, **extra)
        elapsed = time.perf_counter() - start
        sample = "".join(chars[i] for i in out[0].tolist())
        print(f"generation {name:<10}: {args.generate / elapsed:>7,.0f} tokens/s")
        print(f"  {sample!r}")
        if extra:
            print(f"  pages held per layer at the end: {extra['past_key_values'].pages_in_use()} (page size 8)")


if __name__ == "__main__":
    main()
