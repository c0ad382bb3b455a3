"""loradex benchmarks: serving, training and the catalog measured side by side, in one run.

Run ``python -m benchmarks.run [--quick] [--only NAME] [--out bench-results/latest.json]``
from the repository root; see ``docs/benchmarks.md`` for what each benchmark
measures and how to read its lines.
"""
