"""UpIT (Hui et al., 2024; docs/upit.md): dense SFT checkpoints -> experts (assemble.py), genetic expansion of the expert
pool (expand.py), perplexity-selected router seed data (seed_data.py). Router pre-training lives in router_init.py."""
