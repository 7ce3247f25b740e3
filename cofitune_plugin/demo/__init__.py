"""Embedded demo assets: SmolLM2-135M-Instruct from a PyPI wheel and a synthetic math speciality."""
