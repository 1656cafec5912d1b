"""Serving: the Ray Serve app (OpenAI ingress, engine-replica pool), its config and the CLI.

Ray, Serve and FastAPI are imported only where used, so the engine packages stay importable
without them.
"""
