"""Generate with a StreamingLLM pattern through a PagedKVCache: memory held stays flat as tokens grow.

A tiny decoder (random weights, 2 layers, 4 query heads over 2 key/value heads) generates greedily,
one token per step. Each layer keeps its keys and values in a ``patterndsl.PagedKVCache`` built
for ``causal & (window(span) | sink(sinks))``: after every append the cache frees the pages no
later query can attend (everything between the sinks and the window), so the pages held stay
constant however long the generation runs, while positions never shift.

Run: ``python examples/generate.py [--tokens N]`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse

import torch

import patterndsl as pd

STREAMING = "pattern streaming(span = 64, sinks = 4) { causal & (window(span) | sink(sinks)) }"


class TinyDecoder(torch.nn.Module):
    """Embedding, ``layers`` pre-norm attention + MLP blocks with rotary-free positions, and a head."""

    def __init__(self, vocab=97, dim=64, heads=4, kv_heads=2, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.ModuleDict(
                {
                    "norm1": torch.nn.LayerNorm(dim),
                    "q": torch.nn.Linear(dim, heads * self.head_dim),
                    "kv": torch.nn.Linear(dim, 2 * kv_heads * self.head_dim),
                    "o": torch.nn.Linear(heads * self.head_dim, dim),
                    "norm2": torch.nn.LayerNorm(dim),
                    "mlp": torch.nn.Sequential(
                        torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
                    ),
                }
            )
            self.blocks.append(block)
        self.out = torch.nn.Linear(dim, vocab)

    def step(self, tokens: torch.Tensor, pattern: pd.Pattern, caches: list[pd.PagedKVCache]) -> torch.Tensor:
        """Logits ``[batch, n, vocab]`` of ``tokens [batch, n]``, appending their keys/values to ``caches``."""
        x = self.embed(tokens)
        b, n, _ = x.shape
        for block, cache in zip(self.blocks, caches, strict=True):
            h = block["norm1"](x)
            q = block["q"](h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
            k, v = block["kv"](h).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            cache.append(k, v)
            kc, vc, table, lengths = cache.view()
            a = pattern(q, kc, vc, kv_lengths=lengths, block_table=table)
            x = x + block["o"](a.transpose(1, 2).reshape(b, n, -1))
            x = x + block["mlp"](block["norm2"](x))
        return self.out(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=600, help="tokens to generate")
    parser.add_argument("--span", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (a tiny model runs best on one)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _generate(args)
    finally:
        torch.set_num_threads(threads)


def _generate(args) -> None:
    pattern = pd.compile(STREAMING, span=args.span)
    model = TinyDecoder()
    pages = 2 + (args.span + 4) // args.page_size + 2  # sinks' page, the window, the page being filled
    caches = [
        pd.PagedKVCache(pattern, pages, args.page_size, model.kv_heads, model.head_dim, heads=model.heads)
        for _ in model.blocks
    ]
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    page_bytes = 2 * model.kv_heads * args.page_size * model.head_dim * 4  # k and v, float32
    print(f"pattern: {' '.join(str(pattern).split())}")
    print(f"cache: {pages} pages of {args.page_size} positions per layer, {len(caches)} layers")
    print(f"{'tokens':>8} {'pages held':>11} {'bytes held':>11} {'bytes a full cache would hold':>30}")
    with torch.no_grad():
        logits = model.step(prompt, pattern, caches)
        token = logits[:, -1:].argmax(-1)
        generated = []
        for t in range(1, args.tokens + 1):
            generated.append(int(token))
            logits = model.step(token, pattern, caches)
            token = logits[:, -1:].argmax(-1)
            if t % (args.tokens // 10 or 1) == 0:
                held = sum(c.pages_in_use() for c in caches)
                length = caches[0].lengths()[0]
                full = len(caches) * 2 * model.kv_heads * length * model.head_dim * 4
                print(f"{t:>8} {held:>11} {held * page_bytes:>11} {full:>30}")
    print("first tokens:", generated[:16])


if __name__ == "__main__":
    main()
