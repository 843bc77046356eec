"""Pure helpers of policy administration: bundle ids, parsing with named errors, candidate
policy sets, YAML diffs, rule listings and page tokens. No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import yaml

from cordum.server.errors import CordumError, FieldViolation, Violations
from cordum.server.jsonvalue import normalize
from cordum.server.safety.loader import load_yaml
from cordum.server.safety.model import PolicySet, build_policy_set, parse_policy
from cordum.v1 import error_reason_pb2, policy_pb2

# Segments of letters, digits, `.`, `_`, `-`, joined by `/` (`secops/deny-prod`).
BUNDLE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*$")
MAX_BUNDLE_ID = 200
MAX_CONTENT_BYTES = 256 * 1024
MAX_DIFF_CHARS = 64 * 1024

Source = tuple[str, str]


def bundle_id_from_url(raw: str) -> str:
    """Upstream writes `/` as `~` in URLs (`secops~deny-prod`); `%2F` also works."""
    return raw.strip().replace("~", "/")


def check_bundle_id(field: str, bundle_id: str, problems: Violations) -> None:
    if not bundle_id:
        problems.add(field, "required")
    elif len(bundle_id) > MAX_BUNDLE_ID or not BUNDLE_ID.match(bundle_id):
        problems.add(
            field,
            "must be up to 200 characters: segments of A-Z a-z 0-9 . _ - separated by / "
            "(for example secops/deny-prod)",
        )


def bundle_source(bundle_id: str) -> str:
    """`secops` for `secops/…`, `pack` for other ids with a `/`, else `core` (upstream)."""
    if bundle_id.startswith("secops/"):
        return "secops"
    return "pack" if "/" in bundle_id else "core"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_content(field: str, content: str, problems: Violations) -> None:
    """Add a violation per problem of the YAML (field `<field>.<path in the document>`)."""
    if not content.strip():
        problems.add(field, "required (a YAML safety policy)")
        return
    if len(content.encode()) > MAX_CONTENT_BYTES:
        problems.add(field, f"larger than {MAX_CONTENT_BYTES} bytes")
        return
    try:
        parse_policy(content, source=field)
    except CordumError as error:
        if not error.violations:
            problems.add(field, error.message)
        for v in error.violations:
            problems.add(f"{field}.{v.field}", v.description)


def build_candidate(base: Source | None, bundles: Iterable[policy_pb2.PolicyBundle]) -> PolicySet:
    """What the kernel would enforce: the base file plus the enabled bundles, in id order."""
    extras = [(b.id, b.content) for b in sorted(bundles, key=lambda b: b.id) if b.enabled]
    return build_policy_set(base, extras)


def unpublishable(error: CordumError) -> CordumError:
    """A stored bundle that no longer loads (or does not merge with the base file)."""
    source = error.metadata.get("source", "")
    return CordumError(
        grpc.StatusCode.FAILED_PRECONDITION,
        error_reason_pb2.ERROR_REASON_POLICY_INVALID,
        f"cannot publish: {error.message}",
        [
            FieldViolation(f"{source}.{v.field}" if source else v.field, v.description)
            for v in error.violations
        ],
        metadata=error.metadata,
    )


# -- diffs ---------------------------------------------------------------------------------


def _label(prefix: str, bundle: policy_pb2.PolicyBundle | None) -> str:
    if bundle is None:
        return "/dev/null"
    return f"{prefix}/{bundle.id}" + ("" if bundle.enabled else " (disabled)")


def _lines(bundle: policy_pb2.PolicyBundle | None) -> list[str]:
    if bundle is None:
        return []
    lines = bundle.content.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def diff_bundles(
    before: Iterable[policy_pb2.PolicyBundle], after: Iterable[policy_pb2.PolicyBundle]
) -> tuple[str, list[str]]:
    """A unified diff of every bundle whose content or enabled flag differs, and their ids.

    A disabled bundle's file names say `(disabled)`, so flipping the flag shows up even
    when the YAML is unchanged. Long diffs are cut at 64 KiB.
    """
    old = {b.id: b for b in before}
    new = {b.id: b for b in after}
    chunks: list[str] = []
    changed: list[str] = []
    for bundle_id in sorted(old.keys() | new.keys()):
        a, b = old.get(bundle_id), new.get(bundle_id)
        if a is not None and b is not None and (a.content, a.enabled) == (b.content, b.enabled):
            continue
        changed.append(bundle_id)
        a_lines, b_lines = _lines(a), _lines(b)
        body = list(difflib.unified_diff(a_lines, b_lines, _label("a", a), _label("b", b)))
        if not body:  # only the flag changed
            body = [f"--- {_label('a', a)}\n", f"+++ {_label('b', b)}\n"]
        chunks.append("".join(body))
    text = "".join(chunks)
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS] + "\n... diff truncated\n"
    return text, changed


# -- rule listing ----------------------------------------------------------------------------


def rule_views(
    sources: Sequence[tuple[str, str, bool]],
) -> tuple[list[policy_pb2.PolicyRuleView], list[policy_pb2.PolicyBundleError]]:
    """Every rule of every source `(name, yaml, enabled)`, as written, plus the tenant
    allow/deny lists as the legacy rule ids upstream reported (`legacy:<t>:deny:<n>`)."""
    views: list[policy_pb2.PolicyRuleView] = []
    errors: list[policy_pb2.PolicyBundleError] = []
    for name, text, enabled in sources:
        try:
            doc = load_yaml(text) if text.strip() else None
        except yaml.YAMLError as error:
            errors.append(policy_pb2.PolicyBundleError(bundle_id=name, error=str(error)))
            continue
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            errors.append(policy_pb2.PolicyBundleError(bundle_id=name, error="not a mapping"))
            continue
        rules = doc.get("rules") or []
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, Mapping):
                continue
            rule_id = str(rule.get("id") or f"{name}#rules[{i}]")
            views.append(_view(rule_id, name, enabled, dict(rule)))
        tenants = doc.get("tenants") or {}
        for tenant, spec in tenants.items() if isinstance(tenants, Mapping) else []:
            if not isinstance(spec, Mapping):
                continue
            for kind, key in (("deny", "deny_topics"), ("allow", "allow_topics")):
                patterns = spec.get(key) or []
                for n, pattern in enumerate(patterns if isinstance(patterns, list) else [], 1):
                    rule = {
                        "id": f"legacy:{tenant}:{kind}:{n}",
                        "match": {"tenants": [tenant], "topics": [pattern]},
                        "decision": kind,
                    }
                    if kind == "deny":
                        rule["reason"] = f'topic "{pattern}" denied by tenant policy'
                    views.append(_view(rule["id"], name, enabled, rule))
    return views, errors


def _view(
    rule_id: str, source: str, enabled: bool, rule: dict[str, Any]
) -> policy_pb2.PolicyRuleView:
    view = policy_pb2.PolicyRuleView(id=rule_id, bundle_id=source, enabled=enabled)
    view.rule.update(_jsonable(normalize(rule)))
    return view


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# -- page tokens ---------------------------------------------------------------------------


def encode_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode() if text else ""


def decode_token(field: str, token: str, problems: Violations) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        problems.add(field, "not a token from a previous call")
        return ""


def decode_number_token(field: str, token: str, problems: Violations) -> int:
    text = decode_token(field, token, problems)
    if not text:
        return 0
    if not text.isdigit():
        problems.add(field, "not a token from a previous call")
        return 0
    return int(text)


def page_size(field: str, value: int, problems: Violations, default: int, maximum: int) -> int:
    if value < 0:
        problems.add(field, "must be >= 0")
    return min(value or default, maximum)
