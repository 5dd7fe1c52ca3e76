"""Ours: sort-by-expert permute -> per-expert GEMMs over contiguous row blocks -> weighted un-permute,
as one autograd.Function with a hand-written backward.

What it does differently from transformers' grouped_mm path (the speed this buys, and where it buys
nothing: docs/moe.md, "Measured"):
- on the CPU the experts are split over the intra-op threads, each running whole GEMMs single-threaded
  (``_for_each_block``); with one thread both are the same per-expert GEMM loop;
- one sort and one host sync (``counts.tolist()``) per call; forward and backward reuse the permutation;
- the routing weight multiplies the down projection's output, as in transformers (folding it into the
  down projection's input saves an [S, H] tensor but doubles the rounding error of the router-weight
  gradient, past the three-way bound: docs/moe.md);
- weight gradients are written by ``torch.mm(..., out=grad[e])`` straight into the [E, ...] gradient
  (nothing dense per expert is materialised besides the gradients themselves; empty experts get zeros);
- the GEMM operands are passed with BLAS-friendly strides (transposed views, no copies of the weights);
- in bf16 on the CPU the work around the GEMMs (SwiGLU forward/backward, the weighted combine, the routed output
  gradient with the router weight's gradient) is one native pass each with fp32 math and one rounding per output
  (impls/kernels/moe_native.c); on the CPU in every dtype the expert-weight gradients are allocated in 2 MB pages
  (docs/moe.md, "bf16: the work around the GEMMs").
GEMM backend: on CUDA capability 9.x/10.x in bf16 the row GEMMs use ``torch.nn.functional.grouped_mm`` (a
real grouped kernel, called as transformers calls it); weight gradients, and every GEMM elsewhere, are a
per-expert ``torch.mm`` loop (docs/method.md §5: grouped_mm elsewhere is a loop fallback with a host sync
anyway, and on the CPU its fp32 path with transposed weights is slower than the loop: docs/moe.md).
"""

from __future__ import annotations

import functools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels import moe_native
from twinbench.reference.autograd_once import differentiable_once


def _fast_grouped_mm(x: torch.Tensor) -> bool:
    """True where grouped_mm is a real grouped kernel (docs/method.md §5), not a loop fallback."""
    if x.device.type != "cuda" or torch.version.hip is not None or x.dtype != torch.bfloat16:
        return False
    return hasattr(F, "grouped_mm") and torch.cuda.get_device_capability(x.device)[0] in (9, 10)


class Routing:
    """The permutation shared by forward and backward: rows sorted by expert, and block bounds."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        flat = top_k_index.reshape(-1)
        self.order = torch.argsort(flat, stable=True)          # (token, slot) pairs grouped by expert
        self.token = self.order // top_k_index.shape[1]
        counts = torch.bincount(flat, minlength=num_experts)
        self.offs = torch.cumsum(counts, 0).to(torch.int32)
        ends = self.offs.tolist()                              # the one host sync
        self.blocks = [(e, s, t) for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)) if t > s]
        self.top_k = top_k_index.shape[1]

    @functools.cached_property
    def slot_row(self) -> torch.Tensor:
        """[tokens, k]: the sorted row of each (token, slot) pair (the inverse of ``order``)."""
        rows = torch.empty_like(self.order)
        rows[self.order] = torch.arange(rows.numel(), device=rows.device)
        return rows.view(-1, self.top_k)

    def expert_grad(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised [E, ...] weight gradient whose experts without rows are zeros (the others are written
        whole by their GEMM: zeroing all of it would write the [E, ...] tensor twice)."""
        grad = _empty_in_huge_pages(like)
        filled = torch.zeros(like.shape[0], dtype=torch.bool)
        filled[[e for e, _, _ in self.blocks]] = True
        for e in (~filled).nonzero().flatten().tolist():
            grad[e].zero_()
        return grad


_HUGE_PAGE_MIN_BYTES = 8 << 20


def _empty_in_huge_pages(like: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(like)``, in 2 MB pages for a large contiguous CPU tensor on Linux.

    The expert-weight gradients are the only large buffers each call allocates afresh (150 MB in bf16 at the bench
    shape, 1.2 GB at a Qwen3-30B-A3B layer); in 4 KB pages every first write to them is a page fault, which on this
    machine cost as much as the bf16 GEMMs writing them (docs/moe.md, "bf16: the work around the GEMMs"). The
    mapping asks for transparent huge pages (MADV_HUGEPAGE; honoured where THP is ``always`` or ``madvise``) and is
    unmapped when the tensor is freed. torch allocates every tensor this way under ``THP_MEM_ALLOC_ENABLE=1``,
    which the harness does not set; ``TWINBENCH_MOE_HUGE_PAGES=0`` turns it off here.
    """
    nbytes = like.numel() * like.element_size()
    if (not like.is_cpu or nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE")
            or os.environ.get("TWINBENCH_MOE_HUGE_PAGES") == "0"):
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pages.madvise(mmap.MADV_HUGEPAGE)
    except OSError:   # a kernel without THP: 4 KB pages, as torch's
        pass
    return torch.frombuffer(pages, dtype=like.dtype, count=like.numel()).view(like.shape)   # keeps ``pages`` alive


_THREADED_MIN_FLOPS = 2e7   # below this, starting worker threads costs more than it saves


def _balanced_shares(blocks: list[tuple[int, int, int]], workers: int) -> list[list[tuple[int, int, int]]]:
    """Largest block first to the least-loaded worker (LPT): near-equal rows per worker."""
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    load = [0] * workers
    for block in sorted(blocks, key=lambda b: b[1] - b[2]):
        i = load.index(min(load))
        shares[i].append(block)
        load[i] += block[2] - block[1]
    return [s for s in shares if s]


_POOLS: dict[int, ThreadPoolExecutor] = {}   # one per thread count, kept: starting threads per call costs ~0.1 ms each


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moe-experts")
    return _POOLS[threads]


def _for_each_block(work, blocks: list[tuple[int, int, int]], device: torch.device, work_flops: float) -> None:
    """Run ``work(e, s, t)`` for every expert block.

    On the CPU with N > 1 intra-op threads the experts are split over N threads, each running whole GEMMs
    single-threaded: GEMMs of ~64 rows parallelise badly inside the BLAS (a team of threads waits in
    barriers on every small GEMM; docs/moe.md has the measured gain).
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads <= 1 or len(blocks) < 2 or work_flops < _THREADED_MIN_FLOPS:
        for block in blocks:
            work(*block)
        return

    def run(share):
        torch.set_num_threads(1)   # this worker's OpenMP team; the BLAS setting is process-wide
        with torch.no_grad():      # grad mode is per thread: inside autograd.Function it is off
            for block in share:
                work(*block)

    try:
        list(_pool(threads).map(run, _balanced_shares(blocks, threads)))
    finally:
        torch.set_num_threads(threads)


_NATIVE_MIN_ELEMENTS_PER_THREAD = 1 << 16   # below this a whole-tensor pass runs on the calling thread


def _for_each_range(work, count: int, elements: int) -> None:
    """Run ``work(lo, hi)`` over ``range(count)`` split into one contiguous range per CPU intra-op thread (the
    native kernels release the GIL), or as one range when the pass is small."""
    threads = min(torch.get_num_threads(), max(1, elements // _NATIVE_MIN_ELEMENTS_PER_THREAD), count)
    if threads <= 1:
        work(0, count)
        return
    bounds = [count * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(lambda i: work(bounds[i], bounds[i + 1]), range(threads)))


def _rows_transposed(g: torch.Tensor) -> torch.Tensor:
    """g^T as the left operand of a weight-gradient GEMM: a contiguous copy for a bf16 CPU GEMM (oneDNN), else the
    transposed view (fp16 was not measured). g is a few dozen rows, so the copy is cheap; on 64 experts x 64 rows at the bench shape
    oneDNN's bf16 dW_gate_up GEMMs took 62-70 ms with the view and 46-52 ms with the copy included (dW_down: 25-27
    vs 27-34 ms), while fp32's BLAS takes the view as it is (the copy cost 6-10 ms there)."""
    return g.t().contiguous() if g.is_cpu and g.dtype == torch.bfloat16 else g.t()


class TorchGemms:
    """The GEMMs over row blocks: grouped_mm where it is a real grouped kernel, else torch.mm per expert."""

    name = "torch.mm per expert, experts split over CPU threads (grouped_mm on CUDA 9.x/10.x bf16)"

    @staticmethod
    def rows_times_weight(a: torch.Tensor, w: torch.Tensor, route: Routing, transpose: bool) -> torch.Tensor:
        """out[rows of e] = a[rows of e] @ (w[e]^T if transpose else w[e])."""
        if _fast_grouped_mm(a):
            return F.grouped_mm(a, w.transpose(-2, -1) if transpose else w, offs=route.offs)
        out = a.new_empty((a.shape[0], w.shape[1] if transpose else w.shape[2]))

        def work(e, s, t):
            torch.mm(a[s:t], w[e].t() if transpose else w[e], out=out[s:t])

        _for_each_block(work, route.blocks, a.device, 2.0 * a.shape[0] * a.shape[1] * out.shape[1])
        return out

    @staticmethod
    def weight_grad(g: torch.Tensor, a: torch.Tensor, like: torch.Tensor, route: Routing) -> torch.Tensor:
        """grad[e] = g[rows of e]^T @ a[rows of e], written in place; experts without rows get zeros."""
        grad = route.expert_grad(like)

        def work(e, s, t):
            torch.mm(_rows_transposed(g[s:t]), a[s:t], out=grad[e])

        _for_each_block(work, route.blocks, a.device, 2.0 * g.shape[0] * g.shape[1] * a.shape[1])
        return grad


class SortedExperts(torch.autograd.Function):
    """Forward and backward of the sparse SwiGLU experts over expert-sorted rows; ``gemms`` does the GEMMs.

    With :class:`TorchGemms` off the grouped_mm path (the CPU), each expert's whole chain runs as one task
    (:func:`_expert_forward`, :func:`_expert_backward`): one hand-off to the worker threads per direction
    instead of one per GEMM, and the expert's [rows, 2I] intermediates stay in its thread's cache between
    the GEMMs and the SwiGLU work. The work around the GEMMs (SwiGLU, combine, routed gradient) is the same
    functions on the same rows in both paths (:func:`_swiglu`, :func:`_swiglu_backward`, :func:`_combine`,
    :func:`_route_gradient`), so the two give bitwise the same results.
    """

    @staticmethod
    def forward(ctx, gemms, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        route = Routing(top_k_index, gate_up_proj.shape[0])
        xs = hidden_states.index_select(0, route.token)
        w = top_k_weights.reshape(-1).index_select(0, route.order).unsqueeze(1)
        if _per_expert_chain(gemms, xs):
            h, a, y = _expert_forward(xs, gate_up_proj, down_proj, route)
        else:
            h = gemms.rows_times_weight(xs, gate_up_proj, route, True)            # [S, 2I]
            a = _swiglu(h, h.new_empty((h.shape[0], h.shape[1] // 2)))
            y = gemms.rows_times_weight(a, down_proj, route, True)               # [S, H], unweighted
        out = _combine(y, w, route, hidden_states.shape[0])                      # fp32 sum over the k slots
        ctx.route, ctx.gemms = route, gemms
        ctx.save_for_backward(hidden_states, top_k_weights, gate_up_proj, down_proj, h, a, y, w)
        return out

    @staticmethod
    @differentiable_once("SortedExperts")  # out= GEMMs, native kernels, worker threads: no graph to differentiate
    def backward(ctx, grad_out):
        hidden_states, top_k_weights, gate_up_proj, down_proj, h, a, y, w = ctx.saved_tensors
        route, gemms = ctx.route, ctx.gemms
        xs = hidden_states.index_select(0, route.token)                       # re-gathered, not stored
        g_y, grad_w = _route_gradient(grad_out, w, y, route)                  # [S, H] weighted; d(router weight)
        if _per_expert_chain(gemms, xs):
            g_xs, grad_gate_up, grad_down = _expert_backward(g_y, h, a, xs, gate_up_proj, down_proj, route)
        else:
            grad_down = gemms.weight_grad(g_y, a, down_proj, route)               # [E, H, I]
            g_a = gemms.rows_times_weight(g_y, down_proj, route, False)           # [S, I]
            g_h = _swiglu_backward(h, g_a, torch.empty_like(h))                   # d gate, d up
            grad_gate_up = gemms.weight_grad(g_h, xs, gate_up_proj, route)        # [E, 2I, H]
            g_xs = gemms.rows_times_weight(g_h, gate_up_proj, route, False)       # [S, H]
        grad_x = _combine(g_xs, None, route, hidden_states.shape[0])
        return (None, grad_x, None, grad_w.view_as(top_k_weights).to(top_k_weights.dtype), grad_gate_up, grad_down)


def _per_expert_chain(gemms, x: torch.Tensor) -> bool:
    return gemms is TorchGemms and not _fast_grouped_mm(x)


# The work around the GEMMs. In bf16 on the CPU each is one native pass with fp32 math and one rounding per output
# (impls/kernels/moe_native.c); torch's bf16 ops convert and round on every op (docs/moe.md, "bf16: the work around
# the GEMMs"). Elsewhere (fp32, fp16, GPUs, no compiler) the torch ops below run.

def _swiglu(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) * up for the rows of h = [gate | up]."""
    if moe_native.usable(h):
        return moe_native.swiglu_forward(h, out)
    inter = out.shape[1]
    return torch.mul(F.silu(h[:, :inter]), h[:, inter:], out=out)


def _swiglu_backward(h: torch.Tensor, g_a: torch.Tensor, g_h: torch.Tensor) -> torch.Tensor:
    """g_h = [d gate | d up] of silu(gate) * up for the rows of h, from d(out) = g_a."""
    if moe_native.usable(h):
        return moe_native.swiglu_backward(h, g_a, g_h)
    inter = g_a.shape[1]
    gate, up = h[:, :inter], h[:, inter:]
    torch.ops.aten.silu_backward.grad_input(g_a * up, gate, grad_input=g_h[:, :inter])
    torch.mul(g_a, F.silu(gate), out=g_h[:, inter:])
    return g_h


def _combine(y: torch.Tensor, w: torch.Tensor | None, route: Routing, tokens: int) -> torch.Tensor:
    """[tokens, H]: each token's k rows of y (times their routing weight w), summed in fp32, in y's dtype."""
    if moe_native.usable(y):
        out = y.new_empty((tokens, y.shape[1]))
        w32 = None if w is None else w.reshape(-1).float()
        _for_each_range(lambda lo, hi: moe_native.combine(y, w32, route.slot_row, out, lo, hi), tokens, y.numel())
        return out
    out = torch.zeros((tokens, y.shape[1]), dtype=torch.float32, device=y.device)
    out.index_add_(0, route.token, (y if w is None else y * w).float())
    return out.to(y.dtype)


def _route_gradient(grad_out: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                    route: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_y [S, H]: each row's output gradient times its routing weight; d(router weight) [tokens * k] fp32, in
    (token, slot) order: the row's output gradient . y)."""
    grad_w = torch.empty(route.order.shape, dtype=torch.float32, device=y.device)
    if moe_native.usable(grad_out, y):
        grad_out = grad_out.contiguous()           # e.g. the expanded gradient of out.sum(): stride 0
        g_y, w32 = torch.empty_like(y), w.reshape(-1).float()
        _for_each_range(lambda lo, hi: moe_native.route_gradient(grad_out, route.token, route.order, w32, y, g_y,
                                                                 grad_w, lo, hi), y.shape[0], y.numel())
        return g_y, grad_w
    g_out = grad_out.index_select(0, route.token)                             # [S, H]
    grad_w[route.order] = (g_out.float() * y.float()).sum(-1)
    return g_out * w, grad_w


def _expert_forward(xs, gate_up_proj, down_proj, route: Routing):
    """h = xs W_gu[e]^T, a = silu(gate) * up, y = a W_down[e]^T, expert by expert: returns (h, a, y)."""
    inter = down_proj.shape[2]
    h = xs.new_empty((xs.shape[0], 2 * inter))
    a = xs.new_empty((xs.shape[0], inter))
    y = xs.new_empty((xs.shape[0], down_proj.shape[1]))

    def work(e, s, t):
        torch.mm(xs[s:t], gate_up_proj[e].t(), out=h[s:t])
        _swiglu(h[s:t], a[s:t])
        torch.mm(a[s:t], down_proj[e].t(), out=y[s:t])

    _for_each_block(work, route.blocks, xs.device, 6.0 * xs.shape[0] * xs.shape[1] * inter)
    return h, a, y


def _expert_backward(g_y, h, a, xs, gate_up_proj, down_proj, route: Routing):
    """Per expert: dW_down, d(a), dh through SwiGLU, dW_gate_up and d(xs); returns (g_xs, dW_gu, dW_down)."""
    inter = down_proj.shape[2]
    grad_gate_up, grad_down = route.expert_grad(gate_up_proj), route.expert_grad(down_proj)
    g_xs = xs.new_empty(xs.shape)
    g_h = h.new_empty(h.shape)
    g_a = a.new_empty(a.shape)

    def work(e, s, t):
        torch.mm(_rows_transposed(g_y[s:t]), a[s:t], out=grad_down[e])
        torch.mm(g_y[s:t], down_proj[e], out=g_a[s:t])
        _swiglu_backward(h[s:t], g_a[s:t], g_h[s:t])
        torch.mm(_rows_transposed(g_h[s:t]), xs[s:t], out=grad_gate_up[e])
        torch.mm(g_h[s:t], gate_up_proj[e], out=g_xs[s:t])

    _for_each_block(work, route.blocks, xs.device, 12.0 * xs.shape[0] * xs.shape[1] * inter)
    return g_xs, grad_gate_up, grad_down


@register_impl("moe_ffn", "sorted", tags=("ours",))
def sorted_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return SortedExperts.apply(TorchGemms, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
