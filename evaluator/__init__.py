"""`grape evaluator`: runs queued evaluations with lm-evaluation-harness (the only package that imports lm_eval)."""
