"""Serving beyond one machine: one registry, a gateway, N replicas (loradex or vLLM).

* ``fetch.py``: an adapter version from the registry into a local cache, by sha256, with
  every hash verified and vLLM's LoRA rules applied (no vLLM, torch or FastAPI imports);
* ``vllm_plugin.py``: the ``vllm.general_plugins`` entry point that registers a vLLM
  ``LoRAResolver`` built on ``fetch.py`` (install with ``pip install loradex[vllm]``);
* ``aliases.py``, ``backends.py``: the gateway's logic (alias resolution with a bound,
  adapter-affinity routing, health checks), plain Python;
* ``gateway_app.py``: the gateway's HTTP edge (FastAPI + httpx), ``cli.py``: ``loradex gateway``.

See docs/fleet.md.
"""
