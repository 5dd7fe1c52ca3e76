"""Our fused linear DPO: never materialises the [2P, T, V] logits; analytic gradient computed in forward.

Algorithm (plain PyTorch, so it runs natively on every backend torch has):

1. Keep only positions whose label is not ``ignore_index`` (prompt and padding never touch the lm_head)
   and order them pair by pair (chosen rows, then rejected rows of the same pair).
2. Reference log-probs (no grad): tiles of ``rows x vocab-chunk`` logits, online log-sum-exp.
3. Policy, one group of whole pairs at a time: online log-sum-exp over vocabulary chunks gives each
   token's log-prob, so the group's sequence log-probs, its DPO losses and ``dL/dlogp_s`` (closed form per
   loss type) are known before leaving the group. The logits gradient is then ``d_s * (onehot - softmax)``;
   it is formed in place in the tile (kept when a full-vocabulary tile fits ``tile_bytes``, recomputed
   chunk by chunk otherwise) and folded into the hidden/weight/bias gradients (fp32 accumulators).
4. Backward only scales the stored gradients by the incoming gradient of the loss.

Peak extra memory: one tile (<= ``tile_bytes``) plus the fp32 weight-gradient accumulator.
"""

from __future__ import annotations

import torch

from harness.registry import register_impl

TILE_BYTES = 64 * 2**20  # one fp32 logits tile; a full-vocabulary tile under this is kept, not recomputed
MIN_GROUP_ROWS = 256     # group small pairs together so each matmul has enough rows


def _vocab_chunk(rows: int, vocab: int, tile_bytes: int) -> int:
    if rows * vocab * 4 <= tile_bytes:
        return vocab
    return max(128, min(vocab, tile_bytes // (4 * max(rows, 1))))


def _tile(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    z = h @ weight[v0:v1].t()
    if bias is not None:
        z = z + bias[v0:v1]
    return z.float()


def _sum_exp(z: torch.Tensor, shift: torch.Tensor, block: int = 64) -> torch.Tensor:
    """sum_j exp(z_ij - shift_i), a few rows at a time so the temporary stays small."""
    return torch.cat([torch.exp(z[i:i + block] - shift[i:i + block, None]).sum(-1)
                      for i in range(0, z.shape[0], block)])


def _token_logps(h, weight, bias, targets, vchunk, keep=False):
    """Per-row log p(target) by online log-sum-exp over vocabulary chunks; (logp, lse, kept tile or None)."""
    rows, vocab = h.shape[0], weight.shape[0]
    run_max = torch.full((rows,), float("-inf"), device=h.device)
    sum_exp = torch.zeros(rows, device=h.device)
    target_z = torch.zeros(rows, device=h.device)
    kept = None
    for v0 in range(0, vocab, vchunk):
        v1 = min(v0 + vchunk, vocab)
        z = _tile(h, weight, bias, v0, v1)
        new_max = torch.maximum(run_max, z.amax(-1))
        sum_exp = sum_exp * torch.exp(run_max - new_max) + _sum_exp(z, new_max)
        run_max = new_max
        local = targets - v0
        inside = (local >= 0) & (local < v1 - v0)
        picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        target_z = torch.where(inside, picked, target_z)
        if keep and v1 - v0 == vocab:
            kept = z
    lse = run_max + torch.log(sum_exp)
    return target_z - lse, lse, kept


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
        valid = (labels != ignore_index).reshape(-1)
        rows = valid.nonzero().squeeze(1)
        seq_of_row = rows // seq
        order = torch.argsort(seq_of_row % pairs, stable=True)       # pair by pair, chosen before rejected
        rows, seq_of_row = rows[order], seq_of_row[order]
        targets = labels.reshape(-1)[rows]
        tokens = torch.bincount(seq_of_row, minlength=two_p).float()
        rows_per_pair = (tokens[:pairs] + tokens[pairs:]).long().tolist()
        h_all = hidden.reshape(-1, width)[rows]
        ref_h_all = ref_hidden.reshape(-1, width)[rows]
        vocab = weight.shape[0]

        # Groups of whole pairs: [(first pair, last pair + 1, first row, end row)]
        groups, start, r0 = [], 0, 0
        acc = 0
        for p, n in enumerate(rows_per_pair):
            acc += n
            if acc >= MIN_GROUP_ROWS or p == pairs - 1:
                groups.append((start, p + 1, r0, r0 + acc))
                start, r0, acc = p + 1, r0 + acc, 0

        ref_logps = torch.zeros(two_p, device=dev)
        logps = torch.zeros(two_p, device=dev)
        with torch.no_grad():
            for _, _, a, b in groups:
                lp, _, _ = _token_logps(ref_h_all[a:b], ref_weight, ref_bias, targets[a:b],
                                        _vocab_chunk(b - a, vocab, tile_bytes))
                ref_logps.index_add_(0, seq_of_row[a:b], lp)

        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        want_b = bias is not None and ctx.needs_input_grad[3]
        want = want_h or want_w or want_b
        grad_h_rows = torch.zeros(h_all.shape, device=dev) if want_h else None
        grad_w = torch.zeros(weight.shape, device=dev) if want_w else None
        grad_b = torch.zeros(vocab, device=dev) if want_b else None
        pair_losses = torch.zeros(pairs, device=dev)
        for p0, p1, a, b in groups:
            h, tgt, sr = h_all[a:b], targets[a:b], seq_of_row[a:b]
            vchunk = _vocab_chunk(b - a, vocab, tile_bytes)
            lp, lse, kept = _token_logps(h, weight, bias, tgt, vchunk, keep=want)
            logps.index_add_(0, sr, lp)
            c, r = slice(p0, p1), slice(p0 + pairs, p1 + pairs)
            loss, d_c, d_r = _pair_loss_and_grad(logps[c], logps[r], ref_logps[c], ref_logps[r], tokens[c],
                                                 tokens[r], beta, loss_type, label_smoothing)
            pair_losses[c] = loss
            if not want:
                continue
            d_seq = torch.zeros(two_p, device=dev)
            d_seq[c], d_seq[r] = d_c / pairs, d_r / pairs                # mean over pairs
            d_row = d_seq[sr]
            h32 = h.float()
            for v0 in range(0, vocab, vchunk):
                v1 = min(v0 + vchunk, vocab)
                g = kept if kept is not None else _tile(h, weight, bias, v0, v1)
                # dL/dz = d_row * (onehot(target) - softmax(z)), formed in place
                g.sub_(lse[:, None]).exp_().mul_(-d_row[:, None])
                local = tgt - v0
                inside = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
                g[inside, local[inside]] += d_row[inside]
                if grad_h_rows is not None:
                    w_chunk = weight[v0:v1] if weight.dtype == torch.float32 else weight[v0:v1].float()
                    grad_h_rows[a:b].addmm_(g, w_chunk)
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(g.t(), h32)
                if grad_b is not None:
                    grad_b[v0:v1] += g.sum(0)
                del g
            kept = None

        chosen, rejected = logps[:pairs], logps[pairs:]
        chosen_rewards = beta * (chosen - ref_logps[:pairs])
        rejected_rewards = beta * (rejected - ref_logps[pairs:])
        out_dtype = hidden.dtype
        grad_hidden = None
        if grad_h_rows is not None:
            grad_hidden = torch.zeros(two_p * seq, width, device=dev, dtype=out_dtype)
            grad_hidden[rows] = grad_h_rows.to(out_dtype)
            grad_hidden = grad_hidden.view(hidden.shape)
        ctx.save_for_backward(grad_hidden, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        outs = (pair_losses.mean().to(out_dtype), chosen_rewards.to(out_dtype), rejected_rewards.to(out_dtype),
                (chosen_rewards - rejected_rewards).to(out_dtype), chosen.to(out_dtype), rejected.to(out_dtype))
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_w, grad_b = ctx.saved_tensors

        def scale(g):
            return None if g is None else g * grad_loss.to(g.dtype)

        return (scale(grad_hidden), None, scale(grad_w), scale(grad_b), None, None, None, None, None, None, None,
                None)


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
