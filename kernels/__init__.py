"""Triton kernels, each with a pure-torch twin of the same signature; `backend` picks one per call."""
