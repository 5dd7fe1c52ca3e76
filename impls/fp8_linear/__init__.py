"""Impls of the fp8_linear suite (suites/fp8_linear.py holds the data contract).

An impl is called with the inputs of one ``op`` and declares which ops it does through ``supports``:
``gemm``: ``x_codes, x_scale, w_codes, w_scale`` + static ``x_format, w_format, scaling, out_dtype``;
``quantize``: ``x`` + ``x_format, scaling, saturate`` -> ``{"codes", "scale"}``;
``qgemm``: ``x, w_codes, w_scale`` + ``x_format, grad_format, w_format, scaling, saturate, out_dtype``.
Each returns ``{"out": ..., "metrics": {"execution": "native" | "emulated", ...}}`` (or the quantize
mapping plus ``metrics``), so the record says which path ran. Files named ``triton_*.py`` here are the
Triton FP8 GEMMs'.
"""
