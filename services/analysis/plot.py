"""`gymbus compare --plot`: learning curves with their bands, one per configuration, as a PNG.

matplotlib with the Agg backend (no display needed); imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: figure size in inches, and dots per inch: 1500 x 900 pixels
FIGSIZE = (10.0, 6.0)
DPI = 150


def plot_curves(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Draw each configuration's IQM curve and 95% band against environment steps into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    try:
        for i, conf in enumerate(result["configurations"]):
            curve = conf["curve"]
            color = f"C{i % 10}"
            label = f"{conf['label']}: {conf['describe']} ({len(conf['runs'])} runs)"
            if len(curve["steps"]) == 1:  # runs too short to share more than one point
                ax.errorbar(curve["steps"], curve["iqm"],
                            yerr=[[curve["iqm"][0] - curve["low"][0]],
                                  [curve["high"][0] - curve["iqm"][0]]],
                            fmt="o", color=color, label=label, capsize=4)
                continue
            ax.plot(curve["steps"], curve["iqm"], color=color, linewidth=2, label=label)
            ax.fill_between(curve["steps"], curve["low"], curve["high"], color=color,
                            alpha=0.15, linewidth=0)
            for edge in ("low", "high"):  # overlapping bands stay told apart by their edges
                ax.plot(curve["steps"], curve[edge], color=color, linewidth=0.8,
                        linestyle="--", alpha=0.8)
        ax.set_xlabel("environment steps")
        # 1,500,000 rather than 1.5 and an offset "1e6" in the corner
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        smooth = result.get("smooth", 1)
        ax.set_ylabel("episode return (IQM across seeds"
                      + (f", mean of {smooth} episodes)" if smooth > 1 else ")"))
        ax.set_title(title or f"learning curves: IQM with {result['confidence']:.0%} "
                              "stratified bootstrap band")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.savefig(path)
    finally:
        plt.close(fig)
