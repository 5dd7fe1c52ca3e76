"""Impls of the mx_linear suite (suites/mx_linear.py holds the data contract).

``gemm``: ``x_codes, x_scales, x_global, w_codes, w_scales, w_global`` + static ``format, k, out_dtype``;
``quantize``: ``x`` + ``format`` -> ``{"codes", "scales", "global_scale"}``. An impl declares the ops and
formats it does through ``supports`` and returns ``"metrics": {"execution": "native" | "emulated"}``.
Files named ``triton_*.py`` here are the Triton MXFP4 GEMMs'.
"""
