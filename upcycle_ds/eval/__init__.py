"""`upcycle-ds eval`: score HF checkpoints (dense or MoE) on multiple-choice, exact-match and held-out LM loss rows,
with standard errors, per-row predictions and paired tests between models. See docs/eval.md.

rows.py      row formats and their checks      scoring.py   log-likelihoods (training data path), generation
stats.py     standard errors, paired tests      evaluate.py  per-model results, summaries, comparisons, tables
"""
