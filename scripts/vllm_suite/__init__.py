"""The vLLM CPU conformance suite, step by step (driven by scripts/vllm_conformance.py)."""
