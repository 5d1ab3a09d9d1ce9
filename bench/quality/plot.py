"""The figure of bench/upcycle_quality.py: held-out loss vs continuation step, and vs extra training FLOPs."""

from __future__ import annotations

from pathlib import Path

COLORS = {"dense": "tab:gray", "upcycled": "tab:blue", "drop": "tab:orange", "dense_eqflops": "black"}


def _mean_curve(seeds: dict) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = sorted(set.intersection(*[{s for s, _ in v["curve"]} for v in seeds.values()]))
    cols = [[dict(v["curve"])[s] for v in seeds.values()] for s in steps]
    return steps, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_upcycle(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = res["pretrain"]["heldout_loss"]["value"]
    tokens_per_step = res["config"]["mbs"] * res["config"]["seq"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, r in res["arms"].items():
        steps, mean, lo, hi = _mean_curve(r["seeds"])
        s0 = [v["start_loss"] for v in r["seeds"].values()]
        steps, mean, lo, hi = [0] + steps, [sum(s0) / len(s0)] + mean, [min(s0)] + lo, [max(s0)] + hi
        per_step = r["extra_train_flops"] / r["steps"]
        kw = dict(color=COLORS.get(arm), label=f"{r['label']}: {mean[0]:.3f} -> {r['heldout_loss_mean']:.4f}")
        for ax, xs in ((axes[0], steps), (axes[1], [s * per_step for s in steps])):
            ax.plot(xs, mean, marker="o", ms=3, **kw)
            ax.fill_between(xs, lo, hi, color=kw["color"], alpha=0.2, lw=0)
    n = len(res["config"]["seeds"])
    axes[0].set_xlabel(f"continuation step ({tokens_per_step} tokens each)")
    axes[1].set_xlabel("extra training FLOPs after the dense checkpoint")
    for ax in axes:
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    pts = [v for r in res["arms"].values() for s in r["seeds"].values() for _, v in s["curve"]] + [start]
    for ax in axes:  # the trained curves fill the plot; a start far above them (Drop-Upcycling) is off the top
        ax.set_ylim(min(pts) - 0.01, max(pts) + 0.01)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sparse upcycling vs dense continuation ({res['size']} size; mean of {n} seeds, band = min..max; "
                 f"dense checkpoint: {res['pretrain']['steps']} steps, held-out {start:.3f}; legend: step 0 -> "
                 f"final)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
