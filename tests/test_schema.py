"""The column schema drives both sides: what the codec accepts and what the store creates and fills."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gymbus.services.ingest.store import Store
from gymbus.shared import codec, schema
from gymbus.shared.codec import decode_frame, encode_frame
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import FrameKind
from gymbus.shared.schema import FRAME_COLUMNS, Column, Type

RUN = "01JD3Q6R8W4Y2M5N7P9QAZBXCE"
T0_NS = 1_700_000_000_123_456_789
#: two rows of values of each column type
SAMPLES: dict[Type, list[Any]] = {
    Type.INT: [3, -4], Type.FLOAT: [0.5, -1.0], Type.BOOL: [True, False], Type.STR: ["a", "b"],
    Type.OBS: [5, 6], Type.TIME: [T0_NS, T0_NS + 1000],
}
KINDS = list(FRAME_COLUMNS)
TIME_COLUMNS = [(kind, c.name) for kind in KINDS for c in FRAME_COLUMNS[kind] if c.type is Type.TIME]


def body_of(kind: FrameKind, leave_out: str | None = None) -> dict[str, Any]:
    """A two-row body with every column the schema declares for `kind` (but `leave_out`)."""
    return {c.name: SAMPLES[c.type] for c in FRAME_COLUMNS[kind] if c.name != leave_out}


def decode(kind: FrameKind, body: dict[str, Any], seq: int = 0) -> codec.Frame:
    parts = encode_frame(kind, RUN, seq, body, agent_id="agent-0", worker_id="w1", ts_ns=T0_NS)
    return decode_frame(list(parts))


def stored_values(column: Column, values: list[Any]) -> dict[str, list[Any]]:
    """What the store's columns for `column` hold after storing `values` (TIMESTAMPs in ns)."""
    names = [name for name, _ in schema.stored_columns(column)]
    if column.type is Type.OBS:
        return {names[0]: values, names[1]: [None] * len(values)}
    if column.type is Type.TIME:
        return {names[0]: [v // 1000 * 1000 for v in values]}
    return {names[0]: values}


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_codec_accepts_exactly_the_schema_columns(kind: FrameKind) -> None:
    frame = decode(kind, body_of(kind))
    assert list(frame.body) == list(schema.column_names(kind))
    assert frame.rows == 2
    for column in FRAME_COLUMNS[kind]:
        if column.optional:
            assert column.name not in decode(kind, body_of(kind, leave_out=column.name)).body
        else:
            with pytest.raises(DecodeError, match=f"{kind.value} body lacks column '{column.name}'"):
                decode(kind, body_of(kind, leave_out=column.name))
    for name in schema.FRAME_SCALARS[kind]:
        assert decode(kind, {**body_of(kind), name: T0_NS}).body[name] == T0_NS


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_column_not_in_the_schema_is_refused_naming_it(kind: FrameKind) -> None:
    with pytest.raises(DecodeError, match=f"^{kind.value} body has unknown fields: colour$"):
        decode(kind, {**body_of(kind), "colour": ["red", "blue"]})


@pytest.mark.parametrize(("kind", "name"), TIME_COLUMNS, ids=str)
def test_a_time_column_is_checked_as_an_integer(kind: FrameKind, name: str) -> None:
    with pytest.raises(DecodeError, match=f"^{kind.value} column '{name}' must hold 64-bit integ"):
        decode(kind, {**body_of(kind), name: [1.5, 2.5]})


def test_a_fresh_store_has_the_tables_the_schema_declares(tmp_path: Path) -> None:
    path = tmp_path / "gymbus.duckdb"
    Store(path).close()
    with duckdb.connect(str(path), read_only=True) as conn:
        found = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position").fetchall()
        keys = conn.execute("SELECT table_name, constraint_column_names FROM duckdb_constraints() "
                            "WHERE constraint_type = 'PRIMARY KEY'").fetchall()
    declared = [(table, name, sql.split()[0])
                for table, columns in sorted(schema.TABLES.items()) for name, sql in columns]
    assert found == declared
    assert sorted(keys) == sorted((table, [name]) for table, columns in schema.TABLES.items()
                                  for name, sql in columns if "PRIMARY KEY" in sql)
    for kind, table in schema.FRAME_TABLES.items():
        stored = [name for column in FRAME_COLUMNS[kind] for name, _ in schema.stored_columns(column)]
        assert [name for t, name, _ in found if t == table] == [
            *(name for name, _ in schema.FRAME_HEADER), *stored]


def test_every_schema_column_is_stored_in_its_frame_table(tmp_path: Path) -> None:
    store = Store(tmp_path / "gymbus.duckdb")
    try:
        for seq, kind in enumerate(KINDS):
            assert store.add(decode(kind, body_of(kind), seq))
        store.flush()
        for seq, kind in enumerate(KINDS):
            expected: dict[str, list[Any]] = {"run_id": [RUN] * 2, "seq": [seq] * 2,
                                              "agent_id": ["agent-0"] * 2}
            for column in FRAME_COLUMNS[kind]:
                expected.update(stored_values(column, SAMPLES[column.type]))
            types = dict(schema.TABLES[schema.FRAME_TABLES[kind]])
            select = ", ".join(f'epoch_ns("{n}")' if types[n] == "TIMESTAMP" else f'"{n}"'
                               for n in expected)
            got = store.cursor().execute(
                f"SELECT {select} FROM {schema.FRAME_TABLES[kind]} WHERE seq = ? "
                "ORDER BY rowid", [seq]).fetchall()
            assert got == list(zip(*expected.values(), strict=True)), kind
    finally:
        store.close()


#: run in a fresh interpreter: schema.py (argv[1]) is loaded with one more line in it, an
#: optional FLOAT column of steps, before anything imports it; then a step frame with that
#: column goes through the codec into a store (argv[2])
ADDED_COLUMN = textwrap.dedent('''
    import importlib.machinery, importlib.util, json, sys
    from pathlib import Path

    SCHEMA, LINE = sys.argv[1], '        Column("label", Type.STR, optional=True),\\n'

    class AddedColumn(importlib.machinery.SourceFileLoader):
        def get_code(self, fullname):
            source = Path(SCHEMA).read_text()
            if source.count(LINE) != 1:
                sys.exit("the steps columns in schema.py no longer end with the label column")
            added = LINE + '        Column("energy", Type.FLOAT, optional=True),\\n'
            return compile(source.replace(LINE, added), SCHEMA, "exec")

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "gymbus.shared.schema":
                return None
            return importlib.util.spec_from_file_location(name, SCHEMA,
                                                          loader=AddedColumn(name, SCHEMA))

    sys.meta_path.insert(0, Finder)
    from gymbus.services.ingest.store import Store
    from gymbus.shared.codec import decode_frame, encode_frame
    from gymbus.shared.protocol import FrameKind

    body = json.loads(sys.argv[3])
    store = Store(Path(sys.argv[2]))
    for seq, energy in enumerate(([0.25, 0.75], None)):
        sent = {**body, "energy": energy} if energy else body
        store.add(decode_frame(list(encode_frame(FrameKind.STEP, "run-1", seq, sent))))
    store.close()
''')


def test_adding_a_column_to_the_schema_is_enough_for_codec_and_store(tmp_path: Path) -> None:
    body = body_of(FrameKind.STEP)
    with pytest.raises(DecodeError, match="unknown fields: energy"):
        decode(FrameKind.STEP, {**body, "energy": [0.25, 0.75]})
    path = tmp_path / "gymbus.duckdb"
    done = subprocess.run([sys.executable, "-c", ADDED_COLUMN, schema.__file__, str(path),
                           json.dumps(body)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(path), read_only=True) as conn:
        columns = conn.execute("DESCRIBE steps").fetchall()
        energy = conn.execute("SELECT energy FROM steps ORDER BY seq, rowid").fetchall()
    names = [(name, typ) for name, typ, *_ in columns]
    at = names.index(("label", "VARCHAR"))
    assert names[at + 1] == ("energy", "DOUBLE")
    assert energy == [(0.25,), (0.75,), (None,), (None,)]


def test_a_file_from_before_a_column_was_added_gets_it(tmp_path: Path) -> None:
    """An existing file whose tables lack a column of the schema gets it when the store opens
    it; its old rows hold NULL, and new rows are stored by name."""
    path = tmp_path / "gymbus.duckdb"
    with duckdb.connect(str(path)) as conn:
        for table, columns in schema.TABLES.items():
            kept = [(n, s) for n, s in columns if n not in ("env_index", "backend")]
            conn.execute(f"CREATE TABLE {table} ("
                         + ", ".join(f'"{n}" {s}' for n, s in kept) + ")")
        conn.execute("INSERT INTO steps (run_id, seq, episode, step) VALUES ('old', 0, 0, 0)")
    store = Store(path)
    body = body_of(FrameKind.STEP)
    store.add(decode_frame(list(encode_frame(
        FrameKind.STEP, "new", 0, {**body, "env_index": [3] * len(body["step"])}))))
    store.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        rows = conn.execute("SELECT run_id, env_index FROM steps ORDER BY run_id").fetchall()
        runs = [c[0] for c in conn.execute("DESCRIBE runs").fetchall()]
    assert rows == [("new", 3)] * len(body["step"]) + [("old", None)]
    assert "backend" in runs
