"""`gymbus keys`: make the CURVE certificates of a stack and print the variables that use them.

Layout of the folder (default `$GYMBUS_HOME/keys`):

    server.key          the services' public certificate: every host needs it
    server.key_secret   the services' secret certificate: broker, controller and ingest hosts only
    client.key          a client's public certificate (a copy is in authorized/)
    client.key_secret   a client's secret certificate: workers and the CLI
    authorized/         public certificates of the clients the services admit

More clients: make another pair (`gymbus keys --dir OTHER`) and copy its `client.key` into this
folder's `authorized/` under any name ending in `.key`; the services read new ones at once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import zmq.auth

from gymbus.services.cli.context import Context, fail, json_option
from gymbus.shared.errors import GymbusError
from gymbus.shared.security import SecurityError

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"


def key_files(directory: Path) -> dict[str, Path]:
    """Where `make_keys` puts each file."""
    return {
        "server_public": directory / f"{SERVER}.key",
        "server_secret": directory / f"{SERVER}.key_secret",
        "client_public": directory / f"{CLIENT}.key",
        "client_secret": directory / f"{CLIENT}.key_secret",
        "authorized": directory / AUTHORIZED,
    }


def make_keys(directory: Path, force: bool = False) -> dict[str, dict[str, str]]:
    """Write a services pair and a client pair under `directory`; the variables for each side.

    Refuses (SecurityError) to replace existing keys unless `force`: running services and
    workers would stop trusting each other.
    """
    directory = directory.expanduser().resolve()
    files = key_files(directory)
    existing = [str(p) for name, p in files.items() if name != "authorized" and p.exists()]
    if existing and not force:
        raise SecurityError(f"keys exist already ({', '.join(existing)}); --force replaces them, "
                            "and every service and worker must then be restarted with the new ones")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        for path in files.values():
            if path.is_file():
                path.unlink()
        if files["authorized"].exists():
            shutil.rmtree(files["authorized"])
        for name in (SERVER, CLIENT):
            zmq.auth.create_certificates(directory, name)
        for name in ("server_secret", "client_secret"):
            os.chmod(files[name], 0o600)
        files["authorized"].mkdir()
        shutil.copy(files["client_public"], files["authorized"] / f"{CLIENT}.key")
    except OSError as exc:
        raise SecurityError(f"cannot write keys to {directory}: {exc}") from None
    return environment(directory)


def environment(directory: Path) -> dict[str, dict[str, str]]:
    """The GYMBUS_CURVE_* variables of the services and of the clients for a key folder."""
    files = key_files(directory)
    return {
        "services": {
            "GYMBUS_CURVE_SECRET": str(files["server_secret"]),
            "GYMBUS_CURVE_SERVER": str(files["server_public"]),
            "GYMBUS_CURVE_AUTHORIZED": str(files["authorized"]),
        },
        "clients": {
            "GYMBUS_CURVE_SECRET": str(files["client_secret"]),
            "GYMBUS_CURVE_SERVER": str(files["server_public"]),
        },
    }


@click.command("keys")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the certificates (default: $GYMBUS_HOME/keys).")
@click.option("--force", is_flag=True, help="Replace keys that exist already.")
@json_option
@click.pass_obj
def keys(obj: Context, directory: Path | None, force: bool, as_json: bool) -> None:
    """Make CURVE key pairs for the services and for clients, and print the variables to set.

    With them set, every socket authenticates and encrypts, and a peer without an authorized key
    is refused and logged (docs/security.md).
    """
    target = directory if directory is not None else obj.settings.home / "keys"
    try:
        env = make_keys(target, force)
    except GymbusError as exc:
        fail(exc)
        return
    if as_json:
        click.echo(json.dumps({"dir": str(target.expanduser().resolve()), **env}, indent=2))
        return
    click.echo(f"# keys written to {target.expanduser().resolve()}")
    for side, title in (("services", "broker, controller and ingest"),
                        ("clients", "workers, run processes and the gymbus command")):
        click.echo(f"# {title}:")
        for name, value in env[side].items():
            click.echo(f"export {name}={value}")
