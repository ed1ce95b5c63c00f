"""`gymbus compare GROUP | RUN...`: runs grouped by configuration, compared across their seeds.

Final performance as mean, median and IQM with 95% stratified bootstrap intervals (rliable), and
learning curves (IQM across seeds at common environment steps, with a 95% band): as a table, as
JSON, as a PNG (`--plot`). The statistics live in `gymbus.services.analysis`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from gymbus.services.analysis import compare as model
from gymbus.services.analysis import stats
from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option

#: width of a configuration's curve drawn in the table
SPARK_WIDTH = 24


def gather(obj: Context, targets: tuple[str, ...]) -> list[model.Configuration]:
    """The named runs with their episodes, grouped by configuration; a note on stderr names
    the runs left out for want of episodes."""
    confs, empty = model.gather(obj.controller, obj.store, targets)
    if empty:
        click.echo(f"note: left out {len(empty)} run(s) without stored episodes: "
                   f"{', '.join(empty)}", err=True)
    return confs


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="GROUP | RUN...")
@click.option("--last", type=click.IntRange(min=1), default=model.DEFAULT_LAST,
              show_default=True, help="Final performance: the mean return of each run's last N "
              "episodes.")
@click.option("--points", type=click.IntRange(min=2), default=model.DEFAULT_POINTS,
              show_default=True, help="Step points of the learning curves.")
@click.option("--smooth", type=click.IntRange(min=1), default=model.DEFAULT_SMOOTH,
              show_default=True, help="Curves: each return averaged with the episodes before "
              "it, over this many.")
@click.option("--reps", type=click.IntRange(min=1), default=stats.DEFAULT_REPS,
              show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=stats.DEFAULT_SEED, show_default=True,
              help="Seed of the bootstrap (the same seed gives the same intervals).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the learning curves into this PNG file.")
@json_option
@click.pass_obj
def compare(obj: Context, targets: tuple[str, ...], last: int, points: int, smooth: int,
            reps: int, seed: int, plot_path: Path | None, as_json: bool) -> None:
    """Compare runs across seeds: GROUP (a sweep's group id) or RUN ids. Runs whose configs
    differ only in seed, name and tags are seeds of one configuration; each configuration gets
    its final performance (mean, median, IQM with 95% stratified bootstrap intervals) and a
    learning curve (IQM across seeds per step, with a 95% band)."""
    confs = gather(obj, targets)
    click.echo(f"bootstrapping {len(confs)} configuration(s), {reps} resamples ...", err=True)
    result = model.compare(confs, last=last, points=points, smooth=smooth, reps=reps, seed=seed)
    if plot_path is not None:
        from gymbus.services.analysis.plot import plot_curves

        plot_curves(result, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if as_json:
        out.emit_json(result)
        return
    click.echo(render(result))


def _decimals(values: list[float]) -> int:
    """Decimals that show every value of a table alike: 3 for returns below 10, fewer above
    (four significant figures of the largest)."""
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return 3 if largest < 10 else 2 if largest < 100 else 1 if largest < 1000 else 0


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _interval(est: dict[str, float], decimals: int) -> str:
    return f"[{_number(est['low'], decimals)}, {_number(est['high'], decimals)}]"


def render(result: dict[str, Any]) -> str:
    """The comparison for people, within 80 columns: the configurations, their final
    performance, their curves."""
    confs = result["configurations"]
    lines = [f"{len(confs)} configuration(s)"]
    for conf in confs:
        lines.append(f"  {conf['label']}  {len(conf['runs'])} runs  {conf['describe']}")
    last = result["last"]
    lines += ["", f"final performance: the mean return of each run's last {last} episodes"]
    places = _decimals([est[key] for conf in confs for est in conf["final"].values()
                        for key in ("value", "low", "high")]
                       + [v for conf in confs for v in conf["curve"]["high"]])
    rows = []
    for conf in confs:
        for i, name in enumerate(stats.AGGREGATES):
            est = conf["final"][name]
            rows.append([conf["label"] if i == 0 else "", "IQM" if name == "iqm" else name,
                         _number(est["value"], places), _interval(est, places)])
    lines += ["", out.table(["CONF", "AGGREGATE", "ESTIMATE",
                             f"{result['confidence']:.0%} CI (stratified bootstrap)"], rows)]
    lines += ["", "learning curves: IQM across seeds over environment steps"]
    curve_rows = []
    for conf in confs:
        curve = conf["curve"]
        curve_rows.append([conf["label"], out.sparkline(curve["iqm"], SPARK_WIDTH),
                           f"{curve['steps'][-1]:,.0f}", _number(curve["iqm"][-1], places),
                           _interval({"low": curve["low"][-1], "high": curve["high"][-1]},
                                     places)])
    lines.append(out.table(["CONF", "CURVE", "AT STEP", "IQM", "95% CI"], curve_rows))
    for conf in confs:
        for run in conf["runs"]:
            if run["episodes"] < result["last"]:
                lines.append(f"note: run {run['run_id']} ({conf['label']}) has only "
                             f"{run['episodes']} episodes")
    return "\n".join(lines)
