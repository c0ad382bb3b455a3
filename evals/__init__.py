"""Evaluation stage: score adapters against their base with confidence intervals.

``evaluate(catalog, store, ref, data, ...)`` runs an eval and stores it, and
``evaluate_many(catalog, store, refs, data, ...)`` does so for several adapters in
one pass on the serving engine (:mod:`evals.run`, :mod:`evals.engine_eval`); :mod:`evals.gate` decides promotions to ``production``;
:mod:`evals.leaderboard` ranks versions; :mod:`evals.review` runs blinded human
review sheets; :mod:`evals.config` names the serving configuration (base,
quantization, dtype, device) every score was measured under, and
:func:`evals.record.scores_for_config` finds the scores that describe one. See
docs/evals.md.
"""
from loradex.evals.run import EvalConfig, evaluate, evaluate_many

__all__ = ["EvalConfig", "evaluate", "evaluate_many"]
