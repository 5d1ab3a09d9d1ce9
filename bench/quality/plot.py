"""The figure of bench/upcycle_quality.py: held-out loss vs continuation step and vs training FLOPs (every arm, mean
of the seeds, band = min..max), and under them, per MoE arm, where held-out tokens of each source-file type go."""

from __future__ import annotations

from pathlib import Path

COLORS = {"dense": "tab:gray", "upcycled": "tab:blue", "drop": "tab:orange", "dense_eqflops": "black",
          "dense_acc": "tab:gray", "top1": "tab:green", "granular": "tab:purple", "granular_global": "tab:red"}


def _mean_curve(seeds: dict) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = sorted(set.intersection(*[{s for s, _ in v["curve"]} for v in seeds.values()]))
    cols = [[dict(v["curve"])[s] for v in seeds.values()] for s in steps]
    return steps, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _curves(res: dict, axes) -> None:
    start = res["pretrain"]["heldout_loss"]["value"]
    tokens_per_step = res["config"]["mbs"] * res["config"]["seq"]
    for arm, r in res["arms"].items():
        steps, mean, lo, hi = _mean_curve(r["seeds"])
        s0 = [v["start_loss"] for v in r["seeds"].values()]
        steps, mean, lo, hi = [0] + steps, [sum(s0) / len(s0)] + mean, [min(s0)] + lo, [max(s0)] + hi
        per_step = r["extra_train_flops"] / r["steps"]
        kw = dict(color=COLORS.get(arm), label=f"{r['label']}: {mean[0]:.3f} -> {r['heldout_loss_mean']:.4f}")
        for ax, xs in ((axes[0], steps), (axes[1], [s * per_step for s in steps])):
            ax.plot(xs, mean, marker="o", ms=3, **kw)
            ax.fill_between(xs, lo, hi, color=kw["color"], alpha=0.2, lw=0)
    axes[0].set_xlabel(f"continuation step ({tokens_per_step} tokens each)")
    axes[1].set_xlabel("training FLOPs after the dense checkpoint (upcycle_ds.flops)")
    for ax in axes:
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    pts = [v for r in res["arms"].values() for s in r["seeds"].values() for _, v in s["curve"]] + [start]
    for ax in axes:  # the trained curves fill the plot; a start far above them (Drop-Upcycling) is off the top
        ax.set_ylim(min(pts) - 0.01, max(pts) + 0.01)
    axes[0].legend(fontsize=8)


def _specialisation(r: dict, ax, labels: bool):
    """Seed 0's trained model: rows = layer x file type, columns = experts, colour = share x E (1 = fair share)."""
    import numpy as np

    sp = r["specialisation"]
    seed = sorted(sp["seeds"], key=int)[0]
    s = sp["seeds"][seed]
    types, E = s["types"], s["experts"]
    layers = len(s["mutual_info_bits"])
    grid = np.array([[x * E for x in s["shares"][t][layer]] for layer in range(layers) for t in types])
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=3, interpolation="none")
    ax.set_yticks(range(len(grid)), [f"L{layer} {t}" if labels else "" for layer in range(layers) for t in types],
                  fontsize=6)
    for layer in range(1, layers):
        ax.axhline(layer * len(types) - 0.5, color="white", lw=0.8)
    ax.set_xlabel(f"expert (of {E})", fontsize=8)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_title(f"{r['label']}\nI(type; expert): {sp['start_mutual_info_bits_mean']:.3f} -> "
                 f"{sp['seeds_mutual_info_bits_mean']:.3f} bits", fontsize=8)
    return im


def plot_upcycle(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [arm for arm, r in res["arms"].items() if r.get("specialisation")]
    fig = plt.figure(figsize=(13, 10.5 if moe else 5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1]) if moe else (fig, None)
    _curves(res, top.subplots(1, 2))
    if bottom is not None:
        axes = bottom.subplots(1, len(moe))
        axes = axes if len(moe) > 1 else [axes]
        for i, (arm, ax) in enumerate(zip(moe, axes)):
            im = _specialisation(res["arms"][arm], ax, labels=i == 0)
        bottom.colorbar(im, ax=axes, shrink=0.8, label="share of the type's token-slots x E (1 = fair share)")
        seed = sorted(res["arms"][moe[0]]["specialisation"]["seeds"], key=int)[0]
        bottom.suptitle(f"Where held-out tokens of each source-file type go (seed {seed}, after training; mutual "
                        f"information mean over layers and seeds, start -> trained)", fontsize=9)
    n = len(res["config"]["seeds"])
    start = res["pretrain"]["heldout_loss"]["value"]
    top.suptitle(f"{res.get('suite', 'equal-steps')} suite, {res['size']} size: mean of {n} seeds, band = min..max; "
                 f"dense checkpoint {res['pretrain']['steps']} steps, held-out {start:.3f}; legend: step 0 -> final",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
