"""Stage 5 of the pipeline (codegen), inspection: generated kernels compiled ahead of time on the CPU.

Comes in: a :class:`~patterndsl.codegen.KernelSpec` (or a pattern and sizes)
and a target ``sm_80`` / ``sm_90``. Goes out: Triton's artifacts per kernel
(``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``) from ``triton.compile``
with a ``GPUTarget`` (no GPU needed), SASS resource usage read with the
triton wheel's own ``cuobjdump`` (registers, stack and local memory, shared
memory, MMA instruction counts incl. ``HGMMA``, the SASS of ``wgmma``), and
text renderers for ``patterndsl show --stage triton|ptx|sass``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from patterndsl.errors import BackendError

DEFAULT_TARGET = "sm_90"
_PTR_DTYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
# Pointer arguments by name: the input dtype, float32 buffers, int32 lists, int8 tables.
_INPUT_PTRS = {"Q", "K", "V", "O", "DO", "DQ"}
_F32_PTRS = {"LSE", "DELTA", "DK", "DV", "OP", "LP"}
# Integer scalars by name (the ragged kernels' padded query count).
_INTS = {"lq"}


@dataclass
class AotKernel:
    """One kernel compiled ahead of time.

    Attributes:
        name: the kernel function name (``partI.NAME`` for the kernels of a plan's part I).
        target: ``"sm_80"``, ``"sm_90"``, ...
        asm: Triton's artifacts: ``ttir``, ``ttgir``, ``llir``, ``ptx`` (text) and ``cubin`` (bytes).
        shared: static shared memory in bytes from Triton's metadata.
        num_warps, num_stages: the launch configuration compiled for.
        resources: :func:`sass_resources` of the cubin.
    """

    name: str
    target: str
    asm: dict
    shared: int
    num_warps: int
    num_stages: int
    resources: dict = field(default_factory=dict)


def _capability(target: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", target)
    if not match:
        raise BackendError(f"target must look like sm_80 or sm_90, got {target!r}")
    return int(match.group(1))


def tool(name: str) -> Path:
    """Path of a CUDA tool shipped in the triton wheel (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise BackendError(f"the triton wheel has no {name} at {path}")
    return path


def signature(fn, dtype: str) -> tuple[dict, dict]:
    """Triton signature and alignment attributes of a generated kernel from its argument names.

    Args:
        fn: the ``@triton.jit`` kernel.
        dtype: the spec's dtype name.

    Returns:
        ``(signature, attrs)``: ``{arg: "*fp16" | "*fp32" | "*i32" | "*i8" | "fp32" | "i32"}`` and
        16-byte divisibility hints for pointers and strides (what PyTorch's allocator gives).
    """
    sig = {}
    for name in fn.arg_names:
        if name in _INPUT_PTRS:
            sig[name] = _PTR_DTYPES[dtype]
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name == "AUX":
            sig[name] = "*i8"
        elif name == "scale":
            sig[name] = "fp32"
        elif name.startswith("stride_") or name in _INTS:
            sig[name] = "i32"
        else:
            sig[name] = "*i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name].startswith("*") or name.startswith("stride_")
    }
    return sig, attrs


def compile_aot(fn, sig: dict, target: str = DEFAULT_TARGET, num_warps: int = 4, num_stages: int = 3, attrs=None):
    """``triton.compile`` one kernel for a CUDA target from this CPU machine.

    Args:
        fn: a compiled-mode ``@triton.jit`` function (not an interpreter function).
        sig: its signature (see :func:`signature`).
        target: ``"sm_80"``, ``"sm_90"``, ...
        num_warps, num_stages: launch configuration.
        attrs: optional argument attributes (alignment hints).

    Returns:
        Triton's ``CompiledKernel`` (``.asm`` holds ttir/ttgir/llir/ptx/cubin).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap = _capability(target)
    if not isinstance(fn, triton.runtime.JITFunction) or not isinstance(
        triton.language.zeros, triton.runtime.JITFunction
    ):
        raise BackendError("ahead-of-time compilation needs a process that imported Triton without TRITON_INTERPRET=1")
    options = {"num_warps": num_warps, "num_stages": num_stages}
    try:
        return triton.compile(ASTSource(fn, sig, {}, attrs or {}), target=GPUTarget("cuda", cap, 32), options=options)
    except Exception as exc:  # Triton raises many kinds; the user sees one clear error
        raise BackendError(f"Triton could not compile {fn.__name__} for {target}: {exc}") from exc


def compile_spec(spec, target: str | None = None) -> list[AotKernel]:
    """Compile every kernel of a spec's source for a CUDA target.

    Args:
        spec: a :class:`~patterndsl.codegen.KernelSpec` (its own target is used when ``target`` is None
            and it names a CUDA architecture, else ``sm_90``).
        target: override.

    Returns:
        One :class:`AotKernel` per kernel, in launch order, with :func:`sass_resources` filled in.
    """
    from patterndsl.codegen import generator

    return _compile_all(spec, generator.render, generator.kernel_names(spec), target)


def compile_ragged(spec, target: str | None = None) -> list[AotKernel]:
    """Compile every kernel of a ragged spec (:mod:`patterndsl.codegen.ragged`) for a CUDA target.

    Args:
        spec: a :class:`~patterndsl.codegen.ragged.RaggedSpec`.
        target: as :func:`compile_spec`.

    Returns:
        One :class:`AotKernel` per kernel, with :func:`sass_resources` filled in.
    """
    from patterndsl.codegen import ragged

    return _compile_all(spec, ragged.render, ragged.kernel_names(spec), target)


def _compile_all(spec, render, names: list[str], target: str | None) -> list[AotKernel]:
    from patterndsl import kernel_cache

    target = target or (spec.target if spec.target.startswith("sm_") else DEFAULT_TARGET)
    module = kernel_cache.load(spec, render, interpret=False)
    kernels = []
    for name in names:
        fn = getattr(module, name)
        sig, attrs = signature(fn, spec.dtype)
        compiled = compile_aot(fn, sig, target, spec.num_warps, spec.num_stages, attrs)
        kernel = AotKernel(name, target, dict(compiled.asm), compiled.metadata.shared, spec.num_warps, spec.num_stages)
        kernel.resources = sass_resources(kernel.asm["cubin"], kernel.asm["ptx"], target)
        kernels.append(kernel)
    return kernels


def aot_kernels(
    pattern, q_len: int, kv_len: int | None = None, heads: int = 1, target: str = DEFAULT_TARGET, **options
):
    """Plan, generate and compile a pattern's kernels for ``target`` (what ``show --stage ptx|sass`` prints).

    Args:
        pattern: a :class:`patterndsl.Pattern`.
        q_len, kv_len, heads: sizes.
        target: ``"sm_80"`` or ``"sm_90"`` (default).
        **options: as :func:`patterndsl.codegen.kernel_source` (``head_dim``, ``dtype``, ``block``, ``kind``, ...).

    Returns:
        The list of :class:`AotKernel`; for a plan that runs as parts, every part's kernels in turn, named
        ``partI.NAME`` from 1 (:func:`patterndsl.codegen.specs_for`).
    """
    from patterndsl.codegen import specs_for

    options.setdefault("target", target)
    specs = specs_for(pattern, q_len, kv_len, heads, **options)
    kernels = []
    for index, spec in enumerate(specs, 1):
        for kernel in compile_spec(spec, target):
            if len(specs) > 1:
                kernel.name = f"part{index}.{kernel.name}"
            kernels.append(kernel)
    return kernels


def _run(args: list) -> str:
    try:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"{Path(str(args[0])).name} failed: {exc}") from exc
    return done.stdout


def sass(cubin: bytes) -> str:
    """The SASS text of a cubin (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return _run([tool("cuobjdump"), "-sass", path])


def _ptxas(cap: int) -> Path:
    # The ptxas Triton itself assembles with: the wheel ships an older one for sm < 90.
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(cap).path)
    except (ImportError, AttributeError, RuntimeError):
        return tool("ptxas" if cap < 90 else "ptxas-blackwell")


def ptxas_report(ptx: str, target: str) -> dict:
    """Registers, stack frame and spill bytes per thread as ``ptxas -v`` reports them for ``ptx``.

    Args:
        ptx: PTX text (from ``AotKernel.asm["ptx"]``).
        target: ``"sm_80"``, ``"sm_90"``, ... (sm_90 and later assemble for the ``a`` variant wgmma needs).

    Returns:
        ``{"registers", "stack", "spill_stores", "spill_loads"}``.
    """
    cap = _capability(target)
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        try:
            done = subprocess.run(
                [str(_ptxas(cap)), f"-arch={arch}", "-v", str(src), "-o", str(out)],
                capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"ptxas failed: {exc}") from exc
    log = done.stdout + done.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def sass_resources(cubin: bytes, ptx: str | None = None, target: str | None = None) -> dict:
    """Resource usage of a kernel from its cubin (``cuobjdump``) and, given the PTX, ``ptxas -v``.

    Args:
        cubin: the binary from ``AotKernel.asm["cubin"]``.
        ptx: the kernel's PTX; with ``target``, spills are taken from ``ptxas -v``.
        target: the architecture the cubin was built for.

    Returns:
        ``{"registers", "stack", "local", "spills", "shared", "mma", "wgmma", "instructions"}``:
        registers per thread, stack and local bytes per thread, ``spills`` (bytes of spill stores
        from ``ptxas -v`` when the PTX is given, else the local bytes), static shared bytes, the
        count of MMA instructions (``HMMA``, ``HGMMA``, ``IMMA``, ...), of those the Hopper
        warpgroup ones (``HGMMA``, what ``wgmma`` compiles to), and the SASS instruction count.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = _run([tool("cuobjdump"), "-res-usage", path])
        text = _run([tool("cuobjdump"), "-sass", path])
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", text)
    mma = [op for op in opcodes if op.endswith("MMA") or op.endswith("GMMA")]
    local = int(fields.get("LOCAL", 0))
    spills = local
    if ptx is not None and target is not None:
        report = ptxas_report(ptx, target)
        spills = report["spill_stores"] + report["spill_loads"]
    return {
        "registers": int(fields.get("REG", 0)),
        "stack": int(fields.get("STACK", 0)),
        "local": local,
        "spills": spills,
        "shared": int(fields.get("SHARED", 0)),
        "mma": len(mma),
        "wgmma": sum(op == "HGMMA" for op in mma),
        "instructions": len(opcodes),
    }


def render_ptx(kernels: list[AotKernel]) -> str:
    """The PTX of each kernel, each under a one-line banner."""
    parts = [f"// ===== {k.name} ({k.target}, num_warps={k.num_warps}, num_stages={k.num_stages})\n{k.asm['ptx']}"
             for k in kernels]  # fmt: skip
    return "\n".join(parts)


def render_resources(kernels: list[AotKernel]) -> str:
    """A table of SASS resource usage, one row per kernel."""
    head = f"{'kernel':<18} {'target':<7} {'regs':>5} {'spills':>7} {'shared':>8} {'mma':>5} {'wgmma':>6} {'instr':>6}"
    rows = [head, "-" * len(head)]
    for k in kernels:
        r = k.resources
        shared = max(k.shared, r["shared"])
        rows.append(
            f"{k.name:<18} {k.target:<7} {r['registers']:>5} {r['spills']:>7} {shared:>8} {r['mma']:>5} "
            f"{r['wgmma']:>6} {r['instructions']:>6}"
        )
    rows.append("spills = bytes of spill stores + loads per thread (ptxas -v); shared = bytes per block")
    return "\n".join(rows)
