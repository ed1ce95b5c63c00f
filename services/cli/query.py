"""The `gymbus query` command: read-only SQL over the stored telemetry, printed as a table, JSON
or CSV.

Registered in main.py. Answered through the `Context`'s `StoreClient`: by the ingest, or by the
DuckDB file itself (read-only) when no ingest answers.
"""

from __future__ import annotations

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_flag


@click.command()
@click.argument("sql")
@json_flag("Rows as a JSON list of objects (and errors as JSON).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows as CSV.")
@click.option("--max-rows", default=100_000, show_default=True)
@click.pass_obj
def query(obj: Context, sql: str, as_json: bool, as_csv: bool, max_rows: int) -> None:
    """Read-only SQL over the stored telemetry (tables: runs, frames, lifecycle, episodes,
    steps, metrics, dead_letters, gaps). Answered by the ingest; with no ingest running, read
    from the DuckDB file directly."""
    if as_json and as_csv:
        raise click.UsageError("--csv and --json contradict each other: give one of them")
    result = obj.store.query(sql, max_rows)
    columns, rows = result["columns"], result["rows"]
    if as_json:
        out.emit_json([dict(zip(columns, row)) for row in rows])
    elif as_csv:
        out.write_csv(columns, rows)
    else:
        click.echo(out.table(columns, rows))
    if result.get("truncated"):
        click.echo(f"warning: output cut at {max_rows} rows (--max-rows)", err=True)
