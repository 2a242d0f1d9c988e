"""LLM traffic gateway for Envoy: an ext_proc and xDS server driven by LLMProvider/LLMRoute."""

__version__ = "0.1.0"
