"""The `gymbus export` command: stored runs as Parquet or CSV files per table, or as Minari
datasets.

Registered in main.py. Read through the `Context`'s `StoreClient` (the ingest's Arrow replies,
or the DuckDB file read-only when no ingest answers); the work is in
`gymbus.services.ingest.export` and `gymbus.services.ingest.to_minari`. Progress goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@click.argument("run_ids", nargs=-1)
@click.option("--group", help="Every stored run of this group instead of run ids.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "minari"]),
              default="parquet", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write into (created if missing).")
@json_option
@click.pass_obj
def export(obj: Context, run_ids: tuple[str, ...], group: str | None, fmt: str, out_dir: Path,
           as_json: bool) -> None:
    """Stored runs as files: Parquet or CSV, one dataset per table partitioned by run
    (OUT/steps/run_id=.../part-0.parquet), or one Minari dataset per run
    (MINARI_DATASETS_PATH=OUT, minari.load_dataset("gymbus/<run id>-v0")). Read through the
    ingest while it runs, else from the DuckDB file read-only."""
    from gymbus.services.ingest.export import export_tables, resolve_runs

    if run_ids and group:
        raise click.UsageError("give run ids or --group, not both")
    runs = resolve_runs(obj.store, list(run_ids), group)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "minari":
        from gymbus.services.ingest.to_minari import export_minari

        datasets = [export_minari(obj.store, run_id, out_dir, _progress) for run_id in runs]
        if as_json:
            out.emit_json({"format": "minari", "out": str(out_dir), "datasets": datasets})
            return
        click.echo(out.table(["RUN", "DATASET", "EPISODES", "STEPS", "LEFT OUT", "MB"],
                             [[d["run_id"], d["dataset_id"], d["episodes"], d["steps"],
                               d["left_out"], f"{d['bytes'] / 1e6:.1f}"] for d in datasets]))
        click.echo(f"load with MINARI_DATASETS_PATH={out_dir}\n"
                   f"  minari.load_dataset({datasets[0]['dataset_id']!r})")
        return
    done = export_tables(obj.store, runs, out_dir, fmt, _progress)
    summary: dict[str, Any] = done.to_json()
    if as_json:
        out.emit_json(summary)
        return
    click.echo(out.table(["TABLE", "ROWS"], [[t, n] for t, n in done.rows.items()]))
    click.echo(f"{len(runs)} run(s), {done.files} files, {done.bytes / 1e6:.1f} MB in "
               f"{out_dir} ({done.seconds:.1f} s)")
