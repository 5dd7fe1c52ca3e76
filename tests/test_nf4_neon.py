"""The NEON layer of the native NF4 kernels (impls/kernels/nf4_native.c), verified under emulation: the kernels and
tests/nf4_native_driver.c cross-compiled for aarch64 (``aarch64-linux-gnu-gcc``, static, OpenMP) and run by
``qemu-aarch64`` at 1 and 2 threads on the inputs this file writes; the results compared with the x86 build's
(through nf4_native's Python entry points) on the same inputs. Dequantisation (fp32/bf16/fp16, whole and panel,
special scales included) and the double-quant decode: bitwise equal to x86. GEMV, GEMV^T and the LoRA whole-call
kernels: within the fp32 summation-order bound of tests/test_nf4_native.py against a float64 reference (the NEON
layer sums in 4 lanes, not 8 or 16), except the LoRA gradients dA and dB, which every layer computes element by
element in one order (bitwise equal to x86, fp32 or rounded to bf16); all bitwise the same at 1 and 2 threads. Planted errors (a driver built with a
wrong code entry, perturbed outputs) must fail. Correctness only: emulated time says nothing about speed.

Needs the cross compiler and qemu (Debian: ``apt-get install gcc-aarch64-linux-gnu qemu-user``; .ci/run installs
them); skips with the reason where they are absent."""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import pytest
import torch
from twinbench.impls.kernels import nf4_native
from twinbench.impls.kernels.nf4_code import nf4_table
from twinbench.reference.nf4 import quantize_nf4

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
DRIVER = Path(__file__).with_name("nf4_native_driver.c")
NEON_ISA_ID = 128  # nf4_native_isa() of the NEON build
# fp32 summation order only (tests/test_nf4_native.py, test_gemv_forward_and_backward_match_fp64): max |error| <=
# FP32_BOUND * max |fp64 result|
FP32_BOUND = 2e-6
PLANTED_CODE_ENTRY = 11

pytestmark = [
    pytest.mark.skipif(shutil.which(CROSS_CC) is None or shutil.which(QEMU) is None,
                       reason=f"{CROSS_CC} or {QEMU} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)"),
    pytest.mark.skipif(not nf4_native.status()[0], reason=f"x86 native NF4 kernels: {nf4_native.status()[1]}"),
]


class Op(IntEnum):
    """The driver's ops (tests/nf4_native_driver.c: OP_*)."""

    ISA = 0
    DEQUANTIZE = 1
    PANEL = 2
    DECODE_ABSMAX = 3
    GEMV = 4
    GEMV_T = 5
    LORA_GEMV = 6
    LORA_GEMV_T = 7
    FIRST_TOUCH = 8


@dataclass(frozen=True)
class Exact:
    """An output that must be bitwise the x86 build's."""

    x86: torch.Tensor


@dataclass(frozen=True)
class Near:
    """An fp32 output within the fp32 summation-order bound of its float64 reference."""

    fp64: torch.Tensor


@dataclass(frozen=True)
class Output:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    want: Exact | Near


@dataclass(frozen=True)
class Call:
    """One kernel call for the driver, and what each of its outputs must be."""

    op: Op
    params: tuple[int, ...]
    arrays: tuple[torch.Tensor | None, ...]
    outputs: tuple[Output, ...]

    def encode(self) -> bytes:
        parts = [struct.pack(f"<qq{len(self.params)}q", int(self.op), len(self.params), *self.params),
                 struct.pack("<q", len(self.arrays))]
        for a in self.arrays:
            raw = b"" if a is None else a.contiguous().view(torch.uint8).numpy().tobytes()
            parts += [struct.pack("<q", len(raw)), raw]
        return b"".join(parts)

    def decode(self, raw: bytes) -> list[torch.Tensor]:
        sizes = [o.dtype.itemsize * int(torch.Size(o.shape).numel()) for o in self.outputs]
        if len(raw) != sum(sizes):
            raise AssertionError(f"{self.outputs[0].name}: {len(raw)} bytes, expected {sum(sizes)}")
        got, at = [], 0
        for o, size in zip(self.outputs, sizes):
            got.append(torch.frombuffer(bytearray(raw[at:at + size]), dtype=torch.uint8).view(o.dtype).reshape(o.shape))
            at += size
        return got


def _f32(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers (NaN payloads compared too)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _same_bits(got: torch.Tensor, x86: torch.Tensor) -> bool:
    """Bitwise equal, where a NaN is any NaN: a NaN the hardware makes (inf x 0 in a dequantisation) is the
    target's default NaN, 0xffc00000 on x86 and 0x7fc00000 on aarch64 (torch's own ops differ the same way); a NaN
    scale propagates with its bits on both."""
    same = _bits(got) == _bits(x86)
    if got.is_floating_point():
        same |= got.isnan() & x86.isnan()
    return bool(same.all())


@dataclass(frozen=True)
class Weight:
    packed2d: torch.Tensor
    scales: nf4_native.Scales  # as the GEMV kernels take them: fp32 [N, K/bs], or the double-quantised state
    fp32_scales: torch.Tensor
    blocksize: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed2d.shape[0], 2 * self.packed2d.shape[1]

    def arrays(self) -> tuple[torch.Tensor | None, ...]:
        """packed, fp32 scales, code16, q, absmax2, code2, offset: the driver's weight arrays of the GEMV ops."""
        code = nf4_table("cpu")
        if isinstance(self.scales, nf4_native.NestedScales):
            s = self.scales
            return self.packed2d, None, code, s.q, s.absmax2, s.code2, _f32(s.offset)
        return self.packed2d, self.scales, code, None, None, None, _f32(0.0)


def _weight(n: int, k: int, blocksize: int, double_quant: bool, seed: int) -> Weight:
    gen = torch.Generator().manual_seed(seed)
    st = quantize_nf4(torch.randn(n, k, generator=gen) / k**0.5, blocksize, double_quant)
    packed2d = st.packed.reshape(n, k // 2).contiguous()
    if double_quant:
        scales = nf4_native.NestedScales(st.absmax.reshape(n, -1).contiguous(), st.absmax2.float().contiguous(),
                                         st.code2.float().contiguous(), float(st.offset))
        return Weight(packed2d, scales, scales.decoded(), blocksize)
    return Weight(packed2d, st.absmax.float().reshape(n, -1).contiguous(), st.absmax.float().reshape(n, -1), blocksize)


def _calls() -> list[Call]:
    """The calls, with the x86 results and float64 references they are held to. Shapes: K = 160 with 32-column
    blocks (5 blocks a row: the double-quant decode's 4-lane loop and its scalar rest, and a 4-block run across
    a 256-block boundary at row 51), N = 70 (forward chunk and register-block tails, the last row's shifted
    loads), rank 5 (not whole vectors) and 8, rows 1-4 (every specialisation)."""
    calls: list[Call] = [Call(Op.ISA, (), (), (Output("isa", torch.int32, (1,), Exact(torch.tensor([NEON_ISA_ID],
                                                                                                    dtype=torch.int32))),))]
    code = nf4_table("cpu")
    gen = torch.Generator().manual_seed(5)
    weights = {"k160-bs32-dq": _weight(64, 160, 32, True, 1), "k256-bs64": _weight(70, 256, 64, False, 2),
               "k256-bs64-dq": _weight(70, 256, 64, True, 3)}
    # dequantisation: every output dtype, and scales whose products are NaN, inf, denormal, zero or overflow fp16
    special = weights["k256-bs64"].fp32_scales.clone()
    special.view(-1)[:7] = torch.tensor([float("nan"), float("inf"), 1e-40, -3.0, 0.0, 1e5, 1e-30])
    for name, w, scales in [*((n, w, w.fp32_scales) for n, w in weights.items()),
                            ("special-scales", weights["k256-bs64"], special)]:
        n, k = w.shape
        for dtype, kind in ((torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2)):
            want = nf4_native.dequantize(w.packed2d, scales, dtype)
            calls.append(Call(Op.DEQUANTIZE, (n * k, w.blocksize, kind), (w.packed2d, scales, code),
                              (Output(f"dequantize {name} {dtype}", dtype, (n, k), Exact(want)),)))
            r0, r1, c0, c1 = 3, 41, 32, k - 32
            panel = torch.empty(r1 - r0, c1 - c0, dtype=dtype)
            nf4_native.dequantize_panel(w.packed2d, scales, dtype, (r0, r1), (c0, c1), panel, threads=1)
            calls.append(Call(Op.PANEL, (n, k, w.blocksize, r0, r1, c0, c1, kind), (w.packed2d, scales, code),
                              (Output(f"panel {name} {dtype}", dtype, panel.shape, Exact(panel)),)))
    for name, w in weights.items():
        if isinstance(w.scales, nf4_native.NestedScales):
            s = w.scales
            calls.append(Call(Op.DECODE_ABSMAX, (s.q.numel(),), (s.q, s.absmax2, s.code2, _f32(s.offset)),
                              (Output(f"decode_absmax {name}", torch.float32, (s.q.numel(),),
                                      Exact(nf4_native.decode_absmax(s.q, s.absmax2, s.code2, s.offset))),)))
    # GEMV forward (fp32 and bf16 x) and backward, 1-4 rows, against float64 (W64: the dequantisation checked above)
    for name, w in weights.items():
        n, k = w.shape
        w64 = nf4_native.dequantize(w.packed2d, w.fp32_scales, torch.float32).double()
        for m in (1, 2, 3, 4):
            x, g = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
            for xt in (x, x.bfloat16()) if m in (1, 4) else (x,):
                bf16 = xt.dtype == torch.bfloat16
                calls.append(Call(Op.GEMV, (int(bf16), m, n, k, w.blocksize), (*w.arrays(), xt),
                                  (Output(f"gemv {name} M={m} x {xt.dtype}", torch.float32, (m, n),
                                          Near(xt.double() @ w64.t())),)))
            calls.append(Call(Op.GEMV_T, (m, n, k, w.blocksize), (*w.arrays(), g),
                              (Output(f"gemv_t {name} M={m}", torch.float32, (m, k), Near(g.double() @ w64)),)))
    # the LoRA whole-call kernels: fp32 factors with a bias, bf16 factors without, no LoRA with a bias
    for (name, m, rank, factor_dtype, with_bias) in (("k256-bs64-dq", 3, 5, torch.float32, True),
                                                     ("k160-bs32-dq", 1, 8, torch.bfloat16, False),
                                                     ("k256-bs64", 4, 0, torch.float32, True)):
        w = weights[name]
        n, k = w.shape
        w64 = nf4_native.dequantize(w.packed2d, w.fp32_scales, torch.float32).double()
        x, g = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
        a = (torch.randn(rank, k, generator=gen) / k**0.5).to(factor_dtype)
        b = torch.randn(n, rank, generator=gen).to(factor_dtype)
        bias = torch.randn(n, generator=gen) if with_bias else None
        s, bf = 2.0, int(factor_dtype == torch.bfloat16)
        xd, ad, bd, gd = x.double(), a.double(), b.double(), g.double()
        want_y = xd @ w64.t() + s * (xd @ ad.t()) @ bd.t() + (0.0 if bias is None else bias.double())
        label = f"lora {name} M={m} rank={rank} {factor_dtype}"
        calls.append(Call(Op.LORA_GEMV, (m, n, k, w.blocksize, rank, bf),
                          (*w.arrays(), x, a if rank else None, b if rank else None, bias, _f32(s)),
                          (Output(f"{label} y", torch.float32, (m, n), Near(want_y)),
                           *((Output(f"{label} xa", torch.float32, (m, rank), Near(xd @ ad.t())),) if rank else ()))))
        if not rank:
            continue
        xa = nf4_native.lora_gemv(x, w.packed2d, w.scales, a, b, s, bias)[1]
        _, da, db = nf4_native.lora_gemv_t(g, w.packed2d, w.scales, a, b, xa, s, x)
        calls.append(Call(Op.LORA_GEMV_T, (m, n, k, w.blocksize, rank, bf),
                          (*w.arrays(), g, a, b, xa, _f32(s), x),
                          (Output(f"{label} dx", torch.float32, (m, k), Near(gd @ w64 + s * (gd @ bd) @ ad)),
                           Output(f"{label} dA", factor_dtype, (rank, k), Exact(da)),
                           Output(f"{label} dB", factor_dtype, (n, rank), Exact(db)))))
    src = torch.randint(0, 256, (70, 128), generator=gen, dtype=torch.uint8)
    calls.append(Call(Op.FIRST_TOUCH, (70, 128), (src,), (Output("first_touch_copy", torch.uint8, (70, 128),
                                                                Exact(src)),)))
    return calls


def _problems(calls: list[Call], got: list[list[torch.Tensor]]) -> list[str]:
    """What one run's outputs get wrong against the x86 results and the float64 references (empty: all right)."""
    bad = []
    for call, outs in zip(calls, got):
        for o, t in zip(call.outputs, outs):
            if isinstance(o.want, Exact):
                if not _same_bits(t, o.want.x86):
                    bad.append(f"{o.name}: not bitwise the x86 build's")
                continue
            want = o.want.fp64
            scale = want.abs().max().item()
            err = (t.double() - want).abs()
            if not bool((err <= FP32_BOUND * scale).all()):
                bad.append(f"{o.name}: max error {err.max().item():.3g} over the bound ({FP32_BOUND} x {scale:.3g})")
    return bad


def _bound_use(calls: list[Call], got: list[list[torch.Tensor]]) -> float:
    """The largest fp32 output error as a fraction of its bound (how much room the bound leaves)."""
    worst = 0.0
    for call, outs in zip(calls, got):
        for o, t in zip(call.outputs, outs):
            if isinstance(o.want, Near):
                want = o.want.fp64
                worst = max(worst, (t.double() - want).abs().max().item() / (FP32_BOUND * want.abs().max().item()))
    return worst


def _link(build: Path, kernels_o: Path, plant: int | None) -> Path:
    exe = build / ("driver" if plant is None else f"driver-planted-{plant}")
    defs = [] if plant is None else [f"-DNF4_DRIVER_PLANT_CODE={plant}"]
    subprocess.run([CROSS_CC, "-O2", "-std=c11", *defs, "-fopenmp", "-static", str(DRIVER),
                    str(kernels_o), "-o", str(exe)], check=True, capture_output=True, text=True, timeout=120)
    return exe


def _run(exe: Path, calls_file: Path, calls: list[Call], threads: int) -> list[list[torch.Tensor]]:
    out = calls_file.with_name(f"{exe.name}-{threads}.out")
    done = subprocess.run([QEMU, str(exe), str(calls_file), str(out), str(threads)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    raw, at, got = out.read_bytes(), 0, []
    for call in calls:
        (size,) = struct.unpack_from("<q", raw, at)
        got.append(call.decode(raw[at + 8:at + 8 + size]))
        at += 8 + size
    assert at == len(raw), "trailing bytes in the driver's output"
    return got


@pytest.fixture(scope="module")
def neon(tmp_path_factory):
    """(calls, calls file, the driver, the planted driver): the NEON kernels built once, with nf4_native.py's flags
    for an aarch64 host (less -shared), as one object both drivers link."""
    build = tmp_path_factory.mktemp("nf4-neon")
    kernels_o = build / "nf4_native.o"
    flags = [f for f in nf4_native.FLAGS if f != "-shared"] + nf4_native.ISA_FLAGS["neon"][0]
    done = subprocess.run([CROSS_CC, *flags, "-c", str(nf4_native.SOURCE), "-o", str(kernels_o)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = _calls()
    calls_file = build / "calls.bin"
    calls_file.write_bytes(b"".join(c.encode() for c in calls))
    return calls, calls_file, _link(build, kernels_o, None), _link(build, kernels_o, PLANTED_CODE_ENTRY)


def test_neon_matches_x86_and_fp64_at_1_and_2_threads(neon):
    calls, calls_file, driver, _ = neon
    one, two = _run(driver, calls_file, calls, 1), _run(driver, calls_file, calls, 2)
    assert _problems(calls, one) == []
    differ = [o.name for call, a, b in zip(calls, one, two) for o, s, t in zip(call.outputs, a, b)
              if not torch.equal(_bits(s), _bits(t))]
    assert differ == [], "not bitwise the same at 1 and 2 threads"
    assert _bound_use(calls, one) < 1.0
    # planted: one output bit of a dequantisation, one GEMV element off by 1e-4 relative, one bit at 2 threads
    deq = next(i for i, c in enumerate(calls) if c.op == Op.DEQUANTIZE)
    gemv = next(i for i, c in enumerate(calls) if c.op == Op.GEMV)
    bad = [[t.clone() for t in outs] for outs in one]
    _bits(bad[deq][0]).view(-1)[5] ^= 1
    bad[gemv][0].view(-1)[3] *= 1 + 1e-4
    assert [p.split(":")[0] for p in _problems(calls, bad)] == [calls[deq].outputs[0].name, calls[gemv].outputs[0].name]
    _bits(two[gemv][0]).view(-1)[0] ^= 1
    assert not torch.equal(_bits(one[gemv][0]), _bits(two[gemv][0]))


def test_planted_wrong_code_entry_is_caught(neon):
    calls, calls_file, _, planted = neon
    names = {p.split(":")[0].split(" ")[0] for p in _problems(calls, _run(planted, calls_file, calls, 1))}
    assert {"dequantize", "panel", "gemv", "gemv_t", "lora"} <= names, names
