"""Helpers of bench/upcycle_quality.py and bench/upit_quality.py (corpus, tokenizer, model presets, runs, plot,
specialisation view)."""
