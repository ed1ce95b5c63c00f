"""`gymbus keys`: make the CURVE certificates of a stack and print the variables that use them.

Layout of the folder (default `$GYMBUS_HOME/keys`):

    server.key          the services' public certificate: every host needs it
    server.key_secret   the services' secret certificate: broker, controller and ingest hosts only
    client.key          a client's public certificate (a copy is in authorized/)
    client.key_secret   a client's secret certificate: workers and the CLI
    authorized/         public certificates of the clients the services admit

    NAME.key, NAME.key_secret   a client pair with a role (`gymbus keys --role ROLE --name NAME`)

More clients: `gymbus keys --role worker|submitter|reader [--name NAME]` adds a pair whose role
is written into its certificate's metadata (shared/roles.py) and admits it; or make a pair
elsewhere (`gymbus keys --dir OTHER`) and copy its `client.key` into `authorized/` under any name
ending in `.key`. The services read new ones at once. A key without a role has full access.
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
from gymbus.shared.roles import PURPOSE, Role, with_role
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


def make_role_key(directory: Path, role: Role, name: str | None = None,
                  force: bool = False) -> dict[str, dict[str, str]]:
    """Add a client pair of `role` (named `name`, default the role's name) to an existing key
    folder and admit it; the variables for each side, the clients' naming the new pair.

    Refuses (SecurityError) without the services' pair, for a name that is not a plain file name
    or is `server`, and to replace a pair of that name unless `force`.
    """
    directory = directory.expanduser().resolve()
    name = name or role.value
    if name in (SERVER, "") or Path(name).name != name or name.startswith("."):
        raise SecurityError(f"--name {name!r}: give a plain file name other than {SERVER!r}")
    files = key_files(directory)
    if not files["server_public"].is_file() or not files["authorized"].is_dir():
        raise SecurityError(f"no services' keys in {directory}: run `gymbus keys` first "
                            "(without --role)")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if (public.exists() or secret.exists()) and not force:
        raise SecurityError(f"keys named {name!r} exist already in {directory}; --force "
                            "replaces them (the old pair is then refused)")
    try:
        for path in (public, secret):
            if path.is_file():
                path.unlink()
        zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        for path in (public, secret):
            path.write_text(with_role(path.read_text(encoding="utf-8"), role), encoding="utf-8")
        shutil.copy(public, files["authorized"] / f"{name}.key")
    except OSError as exc:
        raise SecurityError(f"cannot write keys to {directory}: {exc}") from None
    env = environment(directory)
    env["clients"]["GYMBUS_CURVE_SECRET"] = str(secret)
    return env


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
@click.option("--role", type=click.Choice([r.value for r in Role]),
              help="Add a client pair of this role to the folder (worker: "
                   f"{PURPOSE[Role.WORKER]}; submitter: {PURPOSE[Role.SUBMITTER]}; reader: "
                   f"{PURPOSE[Role.READER]}). Without it: the services' pair and a client pair "
                   "with full access.")
@click.option("--name", help="File name of the --role pair (default: the role).")
@json_option
@click.pass_obj
def keys(obj: Context, directory: Path | None, force: bool, role: str | None, name: str | None,
         as_json: bool) -> None:
    """Make CURVE key pairs for the services and for clients, and print the variables to set.

    With them set, every socket authenticates and encrypts, and a peer without an authorized key
    is refused and logged. A pair made with --role may do only what its role allows; the others
    have full access (docs/security.md).
    """
    target = directory if directory is not None else obj.settings.home / "keys"
    try:
        if role is not None:
            env = make_role_key(target, Role(role), name, force)
        elif name is not None:
            raise SecurityError("--name names a --role pair: give --role too")
        else:
            env = make_keys(target, force)
    except GymbusError as exc:
        fail(exc)
        return
    if as_json:
        click.echo(json.dumps({"dir": str(target.expanduser().resolve()), "role": role, **env},
                              indent=2))
        return
    click.echo(f"# keys written to {target.expanduser().resolve()}"
               + (f" (role {role}: {PURPOSE[Role(role)]})" if role else ""))
    clients = (f"the {role} client" if role
               else "workers, run processes and the gymbus command")
    for side, title in (("services", "broker, controller and ingest"), ("clients", clients)):
        click.echo(f"# {title}:")
        for variable, value in env[side].items():
            click.echo(f"export {variable}={value}")
