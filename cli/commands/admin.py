"""Admin commands that talk to the cloud API: tokens, keys, artifacts, assignments, nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from fieldline.cli.admin_client import AdminClient, AdminError
from fieldline.cli.output import console, fail, print_json, print_table
from fieldline.shared.schemas import LabelError, parse_labels

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="FIELDLINE_URL", help="Cloud admin API base URL.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", envvar="FIELDLINE_API_KEY", help="API key (bearer).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_URL = "http://127.0.0.1:8080"

token_app = typer.Typer(no_args_is_help=True, help="Enrollment tokens.")
key_app = typer.Typer(no_args_is_help=True, help="Admin API keys.")
artifact_app = typer.Typer(no_args_is_help=True, help="Artifacts (models, files).")
nodes_app = typer.Typer(no_args_is_help=True, help="Edge nodes.")


def _client(url: str, key: str | None) -> AdminClient:
    if not key:
        raise fail("no API key: pass --key or set FIELDLINE_API_KEY (see DATA_DIR/admin.key)", 2)
    return AdminClient(url, key)


@contextmanager
def _admin(url: str, key: str | None) -> Iterator[AdminClient]:
    """A client whose API refusals become the CLI's error message and exit code 1."""
    with _client(url, key) as c:
        try:
            yield c
        except AdminError as exc:
            raise fail(str(exc)) from exc


def _labels(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except LabelError as exc:
        raise fail(str(exc), 2) from exc


@token_app.command("create")
def token_create(
    labels: Annotated[str, typer.Option(help="Labels for the node, k=v[,k=v].")] = "",
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mint a single-use, expiring enrollment token."""
    with _admin(url, key) as c:
        tok = c.create_token(_labels(labels), ttl)
    if as_json:
        print_json(tok)
    else:
        print(tok["token"])  # plain: rich would wrap a long token at the terminal width


@key_app.command("create")
def key_create(
    role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "viewer",
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")] = "",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key (shown once)."""
    with _admin(url, key) as c:
        created = c.create_key(role, name)
    if as_json:
        print_json(created)
    else:
        console.print(created["key"])


@artifact_app.command("push")
def artifact_push(
    path: Annotated[
        Path, typer.Argument(help="The file to upload (--kind llm: a checkpoint directory).")
    ],
    name: Annotated[str, typer.Option(help="Artifact name.")],
    version: Annotated[str, typer.Option(help="Artifact version.")],
    kind: Annotated[str, typer.Option(help="onnx, llm or file.")] = "file",
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: onnx: the cloud makes and keeps an INT8 version; "
            "llm: int8 weight-only, made here before the upload."
        ),
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help=".npz of calibration inputs for static INT8 (onnx).")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload an artifact; the cloud stores it by sha256 and signs its manifest.

    With --quantize int8 the file is kept as VERSION-fp32 and the cloud's INT8 version becomes
    VERSION, the one to assign. With --kind llm, PATH is a Hugging Face checkpoint directory,
    packed as one tar (int8 weight-only first with --quantize int8).
    """
    if kind == "llm":
        _push_llm(path, name, version, quantize, url, key, as_json)
        return
    if not path.is_file():
        raise fail(f"{path} is not a file", 2)
    if quantize not in (None, "int8"):
        raise fail(f"--quantize takes int8, not {quantize!r}", 2)
    if calibration is not None and quantize is None:
        raise fail("--calibration only makes sense with --quantize int8", 2)
    if calibration is not None and not calibration.is_file():
        raise fail(f"{calibration} is not a file", 2)
    with _admin(url, key) as c:
        if quantize is None:
            manifest = _upload(c, path, name, version, kind, quiet=as_json)
        else:
            if kind != "onnx":
                raise fail("--quantize int8 applies to --kind onnx (LLMs: see docs)", 2)
            fp32 = _upload(c, path, name, f"{version}-fp32", kind, quiet=as_json)
            calib_ref = None
            if calibration is not None:
                cal = _upload(c, calibration, f"{name}-calibration", version, "file", quiet=as_json)
                calib_ref = f"{cal['name']}@{cal['version']}"
            if not as_json:
                console.print(f"quantizing {fp32['name']}@{fp32['version']} to INT8 in the cloud…")
            manifest = c.quantize(
                name, fp32["version"], target_version=version, calibration=calib_ref
            )
    if as_json:
        print_json(manifest)
        return
    console.print(
        f"pushed {manifest['name']}@{manifest['version']} "
        f"({manifest['size']} bytes, sha256 {manifest['sha256'][:12]}…)"
    )
    report = (manifest.get("metadata") or {}).get("quantization")
    if report:
        console.print(
            f"INT8: {report['int8_bytes']} bytes vs {report['fp32_bytes']} fp32; "
            f"batch-8 latency {report['int8_latency_ms'].get('8')} ms vs "
            f"{report['fp32_latency_ms'].get('8')} ms; agreement {report['agreement']}"
        )


def _push_llm(
    path: Path,
    name: str,
    version: str,
    quantize: str | None,
    url: str,
    key: str | None,
    as_json: bool,
) -> None:
    import tempfile

    from fieldline.cli.llm_pack import pack_llm
    from fieldline.edge.engine.loader import CheckpointError
    from fieldline.shared.llm_artifact import LLMArtifactError

    if quantize not in (None, "int8"):
        raise fail(f"--quantize takes int8, not {quantize!r}", 2)
    with tempfile.TemporaryDirectory(prefix="fieldline-llm-") as tmp:
        if not as_json:
            what = "quantizing to int8 and packing" if quantize else "packing"
            console.print(f"{what} {path}…")
        try:
            packed = pack_llm(path, Path(tmp), quantize=quantize)
        except (LLMArtifactError, CheckpointError) as exc:
            raise fail(str(exc), 2) from exc
        with _admin(url, key) as c:
            manifest = _upload(
                c,
                packed.tar,
                name,
                version,
                "llm",
                quiet=as_json,
                metadata=packed.metadata,
                quantization=packed.quantization,
            )
    if as_json:
        print_json(manifest)
        return
    console.print(
        f"pushed {manifest['name']}@{manifest['version']} (llm, {manifest['size']} bytes, "
        f"sha256 {manifest['sha256'][:12]}…)"
    )
    q = packed.metadata.get("quantization") or {}
    if "bytes_after" in q:
        console.print(
            f"int8 weight-only: {q['bytes_after']} bytes of weights vs {q['bytes_before']}"
        )


def _upload(
    c: AdminClient,
    path: Path,
    name: str,
    version: str,
    kind: str,
    *,
    quiet: bool,
    metadata: dict[str, Any] | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    ) as progress:
        task = progress.add_task(f"upload {path.name}", total=path.stat().st_size)
        return c.push_artifact(
            path,
            name=name,
            version=version,
            kind=kind,
            metadata=metadata,
            quantization=quantization,
            on_progress=lambda n: progress.advance(task, n),
        )


@artifact_app.command("list")
def artifact_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List artifacts."""
    with _admin(url, key) as c:
        rows = c.list_artifacts()
    if as_json:
        print_json(rows)
        return
    print_table(
        rows,
        [
            ("name", "name"),
            ("version", "version"),
            ("kind", "kind"),
            ("size", "size"),
            ("sha256", "sha256"),
            ("created", "created"),
        ],
        title="artifacts",
    )


def assign(
    artifact: Annotated[str, typer.Option(help="NAME@VERSION.")],
    selector: Annotated[str, typer.Option(help="Label selector k=v[,k=v].")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Assign an artifact to every node matching the selector."""
    _labels(selector)
    with _admin(url, key) as c:
        result = c.assign(artifact, selector)
    if as_json:
        print_json(result)
    else:
        nodes = result.get("nodes", [])
        console.print(f"assigned {artifact} to {len(nodes)} node(s): {', '.join(nodes) or '-'}")


NODE_COLUMNS = [
    ("id", "node"),
    ("online", "online"),
    ("labels", "labels"),
    ("desired_generation", "desired"),
    ("applied_generation", "applied"),
    ("active", "active"),
    ("last_seen", "last seen"),
]


def node_rows(nodes: list[dict]) -> list[dict]:
    """Flatten the API's node objects for the table."""
    rows = []
    for n in nodes:
        row = dict(n)
        active = n.get("active") or {}
        if isinstance(active, dict):
            row["active"] = ", ".join(f"{k}@{v}" for k, v in active.items())
        rows.append(row)
    return rows


@nodes_app.command("list")
def nodes_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List nodes with their state."""
    with _admin(url, key) as c:
        nodes = c.list_nodes()
    if as_json:
        print_json(nodes)
    else:
        print_table(node_rows(nodes), NODE_COLUMNS, title="nodes")


@nodes_app.command("label")
def nodes_label(
    node_id: Annotated[str, typer.Argument(help="Node id.")],
    labels: Annotated[str, typer.Option(help="The node's new labels, k=v[,k=v].")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a node's labels (its desired state follows the assignments that now match)."""
    with _admin(url, key) as c:
        node = c.set_labels(node_id, _labels(labels))
    if as_json:
        print_json(node)
    else:
        print_table(node_rows([node]), NODE_COLUMNS)


@nodes_app.command("revoke")
def nodes_revoke(
    node_id: Annotated[str, typer.Argument(help="Node id.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a node: its credential and certificate are refused and its tunnel closes now."""
    with _admin(url, key) as c:
        node = c.revoke_node(node_id)
    if as_json:
        print_json(node)
    else:
        console.print(f"node {node['id']} revoked at {node['revoked_at']}")


policy_app = typer.Typer(
    no_args_is_help=True, help="Policies (subscriptions, inspections, retention)."
)


@policy_app.command("apply")
def policy_apply(
    path: Annotated[Path, typer.Argument(help="Policy file, YAML or JSON.")],
    selector: Annotated[str, typer.Option(help="Label selector k=v[,k=v].")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a policy file and make it the active policy of the matching nodes."""
    from fieldline.shared.policy import PolicyError, load_policy

    _labels(selector)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        raise fail(str(exc), 2) from exc
    with _admin(url, key) as c:
        result = c.apply_policy(policy.model_dump(mode="json"), selector)
    if as_json:
        print_json(result)
    else:
        console.print(f"policy {result['name']} applied to {len(result['nodes'])} node(s)")


def records(
    node: Annotated[str | None, typer.Option(help="Node id.")] = None,
    kind: Annotated[str | None, typer.Option(help="telemetry, verdict or event.")] = None,
    topic: Annotated[str | None, typer.Option(help="Exact topic.")] = None,
    limit: Annotated[int, typer.Option(help="Rows per page (max 1000).")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records the edges synced to the cloud (readings, verdicts, events)."""
    with _admin(url, key) as c:
        page = c.records(node=node, kind=kind, topic=topic, limit=limit, cursor=cursor)
    if as_json:
        print_json(page)
        return
    rows = [dict(r, payload=str(r["payload"])[:60]) for r in page["records"]]
    print_table(
        rows,
        [
            ("node_id", "node"),
            ("seq", "seq"),
            ("kind", "kind"),
            ("topic", "topic"),
            ("ts_ms", "ts_ms"),
            ("payload", "payload"),
        ],
        title="records",
    )
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}")
