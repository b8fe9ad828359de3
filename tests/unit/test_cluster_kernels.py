"""The sorted-cluster Triton kernels (codegen/clusters.py): golden source, interpreter numerics, AOT builds.

The interpreter cases run in a child process started with ``TRITON_INTERPRET=1`` (Triton reads
it at import); they compare output, lse and gradients with the float64 reference over
``Pattern.mask`` (fp32 and fp16: bf16 ``tl.dot`` is wrong under the interpreter). The AOT cases
build the widest head size of the launch table for sm_80 and sm_90 and require zero spills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import patterndsl as pd
from patterndsl.analysis import clusterplan
from patterndsl.codegen import clusters as gen

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "cluster_kernels.py"
SOURCE = "pattern t(n = 8) { input C: float[n, dim]\n causal & (window(7) | cluster(C)) }"


def _spec(target="sm_90", dtype="float16", width=64, kind="forward", words=0):
    (part,) = clusterplan.split(pd.compile(SOURCE).ir, 4).parts
    bn = gen.launch(kind, width)[0]
    return gen.ClusterSpec(part.pred, None, 1024, 1024, 4, width, dtype, (gen.BLOCK_M, bn), target, words)


def _text(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not line.startswith("# key:")) + "\n"


def test_golden_source(request):
    text = _text(gen.render(_spec()))
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"missing {GOLDEN}; run pytest --update-golden"
    assert text == GOLDEN.read_text(), "generated cluster kernels changed; run pytest --update-golden if intended"
    assert gen.render(_spec()) == gen.render(_spec())  # deterministic
    assert _spec().key != _spec(dtype="float32").key
    assert _spec().key != _spec(words=1).key and "balanced (1 words)" in gen.render(_spec(words=1))


CHILD = r"""
import json, sys, torch
import patterndsl as pd
from patterndsl import kernel_cache
from tests.unit.test_clusters import ROUTING, _data, _inputs_for
from tests.clusters_reference import content_mask
from tests.reference import reference_attention

out = {}
for name, params, sizes, dt, tol in [
    ("routing", {}, dict(lq=40, lk=40, heads=2, kv_heads=1), torch.float32, 1e-4),
    ("hashed", {"seed": 3}, dict(lq=21, lk=37, heads=4, kv_heads=2), torch.float16, 2e-2),
    ("routing", {"w": 5}, dict(lq=19, lk=33, heads=2, kv_heads=2, dup=True), torch.float32, 1e-4),
    ("routing", {"w": 2, "n": 70}, dict(lq=17, lk=17, heads=2, kv_heads=1), torch.float16, 2e-2),
]:
    p = pd.compile(ROUTING, name, **params)
    q, k, g = _data(**sizes)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    inputs = _inputs_for(p, q, g)
    mask = content_mask(p.ir, q, k, **inputs)
    qq, kk, vv = (x.to(dt).requires_grad_() for x in (q, k, v))
    before = set(kernel_cache._modules)
    o, lse = p(qq, kk, vv, return_lse=True, backend="triton", **{n: c.to(dt) for n, c in inputs.items()})
    (o.float().square().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    used = any(key[0].startswith("c") for key in set(kernel_cache._modules) - before)
    q64, k64, v64 = (x.to(dt).double().requires_grad_() for x in (q, k, v))
    ro, rl = reference_attention(q64, k64, v64, mask)
    (ro.square().sum() + rl.masked_fill(torch.isinf(rl), 0).sum()).backward()
    err = max(float((o.detach().double() - ro.detach()).abs().max()),
              float((lse.detach().double() - rl.detach()).nan_to_num(0, 0, 0).abs().max()),
              *(float((a.grad.double() - b.grad).abs().max()) for a, b in ((qq, q64), (kk, k64), (vv, v64))))
    same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(rl)))
    out[name] = {"err": err, "tol": tol, "used": used, "same_inf": same_inf}
print("@@" + json.dumps(out))
"""


@pytest.mark.slow
def test_interpreter_matches_the_reference(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("@@")), None)
    assert line is not None, done.stderr[-3000:]
    for name, r in json.loads(line[2:]).items():
        assert r["used"], f"{name}: the sorted part did not run on the cluster kernels"
        assert r["same_inf"] and r["err"] < r["tol"], f"{name}: {r}"


_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def _signature(fn, dtype, balanced=False):
    sig = {}
    for name in fn.arg_names:
        if balanced and name in ("O", "DQ"):  # per-entry results, merged by the launcher in float32
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ"):
            sig[name] = _PTR[dtype]
        elif name in ("QBITS", "KBITS"):
            sig[name] = "*i64"
        elif name in ("LSE", "DELTA", "DK", "DV"):
            sig[name] = "*fp32"
        elif name == "AUX":
            sig[name] = "*i8"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in ("n_tiles", "EQ", "EK", "HP", "H_LO"):
            sig[name] = "i32"
        else:
            sig[name] = "*i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    return sig, attrs


@pytest.mark.slow
@pytest.mark.parametrize("words", [0, 2])
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cluster_kernels_build_without_spills(target, dtype, words):
    from patterndsl import kernel_cache
    from patterndsl.codegen import inspect as ins

    for kind, name in (("forward", "_cluster_fwd"), ("backward", "_cluster_bwd")):
        spec = _spec(target, dtype, gen.MAX_WIDTH, kind, words)
        fn = getattr(kernel_cache.load(spec, gen.render, interpret=False), name)
        _, warps, stages = gen.launch(kind, gen.MAX_WIDTH)
        sig, attrs = _signature(fn, dtype, words > 0)
        built = ins.compile_aot(fn, sig, target, warps, stages, attrs)
        r = ins.sass_resources(built.asm["cubin"], built.asm["ptx"], target)
        assert r["spills"] == 0, f"{name} on {target} {dtype} spills {r['spills']} bytes: {r}"
        assert r["mma"] > 0, f"{name} on {target} {dtype} does not use tensor cores: {r}"


COMPOSED = r"""
import json, torch
import patterndsl as pd
from tests.reference import reference_attention

out = {}
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(2, h, 24, 16, generator=g) for h in (2, 1, 1))
c = torch.randn(3, 16, generator=g)
doc = torch.tensor([[0] * 9 + [1] * 15, [0] * 24])
# The last: route(1) shared by head rules a label splits (all five heads vote on the one key-value head).
shared = (
    "heads 0..1: causal & route(1, block = 8)\n"
    "heads 1..2: causal & (window(2) | route(1, block = 8) & cluster(C))\n"
    "heads 2..3: causal & (route(1, block = 8) | route(2, block = 8))\n"
    "heads 3..4: (causal & route(2, block = 8) & ~lsh(1)) | sink(1)\n"
    "causal & (window(1) | lsh(1))"
)
q5 = torch.randn(2, 5, 24, 16, generator=g)
for body, score in [
    ("cluster(C) | lsh(2)", None),
    ("causal - cluster(C)", None),
    ("within(doc, causal & (window(2) | cluster(C)))", None),
    ("causal & (window(2) | route(1, block = 8) | lsh(2))", None),
    ("causal & (window(2) | cluster(C))\nscore 3.0 * tanh(s / 3.0)", lambda s, *rest: 3.0 * torch.tanh(s / 3.0)),
    (shared, None),
]:
    if body == shared:
        q = q5
    decl = "input C: float[3, dim]\n" if "C" in body else ""
    decl += "input doc: int[batch, token]\n" if "doc" in body else ""
    p = pd.compile("pattern t {\n" + decl + body + "\n}")
    given = {n: t for n, t in (("C", c), ("doc", doc)) if any(d.name == n for d in p.ir.inputs)}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = p(*leaves, return_lse=True, backend="triton", **given)
    (o.square().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    mask = p.mask(24, 24, q.shape[1], q=q.double(), k=k.double(), **given)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = reference_attention(*ref, mask, score=score)
    (ro.square().sum() + rl.masked_fill(torch.isinf(rl), 0).sum()).backward()
    err = max(float((o.detach().double() - ro.detach()).abs().max()),
              *(float((a.grad.double() - b.grad).abs().max()) for a, b in zip(leaves, ref)))
    out[body] = {"err": err, "same_inf": bool(torch.equal(torch.isinf(lse), torch.isinf(rl)))}
print("@@" + json.dumps(out))
"""


@pytest.mark.slow
def test_compositions_on_the_triton_backend_match_the_reference(tmp_path):
    # Static parts on the generated kernels, call-time parts on the tensors' device (issue 18 compositions).
    env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", COMPOSED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("@@")), None)
    assert line is not None, done.stderr[-3000:]
    for body, r in json.loads(line[2:]).items():
        assert r["same_inf"] and r["err"] < 1e-4, f"{body}: {r}"
