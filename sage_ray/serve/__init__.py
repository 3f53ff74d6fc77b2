"""Serving: LLM engines (sage_ray.serve.engines) and the Ray Serve Studio app.

Kept import-free so that `import sage_ray.serve` never pulls torch, Ray or vLLM.
"""
