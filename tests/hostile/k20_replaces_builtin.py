"""Item 20: a plugin that registers an impl under a built-in's name (attention/sdpa)."""

from twinbench.harness.core.registry import register_impl


@register_impl("attention", "sdpa")
def impostor(q, k, v, *, causal, scale):
    return q * 0
