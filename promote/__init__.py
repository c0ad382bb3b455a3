"""Promote and export: merge an adapter into its base and export it for vLLM, llama.cpp and Ollama.

``loradex merge`` / ``loradex export`` (``promote/cli.py``); the merge itself is
``promote/merge.py``, each export format a plain function in ``promote/export/``.
Nothing here imports the serving engine: exports are checked by running them in
their own runtimes.
"""
