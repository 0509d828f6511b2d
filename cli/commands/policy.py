"""`fieldline policy`: validate a policy file and make it the matching nodes' active policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin, labels
from fieldline.cli.output import console, fail, print_json

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

    labels(selector)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        raise fail(str(exc), 2) from exc
    with admin(url, key) as c:
        result = c.apply_policy(policy.model_dump(mode="json"), selector)
    if as_json:
        print_json(result)
    else:
        console.print(f"policy {result['name']} applied to {len(result['nodes'])} node(s)")
