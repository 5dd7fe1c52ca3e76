"""Our fused linear DPO: never materialises the [2P, T, V] logits; analytic gradient computed in forward.

Algorithm (plain PyTorch, so it runs natively on every backend torch has):

1. Keep only positions whose label is not ``ignore_index`` (prompt and padding never touch the lm_head)
   and order them pair by pair (chosen rows, then rejected rows of the same pair).
2. Reference log-probs (no grad): tiles of ``rows x vocab-chunk`` logits, online log-sum-exp.
3. Policy, one group of whole pairs at a time: online log-sum-exp over vocabulary chunks gives each
   token's log-prob, so the group's sequence log-probs, its DPO losses and ``dL/dlogp_s`` (closed form per
   loss type) are known before leaving the group. The logits gradient is then ``d_s * (onehot - softmax)``;
   it is formed in place in the tile (kept when a full-vocabulary tile fits 2 x ``tile_bytes``, recomputed
   chunk by chunk otherwise) and folded into the hidden/weight/bias gradients (fp32 accumulators).
4. Backward only scales the stored gradients by the incoming gradient of the loss.

Peak extra memory: one tile (<= 2 x ``tile_bytes``) plus the fp32 weight-gradient accumulator (and, for
bf16/fp16 inputs, an fp32 copy of the lm_head).
"""

from __future__ import annotations

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.reference.autograd_once import differentiable_once

TILE_BYTES = 32 * 2**20  # fp32 logits tile when the vocabulary is split (a group's rows x a vocab chunk)
KEEP_FACTOR = 2          # a whole-vocabulary tile up to KEEP_FACTOR * TILE_BYTES is kept: no recompute
MIN_GROUP_ROWS = 256     # rows per tile when the vocabulary has to be split (matmul efficiency)


class _Tiles:
    """One reused fp32 logits buffer: no per-tile allocation, no page faults, no tile-sized temporaries."""

    def __init__(self, elems: int, device):
        self.buf = torch.empty(elems, dtype=torch.float32, device=device)

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int,
               v1: int) -> torch.Tensor:
        n, w = h.shape[0], v1 - v0
        out = self.buf[:n * w].view(n, w)
        torch.mm(h, weight[v0:v1].t(), out=out)
        if bias is not None:
            out.add_(bias[v0:v1])
        return out


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def vocab_chunk(rows: int, vocab: int, tile_bytes: int) -> int:
    if rows * vocab * 4 <= KEEP_FACTOR * tile_bytes:
        return vocab
    return max(128, min(vocab, tile_bytes // (4 * max(rows, 1))))


def _group_pairs(rows_per_pair: list[int], target_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive whole pairs per group, about ``target_rows`` rows each: (pair0, pair1, row0, row1)."""
    groups, first, r0, acc = [], 0, 0, 0
    for p, n in enumerate(rows_per_pair):
        if acc and acc + n > target_rows:
            groups.append((first, p, r0, r0 + acc))
            first, r0, acc = p, r0 + acc, 0
        acc += n
    groups.append((first, len(rows_per_pair), r0, r0 + acc))
    return groups


def _token_logps(tiles: _Tiles, h, weight, bias, targets, vchunk: int, keep: bool = False):
    """Per-row log p(target) by online log-sum-exp over vocabulary chunks.

    Returns (logp, lse, kept, sum_exp): with ``keep`` and a single chunk, ``kept`` is the tile turned in place
    into exp(z - max), so softmax = kept / sum_exp without a second matmul.
    """
    rows, vocab = h.shape[0], weight.shape[0]
    run_max = torch.full((rows,), float("-inf"), device=h.device)
    sum_exp = torch.zeros(rows, device=h.device)
    target_z = torch.zeros(rows, device=h.device)
    for v0 in range(0, vocab, vchunk):
        v1 = min(v0 + vchunk, vocab)
        z = tiles.logits(h, weight, bias, v0, v1)
        local = targets - v0
        inside = (local >= 0) & (local < v1 - v0)
        picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        target_z = torch.where(inside, picked, target_z)
        new_max = torch.maximum(run_max, z.amax(-1)) if rows else run_max
        z.sub_(new_max[:, None]).exp_()
        sum_exp = sum_exp * torch.exp(run_max - new_max) + z.sum(-1)
        run_max = new_max
    lse = run_max + torch.log(sum_exp)
    kept = z if keep and vchunk >= vocab else None
    return target_z - lse, lse, kept, sum_exp


def _pair_loss_and_grad(pc, pr, rc, rr, nc, nr, beta: float, loss_type: str, ls: float):
    """Per-pair losses and their derivatives w.r.t. the chosen / rejected policy log-probs (closed form)."""
    delta = (pc - rc) - (pr - rr)
    x = beta * delta
    if loss_type == "sigmoid":
        loss = torch.nn.functional.softplus(-x)                 # -logsigmoid(x)
        d_delta = -beta * torch.sigmoid(-x)
        return loss, d_delta, -d_delta
    if loss_type == "robust":
        loss = ((1 - ls) * torch.nn.functional.softplus(-x) - ls * torch.nn.functional.softplus(x)) / (1 - 2 * ls)
        d_delta = (-(1 - ls) * beta * torch.sigmoid(-x) - ls * beta * torch.sigmoid(x)) / (1 - 2 * ls)
        return loss, d_delta, -d_delta
    if loss_type == "ipo":
        nc, nr = nc.clamp(min=1), nr.clamp(min=1)
        u = (pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)
        return u * u, 2 * u / nc, -2 * u / nr
    raise ValueError(f"unknown loss_type {loss_type!r}")


class FusedLinearDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, ref_weight, ref_bias, labels, beta, loss_type,
                label_smoothing, ignore_index, tile_bytes):
        two_p, seq, width = hidden.shape
        pairs = two_p // 2
        dev = hidden.device
        vocab = weight.shape[0]
        valid = (labels != ignore_index).reshape(-1)
        rows = valid.nonzero().squeeze(1)
        seq_of_row = rows // seq
        order = torch.argsort(seq_of_row % pairs, stable=True)       # pair by pair, chosen before rejected
        rows, seq_of_row = rows[order], seq_of_row[order]
        targets = labels.reshape(-1)[rows]
        tokens = torch.bincount(seq_of_row, minlength=two_p).float()
        rows_per_pair = (tokens[:pairs] + tokens[pairs:]).long().tolist()
        # Low-precision inputs: logits from fp32 copies of the operands (as TRL does off-CUDA): the logits are
        # never rounded to bf16, and one copy of the head serves every tile and the hidden-state gradient.
        h_all = _fp32(hidden.reshape(-1, width)[rows])
        ref_h_all = _fp32(ref_hidden.reshape(-1, width)[rows])
        groups = _group_pairs(rows_per_pair, max(MIN_GROUP_ROWS, tile_bytes // (4 * vocab)))
        chunks = {(a, b): vocab_chunk(b - a, vocab, tile_bytes) for _, _, a, b in groups}
        tiles = _Tiles(max((b - a) * c for (a, b), c in chunks.items()), dev)

        # Sequence sums of ~T token log-probs, and the pair losses derived from their differences, in fp64
        # (tiny vectors; MPS has no fp64): delta = difference of two ~T*log(V) sums loses digits in fp32.
        seq_dtype = torch.float32 if dev.type == "mps" else torch.float64
        tokens = tokens.to(seq_dtype)
        ref_logps = torch.zeros(two_p, device=dev, dtype=seq_dtype)
        ref_w, ref_b = _fp32(ref_weight), _fp32(ref_bias)
        for _, _, a, b in groups:
            lp, _, _, _ = _token_logps(tiles, ref_h_all[a:b], ref_w, ref_b, targets[a:b], chunks[a, b])
            ref_logps.index_add_(0, seq_of_row[a:b], lp.to(seq_dtype))

        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        want_b = bias is not None and ctx.needs_input_grad[3]
        want = want_h or want_w or want_b
        grad_h_rows = torch.zeros(h_all.shape, device=dev) if want_h else None
        grad_w = torch.zeros(weight.shape, device=dev) if want_w else None
        grad_b = torch.zeros(vocab, device=dev) if want_b else None
        del ref_w, ref_b
        w32, b32 = _fp32(weight), _fp32(bias)
        logps = torch.zeros(two_p, device=dev, dtype=seq_dtype)
        pair_losses = torch.zeros(pairs, device=dev, dtype=seq_dtype)
        for p0, p1, a, b in groups:
            h, tgt, sr, vchunk = h_all[a:b], targets[a:b], seq_of_row[a:b], chunks[a, b]
            lp, lse, kept, sum_exp = _token_logps(tiles, h, w32, b32, tgt, vchunk, keep=want)
            logps.index_add_(0, sr, lp.to(seq_dtype))
            c, r = slice(p0, p1), slice(p0 + pairs, p1 + pairs)
            loss, d_c, d_r = _pair_loss_and_grad(logps[c], logps[r], ref_logps[c], ref_logps[r], tokens[c],
                                                 tokens[r], beta, loss_type, label_smoothing)
            pair_losses[c] = loss
            if not want:
                continue
            d_seq = torch.zeros(two_p, device=dev, dtype=seq_dtype)
            d_seq[c], d_seq[r] = d_c / pairs, d_r / pairs                # mean over pairs
            d_row = d_seq[sr].float()
            for v0 in range(0, vocab, vchunk):
                v1 = min(v0 + vchunk, vocab)
                # dL/dz = d_row * (onehot(target) - softmax(z)), formed in place in the tile
                if kept is not None:
                    g = kept.mul_((-d_row / sum_exp)[:, None])
                else:
                    g = tiles.logits(h, w32, b32, v0, v1).sub_(lse[:, None]).exp_().mul_(-d_row[:, None])
                local = tgt - v0
                inside = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
                g[inside, local[inside]] += d_row[inside]
                if grad_h_rows is not None:
                    grad_h_rows[a:b].addmm_(g, w32[v0:v1])
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(g.t(), h)
                if grad_b is not None:
                    grad_b[v0:v1] += g.sum(0)
        del tiles, w32, b32

        chosen, rejected = logps[:pairs], logps[pairs:]
        chosen_rewards = beta * (chosen - ref_logps[:pairs])
        rejected_rewards = beta * (rejected - ref_logps[pairs:])
        out_dtype = hidden.dtype
        grad_hidden = None
        if grad_h_rows is not None:
            grad_hidden = torch.zeros(two_p * seq, width, device=dev, dtype=out_dtype)
            grad_hidden[rows] = grad_h_rows.to(out_dtype)
            grad_hidden = grad_hidden.view(hidden.shape)
        # Not save_for_backward: these are results, not inputs; backward scales them in place, once.
        ctx.grads = (grad_hidden, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        outs = (pair_losses.mean().to(out_dtype), chosen_rewards.to(out_dtype), rejected_rewards.to(out_dtype),
                (chosen_rewards - rejected_rewards).to(out_dtype), chosen.to(out_dtype), rejected.to(out_dtype))
        ctx.mark_non_differentiable(*outs[1:])
        # the loss, saved only so that a second derivative meets differentiable_once's error node (the gradients
        # are constants formed in forward; through the loss's node the error is on the path to every input)
        ctx.save_for_backward(outs[0])
        return outs

    @staticmethod
    @differentiable_once("FusedLinearDPO")
    def backward(ctx, grad_loss, *_):
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # the first backward handed them over (scaled in place, memory not held twice)
            raise RuntimeError("FusedLinearDPO's backward runs once per forward: its gradients are formed in the "
                               "forward and handed over by the first backward; for a second backward "
                               "(retain_graph=True) run the forward again")
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return scaled[0], None, scaled[1], scaled[2], None, None, None, None, None, None, None, None


def fused_linear_dpo(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
                     labels: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                     label_smoothing: float = 0.0, ignore_index: int = -100,
                     tile_bytes: int = TILE_BYTES) -> dict[str, torch.Tensor]:
    """Same contract and outputs as ``reference.dpo.linear_dpo``; only ``loss`` carries a gradient."""
    loss, cr, rr, margins, cl, rl = FusedLinearDPO.apply(
        hidden, ref_hidden.detach(), weight, bias, ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(), labels, beta, loss_type, label_smoothing, ignore_index,
        tile_bytes)
    return {"loss": loss, "chosen_rewards": cr, "rejected_rewards": rr, "reward_margins": margins,
            "chosen_logps": cl, "rejected_logps": rl}


@register_impl("dpo", "fused_chunked", tags=("ours",))
def fused_chunked(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, labels, *, beta, loss_type,
                  label_smoothing, ignore_index):
    return fused_linear_dpo(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, labels, beta=beta,
                            loss_type=loss_type, label_smoothing=label_smoothing, ignore_index=ignore_index)
