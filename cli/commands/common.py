"""What the command groups share: the --url/--key/--json/--config/--data options, the admin
API client whose refusals become the CLI's error and exit code, and argument parsers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.admin_client import AdminClient, AdminError
from fieldline.cli.output import fail
from fieldline.shared.schemas import LabelError, parse_labels

DEFAULT_URL = "http://127.0.0.1:8080"

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="FIELDLINE_URL", help="Cloud admin API base URL.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", envvar="FIELDLINE_API_KEY", help="API key (bearer).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (FIELDLINE_* env vars override it)."),
]
DataEnvOpt = Annotated[
    Path,
    typer.Option("--data", envvar="FIELDLINE_DATA_DIR", help="The daemon's data directory."),
]


@contextmanager
def admin(url: str, key: str | None) -> Iterator[AdminClient]:
    """A client whose API refusals become the CLI's error message and exit code 1."""
    if not key:
        raise fail("no API key: pass --key or set FIELDLINE_API_KEY (see DATA_DIR/admin.key)", 2)
    with AdminClient(url, key) as c:
        try:
            yield c
        except AdminError as exc:
            raise fail(str(exc)) from exc


def labels(text: str) -> dict[str, str]:
    """Labels or a selector, k=v[,k=v]; a bad one exits 2 with the reason."""
    try:
        return parse_labels(text)
    except LabelError as exc:
        raise fail(str(exc), 2) from exc


def split_hostport(value: str | None, flag: str) -> tuple[str | None, int | None]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT); None passes through; a bad one exits 2."""
    if value is None:
        return None, None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise fail(f"{flag} expects HOST:PORT, got {value!r}", 2)
    return host.strip("[]"), int(port)
