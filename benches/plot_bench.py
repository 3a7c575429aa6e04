#!/usr/bin/env python3
"""Plot a run_bench.py result: horizontal stacked bars of median time per phase.

    python benches/plot_bench.py RESULT.json [--out benches/plots/<name>.png]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ["load", "forward_and_grams", "solve", "write"]
COLORS = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"]
IMPLS = ["regmean-gpu", "fusionbench", "skilled"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    res = json.loads(Path(args.result).read_text())
    med = res["median"]
    impls = [i for i in IMPLS if i in med]
    out = Path(args.out) if args.out else \
        Path(__file__).resolve().parent / "plots" / (Path(args.result).stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(impls)))
    y = list(range(len(impls)))[::-1]
    left = [0.0] * len(impls)
    for phase, color in zip(PHASES, COLORS):
        widths = [med[i][phase] for i in impls]
        ax.barh(y, widths, left=left, color=color, label=phase, edgecolor="white")
        left = [l + w for l, w in zip(left, widths)]
    for yi, impl, l in zip(y, impls, left):
        ax.text(l, yi, f"  {med[impl]['total_s']:.1f} s (wall {med[impl]['wall_s']:.1f} s)",
                va="center", fontsize=9)
    ax.set_yticks(y)
    ax.set_yticklabels(impls)
    ax.set_xlabel("median seconds (in-process phases)")
    ax.set_xlim(0, max(left) * 1.35)
    sp = res.get("speedup_vs_fusionbench")
    sk = res.get("speedup_vs_skilled")
    ax.set_title(f"RegMean {res['workload']} on {res['device']}, {res['threads']} threads, "
                 f"{res['date'][:10]}  (speed-up {sp:.2f}x vs fusionbench, "
                 f"{sk:.2f}x vs skilled)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, ncol=len(PHASES))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
