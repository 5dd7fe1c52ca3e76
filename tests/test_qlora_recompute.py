"""Selective recomputation in the patched QLoRA loop (impls/qlora_recompute.py): checkpointing sub-blocks
changes neither the loss nor any LoRA gradient, keeps far fewer bytes for backward, and a recomputation
that is not faithful (a forward that differs when re-run) is caught by the same gradient comparison."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from twinbench.impls.qlora import attention_op as qlora_attention_op
from twinbench.impls.qlora import patched as qlora_patched
from twinbench.impls.qlora import recompute as qlora_recompute  # noqa: E402
from twinbench.reference.qlora.config import LoopConfig  # noqa: E402
from twinbench.reference.qlora.data import micro_batches  # noqa: E402
from twinbench.reference.qlora.model import (  # noqa: E402
    flat,
    load_qlora_model,
    lora_parameters,
    save_base_checkpoint,
)
from twinbench.suites.qlora import DATA  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = LoopConfig(DATA)
    path = tmp_path_factory.mktemp("qlora_recompute") / "base"
    tok = save_base_checkpoint(cfg, path)
    return cfg, path, next(micro_batches(tok, cfg))


def _loss_grads_saved(base, kind: str, recompute: tuple[str, ...], plant=None):
    """(loss, LoRA grads, bytes saved for backward) of one micro-batch through the patched model."""
    cfg, path, batch = base
    cfg = LoopConfig(DATA, kind=kind)
    if kind != "llama":
        path = path.parent / kind
        if not path.exists():
            save_base_checkpoint(cfg, path)
    model = load_qlora_model(path, cfg)
    info = qlora_patched.patch_model(model, recompute=recompute)
    assert ("recompute" in info["patched"]) == bool(recompute)
    if plant is not None:
        plant(model)
    model.train()
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = qlora_patched.labelled_loss(model, batch)
    loss.backward()
    params = lora_parameters(model)
    return loss.detach(), flat([p.grad for p in params.values()], list(params.values())), \
        sum(storages.values())


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_recompute_keeps_loss_and_gradients_and_saves_less(base, kind):
    loss0, grads0, saved0 = _loss_grads_saved(base, kind, ())
    loss1, grads1, saved1 = _loss_grads_saved(base, kind, ("attn", "mlp"))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)  # the fused MLP rounds a little differently
    assert grads0.abs().max() > 0
    torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))
    # measured: llama 4.55 MB -> 1.47 MB, MoE 6.94 -> 3.68 MB; what stays is the layer inputs and residual
    # streams, the attention outputs and their log-sum-exp, the rank-r x A^T, the embedding output, the loss
    # rows (and in the MoE loop what the router and experts keep)
    assert saved1 < (0.35 if kind == "llama" else 0.6) * saved0, (saved0, saved1)


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_attention_op_and_checkpoint_fallback_agree(base, kind):
    """The fused attention op (CPU, unmasked) and the checkpoint path it falls back to elsewhere give the
    same loss and gradients; the op is the one that ran."""
    def no_fused_attention(model):
        for layer in model.get_base_model().model.layers:
            assert layer._twinbench_fused_attn
            layer._twinbench_fused_attn = False

    loss0, grads0, saved0 = _loss_grads_saved(base, kind, ("attn",), plant=no_fused_attention)
    loss1, grads1, saved1 = _loss_grads_saved(base, kind, ("attn",))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))
    assert saved1 > saved0  # the op keeps the attention output and log-sum-exp; checkpoint only the input


def _rope_backward_wrong_sign(grad, cos, sin):
    return grad * cos + qlora_attention_op._rotate_half(grad * sin)


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_planted_attention_backward_bug_is_caught(base, kind, monkeypatch):
    _loss, grads0, _ = _loss_grads_saved(base, kind, ())
    monkeypatch.setattr(qlora_attention_op, "_rope_backward", _rope_backward_wrong_sign)
    _loss, grads1, _ = _loss_grads_saved(base, kind, ("attn",))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))


def _unfaithful_attention(model):
    """Each attention call scales its input by a different factor, so the activations a recomputation
    rebuilds are not the ones the first forward used (scaling the output would not do: a scalar factor lives
    in the graph node of the first forward, and only saved tensors are recomputed)."""
    for layer in model.get_base_model().model.layers:
        forward, calls = layer.self_attn.forward, [0]

        def scaled(*args, hidden_states, forward=forward, calls=calls, **kwargs):
            calls[0] += 1
            return forward(*args, hidden_states=hidden_states * (1.0 + 0.01 * calls[0]), **kwargs)

        layer.self_attn.forward = scaled


def _unfaithful_checkpointed_attention(model):
    """The checkpoint path (the fused op never calls ``self_attn.forward``), made unfaithful."""
    _unfaithful_attention(model)
    for layer in model.get_base_model().model.layers:
        layer._twinbench_fused_attn = False


def test_unfaithful_recomputation_is_caught(base):
    loss0, grads0, _ = _loss_grads_saved(base, "llama", (), plant=_unfaithful_attention)
    loss1, grads1, _ = _loss_grads_saved(base, "llama", ("attn", "mlp"), plant=_unfaithful_checkpointed_attention)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)  # same forward; only the recomputed one differs
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))


def _norm_backward_without_rstd_term(grad_x, h, weight, rstd):
    return (rstd * grad_x.float() * weight.float()).to(h.dtype)


def test_fused_mlp_is_used_and_a_planted_backward_bug_is_caught(base, monkeypatch):
    cfg, path, _batch = base
    model = load_qlora_model(path, cfg)
    qlora_patched.patch_model(model, recompute=("mlp",))
    assert all(layer._twinbench_fused_mlp for layer in model.get_base_model().model.layers)
    _loss, grads0, _ = _loss_grads_saved(base, "llama", ())
    monkeypatch.setattr(qlora_recompute, "rms_norm_backward", _norm_backward_without_rstd_term)
    _loss, grads1, _ = _loss_grads_saved(base, "llama", ("mlp",))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="unknown recompute blocks"):
        qlora_recompute.patch_decoder_layers(torch.nn.Module(), ["everything"])


def test_layers_with_a_bias_or_attention_dropout_are_not_fused(base):
    """The fused ops compute x W^T and the adapters only: a base bias (or attention dropout) must keep
    peft's / the checkpoint path, not be silently dropped."""
    from twinbench.impls.qlora.attention_op import fusable_attention

    cfg, path, _batch = base
    model = load_qlora_model(path, cfg)
    layer = model.get_base_model().model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert fusable_attention(layer.input_layernorm, attn)
    assert qlora_recompute._fusable_mlp(layer.post_attention_layernorm, mlp)
    assert qlora_patched._is_lora_nf4(attn.q_proj)
    attn.attention_dropout = 0.1
    assert not fusable_attention(layer.input_layernorm, attn)
    attn.attention_dropout = 0.0
    attn.v_proj.base_layer.bias = torch.nn.Parameter(torch.zeros(attn.v_proj.base_layer.out_features))
    mlp.up_proj.base_layer.bias = torch.nn.Parameter(torch.zeros(mlp.up_proj.base_layer.out_features))
    assert not fusable_attention(layer.input_layernorm, attn)
    assert not qlora_recompute._fusable_mlp(layer.post_attention_layernorm, mlp)
    assert not qlora_patched._is_lora_nf4(attn.v_proj) and qlora_patched._is_lora_nf4(attn.q_proj)


def test_nf4_panels_are_the_same_slices_of_the_dequantised_weight(base):
    """Row and column panels of an NF4 weight (double-quantised scales) dequantise bit-identically to the
    same slices of the whole weight: the panelled MLP multiplies by exactly the reference's numbers."""
    from twinbench.impls.qlora.nf4_lora import NF4Panels, dequantized

    cfg, path, _batch = base
    mlp = load_qlora_model(path, cfg).get_base_model().model.layers[0].mlp
    for name in ("gate_proj", "down_proj"):
        packed, quant, *_ = qlora_recompute.lora_parts(getattr(mlp, name))
        whole = dequantized([(packed, quant)], torch.float32)
        panels = NF4Panels((packed, quant), torch.float32)
        n, k = whole.shape
        assert torch.equal(panels.rows(64, n), whole[64:]) and torch.equal(panels.rows(0, n), whole)
        assert torch.equal(panels.cols(64, k), whole[:, 64:]) and torch.equal(panels.cols(0, 64), whole[:, :64])


def test_panelled_mlp_with_o_projection_keeps_loss_and_gradients_and_saves_less(base, monkeypatch):
    """The MLP op in several intermediate-dim panels, with the attention's o_proj moved into it
    (``attn_out``): same loss and LoRA gradients as keeping every activation, fewer bytes saved than
    without ``attn_out``; dropping a panel (planted) is caught."""
    loss0, grads0, _ = _loss_grads_saved(base, "llama", ())
    monkeypatch.setattr(qlora_recompute, "PANEL_ELEMENTS", 64 * 256)  # tiny llama: 256 tokens -> 4 panels
    assert len(qlora_recompute.panel_bounds(256, 256, 64, qlora_recompute.PANEL_ELEMENTS)) == 4
    _loss, _grads, saved_mid = _loss_grads_saved(base, "llama", ("attn", "mlp"))
    loss1, grads1, saved1 = _loss_grads_saved(base, "llama", ("attn", "mlp", "attn_out"))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads1, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))
    # one [tokens, hidden] fp32 tensor (131 KB at tiny llama) less per layer: the residual between the blocks
    assert saved_mid - saved1 >= 2 * 256 * 128 * 4 * 0.95, (saved_mid, saved1)
    bounds = qlora_recompute.panel_bounds
    monkeypatch.setattr(qlora_recompute, "panel_bounds", lambda *a: bounds(*a)[:-1])
    _loss, grads2, _ = _loss_grads_saved(base, "llama", ("attn", "mlp", "attn_out"))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads2, grads0, rtol=0, atol=1e-6 * float(grads0.abs().max()))


def test_probe_thread_takes_its_per_thread_buffers_along():
    """The bench runs the probe in its own thread so that a per-thread scratch buffer the generation path
    allocates (the NF4 GEMM workspace) is not left behind and charged to the training loop; a value
    comes back, an error is re-raised."""
    import threading

    from twinbench.impls.qlora.bench import in_own_thread

    local = threading.local()

    def probe_like():
        local.buffer = torch.empty(16)
        return 7

    assert in_own_thread(probe_like) == 7
    assert not hasattr(local, "buffer")  # run in this thread (planted), the buffer would stay

    def fails():
        raise ValueError("probe failed")

    with pytest.raises(ValueError, match="probe failed"):
        in_own_thread(fails)
