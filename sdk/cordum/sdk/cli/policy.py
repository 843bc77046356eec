"""`cordumctl policy ...`: ask the safety policy (evaluate, simulate, explain), manage draft
bundles, publish and roll back versions, read the audit log, replay recorded decisions."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from cordum.agent.v1 import safety_pb2
from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import (
    JSON,
    Failure,
    error_line,
    json_object_arg,
    out,
    parse_labels,
    print_json,
    proto_dict,
    read_text,
    run,
    when,
)
from cordum.sdk.convert import from_struct

app = typer.Typer(no_args_is_help=True, help="Ask and administer the safety policy.")
bundle_app = typer.Typer(no_args_is_help=True, help="One draft policy bundle.")
app.add_typer(bundle_app, name="bundle")

_DECISION_STYLE = {
    "ALLOW": "green",
    "ALLOW_WITH_CONSTRAINTS": "green",
    "DENY": "red",
    "QUARANTINE": "red",
    "REQUIRE_HUMAN": "magenta",
    "THROTTLE": "yellow",
    "REDACT": "yellow",
}


def decision_name(decision: int) -> str:
    return safety_pb2.DecisionType.Name(decision).removeprefix("DECISION_TYPE_")  # type: ignore[arg-type]


def _decision(decision: int) -> Text:
    name = decision_name(decision)
    return Text(name, style=_DECISION_STYLE.get(name, "cyan"))


# -- the request options shared by evaluate / simulate / explain / bundle simulate ----------

# (name, annotation, typer option): added to each asking command's signature by
# `check_options`, so the four commands share one definition of these flags.
_CHECK_OPTIONS: list[tuple[str, Any, Any]] = [
    ("topic", str | None, typer.Option(None, "--topic", help="The job topic to check.")),
    ("tenant", str | None, typer.Option(None, "--tenant")),
    ("org_id", str | None, typer.Option(None, "--org")),
    ("team_id", str | None, typer.Option(None, "--team")),
    ("workflow_id", str | None, typer.Option(None, "--workflow")),
    ("step_id", str | None, typer.Option(None, "--step")),
    ("principal_id", str | None, typer.Option(None, "--principal")),
    ("priority", str | None, typer.Option(None, "--priority", help="interactive|batch|critical")),
    ("label", list[str], typer.Option([], "--label", help="key=value; repeatable.")),
    ("capability", str | None, typer.Option(None, "--capability")),
    ("risk_tag", list[str], typer.Option([], "--risk-tag", help="Repeatable.")),
    (
        "request",
        str | None,
        typer.Option(
            None,
            "--request",
            help="A whole PolicyCheckInput as JSON (inline, @file, @-); flags override it.",
        ),
    ),
]
_SCALARS = ("topic", "tenant", "org_id", "team_id", "workflow_id", "step_id", "principal_id")


class Check:
    """The values of the request flags; :meth:`fields` builds the SDK's keyword fields."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def fields(self) -> dict[str, Any]:
        v = self.values
        fields: dict[str, Any] = (
            json_object_arg("--request", v["request"]) if v["request"] is not None else {}
        )
        fields.update({k: v[k] for k in (*_SCALARS, "priority") if v[k] is not None})
        labels = parse_labels(v["label"])
        if labels:
            fields["labels"] = {**(fields.get("labels") or {}), **labels}
        if v["capability"] is not None or v["risk_tag"]:
            meta = dict(fields.get("meta") or {})
            if v["capability"] is not None:
                meta["capability"] = v["capability"]
            if v["risk_tag"]:
                meta["risk_tags"] = list(v["risk_tag"])
            fields["meta"] = meta
        if not fields.get("topic"):
            raise Failure("--topic: required (or a topic in --request)")
        return fields


def check_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the request flags; it receives them as one `check: Check` argument."""
    names = [name for name, _, _ in _CHECK_OPTIONS]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        check = Check({name: kwargs.pop(name) for name in names})
        command(*args, check=check, **kwargs)

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()]
    own = [p for p in own if p.name != "check"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, kind, option in _CHECK_OPTIONS
    ]
    positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    wrapper.__signature__ = inspect.Signature([*positional, *added, *keyword])  # type: ignore[attr-defined]
    return wrapper


def _print_decision(decision: safety_pb2.PolicyCheckResponse) -> None:
    line = _decision(decision.decision)
    if decision.rule_id:
        line.append(f"  rule {decision.rule_id}")
    if decision.reason:
        line.append(f"  {decision.reason}")
    if decision.policy_snapshot:
        line.append(f"  (snapshot {decision.policy_snapshot})", style="dim")
    out.print(line, soft_wrap=True)


def _ask(ctx: typer.Context, method: str, check: Check, as_json: bool) -> None:
    async def command(client: AsyncClient) -> None:
        decision = await getattr(client.policy, method)(**check.fields())
        if as_json:
            print_json(proto_dict(decision))
        else:
            _print_decision(decision)

    run(ctx, command)


@app.command()
@check_options
def evaluate(ctx: typer.Context, *, check: Check, as_json: bool = JSON) -> None:
    """The enforced policy's decision for a request (recorded like a real check)."""
    _ask(ctx, "evaluate", check, as_json)


@app.command()
@check_options
def simulate(ctx: typer.Context, *, check: Check, as_json: bool = JSON) -> None:
    """The enforced policy's decision for a request, without side effects."""
    _ask(ctx, "simulate", check, as_json)


@app.command()
@check_options
def explain(ctx: typer.Context, *, check: Check, as_json: bool = JSON) -> None:
    """The decision for a request and how each rule fared, up to the one that decided."""

    async def command(client: AsyncClient) -> None:
        reply = await client.policy.explain(**check.fields())
        if as_json:
            print_json(proto_dict(reply))
            return
        _print_decision(reply.decision)
        table = Table("rule", "source", "matched", "decision", "detail")
        for item in reply.evaluations:
            table.add_row(
                item.rule_id,
                item.source,
                Text("yes", style="bold") if item.matched else Text("no", style="dim"),
                _decision(item.decision) if item.matched else "",
                item.detail,
            )
        out.print(table)
        extra = [f"tenant {reply.tenant}"] if reply.tenant else []
        extra += [f"override: {o}" for o in reply.overrides]
        for line in extra:
            out.print(Text(line, style="dim"), soft_wrap=True)

    run(ctx, command)


# -- rules and snapshots ----------------------------------------------------------------------


@app.command()
def rules(
    ctx: typer.Context,
    include_disabled: bool = typer.Option(False, "--all", help="Include disabled bundles."),
    as_json: bool = JSON,
) -> None:
    """Every rule of every bundle, in evaluation order."""

    async def command(client: AsyncClient) -> None:
        reply = await client.policy.rules(include_disabled=include_disabled)
        if as_json:
            print_json(proto_dict(reply))
            return
        table = Table("rule", "bundle", "enabled", "decision", "match")
        for rule in reply.rules:
            body = from_struct(rule.rule)
            table.add_row(
                rule.id,
                rule.bundle_id,
                "yes" if rule.enabled else "no",
                str(body.get("decision", "")),
                json.dumps(body.get("match", {}), ensure_ascii=False),
            )
        out.print(table)
        for problem in reply.errors:
            error_line(f"bundle {problem.bundle_id}: {problem.error}")

    run(ctx, command)


@app.command()
def snapshots(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Policy snapshots the safety kernel has loaded, newest first."""

    async def command(client: AsyncClient) -> None:
        found = await client.policy.snapshots()
        if as_json:
            print_json(found)
        else:
            for snapshot in found:
                out.print(snapshot)

    run(ctx, command)


# -- bundles -----------------------------------------------------------------------------------


@app.command()
def bundles(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List draft bundles."""

    async def command(client: AsyncClient) -> None:
        found = [b async for b in client.policy.bundles.list()]
        if as_json:
            print_json([proto_dict(b) for b in found])
            return
        table = Table("bundle", "enabled", "source", "revision", "author", "updated", "sha256")
        for b in found:
            table.add_row(
                b.id,
                "yes" if b.enabled else "no",
                b.source,
                str(b.revision),
                b.author,
                when(b.updated_at),
                b.sha256[:12],
            )
        out.print(table)

    run(ctx, command)


BUNDLE_ID = typer.Argument(..., help="The bundle id, e.g. secops/deny-prod.")


@bundle_app.command("get")
def bundle_get(ctx: typer.Context, bundle_id: str = BUNDLE_ID, as_json: bool = JSON) -> None:
    """Print a bundle's YAML (with --json: the whole bundle)."""

    async def command(client: AsyncClient) -> None:
        found = await client.policy.bundles.get(bundle_id)
        if as_json:
            print_json(proto_dict(found))
        else:
            typer.echo(found.content, nl=not found.content.endswith("\n"))

    run(ctx, command)


@bundle_app.command("put")
def bundle_put(
    ctx: typer.Context,
    bundle_id: str = BUNDLE_ID,
    file: str = typer.Option(
        ..., "--file", "-f", help="The bundle's YAML (- for stdin).", show_default=False
    ),
    enabled: bool | None = typer.Option(
        None, "--enable/--disable", help="Include it in the next publish (default: unchanged)."
    ),
    author: str = typer.Option("", "--author"),
    message: str = typer.Option("", "--message", "-m", help="What changed and why."),
    as_json: bool = JSON,
) -> None:
    """Create or update a draft bundle. Nothing is enforced until `policy publish`."""

    async def command(client: AsyncClient) -> None:
        content = read_text("--file", file)
        saved = await client.policy.bundles.put(
            bundle_id, content, enabled=enabled, author=author, message=message
        )
        if as_json:
            print_json(proto_dict(saved))
        else:
            state = "enabled" if saved.enabled else "disabled"
            out.print(f"bundle {saved.id} saved (revision {saved.revision}, {state})")

    run(ctx, command)


@bundle_app.command("delete")
def bundle_delete(ctx: typer.Context, bundle_id: str = BUNDLE_ID) -> None:
    """Delete a draft bundle (published versions keep their copy)."""

    async def command(client: AsyncClient) -> None:
        await client.policy.bundles.delete(bundle_id)
        out.print(f"bundle {bundle_id} deleted")

    run(ctx, command)


@bundle_app.command("simulate")
@check_options
def bundle_simulate(
    ctx: typer.Context,
    bundle_id: str = BUNDLE_ID,
    *,
    check: Check,
    file: str | None = typer.Option(
        None, "--file", "-f", help="Draft YAML to try (default: the stored draft)."
    ),
    as_json: bool = JSON,
) -> None:
    """Evaluate a request with a draft of the bundle in place of the stored one."""

    async def command(client: AsyncClient) -> None:
        content = read_text("--file", file) if file is not None else None
        decision = await client.policy.bundles.simulate(
            bundle_id, content=content, **check.fields()
        )
        if as_json:
            print_json(proto_dict(decision))
        else:
            _print_decision(decision)

    run(ctx, command)


# -- versions, audit, replay -------------------------------------------------------------------


@app.command()
def publish(
    ctx: typer.Context,
    bundle: list[str] = typer.Option(
        [], "--bundle", help="Publish only these bundles (default: every enabled one)."
    ),
    author: str = typer.Option("", "--author"),
    message: str = typer.Option("", "--message", "-m"),
    note: str = typer.Option("", "--note"),
    as_json: bool = JSON,
) -> None:
    """Publish the bundles as a new immutable version; every safety kernel reloads it."""

    async def command(client: AsyncClient) -> None:
        done = await client.policy.publish(
            bundle_ids=bundle, author=author, message=message, note=note
        )
        if as_json:
            print_json(proto_dict(done))
            return
        out.print(
            f"published version {done.version.version} (snapshot {done.snapshot_after}): "
            + (", ".join(done.published) or "no bundles")
        )

    run(ctx, command)


@app.command()
def rollback(
    ctx: typer.Context,
    version: int | None = typer.Option(None, "--version", help="The version to go back to."),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Or its snapshot id."),
    author: str = typer.Option("", "--author"),
    message: str = typer.Option("", "--message", "-m"),
    note: str = typer.Option("", "--note"),
    as_json: bool = JSON,
) -> None:
    """Publish a copy of an earlier version."""

    async def command(client: AsyncClient) -> None:
        if version is None and not snapshot:
            raise Failure("--version or --snapshot: say which version to roll back to")
        done = await client.policy.rollback(
            version=version, snapshot_id=snapshot, author=author, message=message, note=note
        )
        if as_json:
            print_json(proto_dict(done))
            return
        out.print(
            f"rolled back to version {done.rollback_to}: now version {done.version.version} "
            f"(snapshot {done.snapshot_after})"
        )

    run(ctx, command)


@app.command()
def versions(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", min=1),
    as_json: bool = JSON,
) -> None:
    """Published versions, newest first."""

    async def command(client: AsyncClient) -> None:
        found = [v async for v in client.policy.versions(limit=limit)]
        if as_json:
            print_json([proto_dict(v) for v in found])
            return
        table = Table("version", "snapshot", "published", "by", "bundles", "message")
        for v in found:
            message = v.message + (f" (rollback to {v.rollback_of})" if v.rollback_of else "")
            table.add_row(
                str(v.version),
                v.snapshot,
                when(v.published_at),
                v.published_by,
                ", ".join(b.id for b in v.bundles),
                message,
            )
        out.print(table)

    run(ctx, command)


@app.command()
def audit(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", min=1),
    diff: bool = typer.Option(False, "--diff", help="Also print each change's diff."),
    as_json: bool = JSON,
) -> None:
    """Every change to the policy (who, when, what), newest first."""

    async def command(client: AsyncClient) -> None:
        entries = [e async for e in client.policy.audit(limit=limit)]
        if as_json:
            print_json([proto_dict(e) for e in entries])
            return
        table = Table("time", "action", "actor", "bundles", "version", "message")
        for e in entries:
            table.add_row(
                when(e.created_at),
                e.action,
                e.actor_id,
                ", ".join(e.bundle_ids),
                str(e.version) if e.version else "",
                e.message,
            )
        out.print(table)
        if diff:
            for e in entries:
                if e.diff:
                    out.print(Text(f"--- {e.action} {when(e.created_at)}", style="bold"))
                    typer.echo(e.diff)

    run(ctx, command)


@app.command()
def replay(
    ctx: typer.Context,
    bundle: list[str] = typer.Option(
        [], "--bundle", help="id=file: a candidate bundle laid over the published policy."
    ),
    remove: list[str] = typer.Option([], "--remove", help="A bundle id to leave out."),
    limit: int | None = typer.Option(
        None, "--limit", help="Replay the last N recorded decisions (default 1000)."
    ),
    as_json: bool = JSON,
) -> None:
    """Replay recorded decisions under a candidate policy; show the ones that would change."""

    async def command(client: AsyncClient) -> None:
        candidates: dict[str, str] = {}
        for item in bundle:
            bundle_id, sep, path = item.partition("=")
            if not sep or not bundle_id or not path:
                raise Failure(f"--bundle: expected id=file, got {item!r}")
            candidates[bundle_id] = read_text("--bundle", path)
        reply = await client.policy.replay(
            bundles=candidates, remove_bundle_ids=remove, limit=limit
        )
        if as_json:
            print_json(proto_dict(reply))
            return
        out.print(
            f"replayed {reply.replayed} decisions: {reply.unchanged} unchanged, "
            f"{len(reply.changes)} would change (candidate snapshot {reply.candidate_snapshot})"
        )
        if reply.changes:
            table = Table("job", "topic", "tenant", "before", "after", "rule", "reason")
            for c in reply.changes:
                table.add_row(
                    c.job_id,
                    c.topic,
                    c.tenant,
                    _decision(c.before),
                    _decision(c.after),
                    f"{c.before_rule_id or '-'} → {c.after_rule_id or '-'}",
                    c.after_reason,
                )
            out.print(table)

    run(ctx, command)
