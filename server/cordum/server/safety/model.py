"""The safety policy: upstream Cordum's YAML format, parsed strictly, merged, snapshotted.

The format is upstream's (`schema/safety_policy.schema.json`) and upstream files load
unchanged. Our extensions are optional keys upstream's schema would reject, so a file using
them is ours only: `rules[].match.cel` (a CEL condition) and `rules[].retry_after_ms` (how
long a THROTTLE asks the scheduler to wait, default 5000).

Validation follows upstream's schema (unknown keys in rules, match, constraints,
remediations, MCP lists and tenant policies are errors; extra top-level keys are tolerated;
types; integers >= 0; known decisions) and adds what the schema cannot see: malformed or
empty topic globs (upstream silently never matches them, so a typo in `deny_topics` denied
nothing), CEL that does not compile or reads unknown variables, `retry_after_ms` on a
non-throttle rule, integers beyond their proto field. Every problem is reported at once,
each with its field path (`rules[2].decision`). A null value reads as absent. A rule without
`decision` allows, as upstream (the schema does not require the key).

Everything evaluation needs per rule (lower-cased sets, compiled globs, CEL programs, proto
constraints) is computed here, once, when the policy loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import grpc
import yaml

from cordum.agent.v1 import safety_pb2
from cordum.server.errors import CordumError
from cordum.server.safety import glob
from cordum.server.safety.celexpr import CelExpression, Needs, compile_cel, merge_needs
from cordum.server.safety.facts import Facts, McpRequest, norm
from cordum.server.safety.loader import INT32_MAX, Reader, load_yaml, yaml_error_text
from cordum.v1 import error_reason_pb2


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"
    ALLOW_WITH_CONSTRAINTS = "allow_with_constraints"
    THROTTLE = "throttle"


# Exactly the spellings upstream's schema admits (case-sensitive, like JSON Schema's enum).
DECISION_ALIASES: Mapping[str, Decision] = MappingProxyType(
    {
        "allow": Decision.ALLOW,
        "permit": Decision.ALLOW,
        "deny": Decision.DENY,
        "block": Decision.DENY,
        "require_approval": Decision.REQUIRE_APPROVAL,
        "require-approval": Decision.REQUIRE_APPROVAL,
        "require_human": Decision.REQUIRE_APPROVAL,
        "allow_with_constraints": Decision.ALLOW_WITH_CONSTRAINTS,
        "allow-with-constraints": Decision.ALLOW_WITH_CONSTRAINTS,
        "throttle": Decision.THROTTLE,
    }
)
DEFAULT_RETRY_AFTER_MS = 5000

_RULE_KEYS = frozenset(
    {"id", "match", "decision", "reason", "constraints", "remediations", "retry_after_ms"}
)
_MATCH_LISTS = (
    "tenants",
    "topics",
    "capabilities",
    "risk_tags",
    "requires",
    "pack_ids",
    "actor_ids",
    "actor_types",
)
_MATCH_KEYS = frozenset({*_MATCH_LISTS, "labels", "secrets_present", "mcp", "cel"})
_MCP_KEYS = (
    "allow_servers",
    "deny_servers",
    "allow_tools",
    "deny_tools",
    "allow_resources",
    "deny_resources",
    "allow_actions",
    "deny_actions",
)
_CONSTRAINT_KEYS = frozenset({"budgets", "sandbox", "toolchain", "diff", "redaction_level"})
_BUDGET_KEYS = frozenset(
    {"max_runtime_ms", "max_retries", "max_artifact_bytes", "max_concurrent_jobs"}
)
_SANDBOX_KEYS = frozenset({"isolated", "network_allowlist", "fs_read_only", "fs_read_write"})
_TOOLCHAIN_KEYS = frozenset({"allowed_tools", "allowed_commands"})
_DIFF_KEYS = frozenset({"max_files", "max_lines", "deny_path_globs"})
_REMEDIATION_KEYS = frozenset(
    {
        "id",
        "title",
        "summary",
        "replacement_topic",
        "replacement_capability",
        "add_labels",
        "remove_labels",
    }
)
_TENANT_KEYS = frozenset(
    {
        "allow_topics",
        "deny_topics",
        "allowed_repo_hosts",
        "denied_repo_hosts",
        "max_concurrent_jobs",
        "mcp",
    }
)


def quote(value: str) -> str:
    """Go's %q for the strings policies hold (reason texts keep upstream's wording)."""
    return json.dumps(value, ensure_ascii=False)


def _set(values: Iterable[str]) -> frozenset[str]:
    # Blank entries never equal anything upstream (containsString), so they are dropped here,
    # while the caller keeps the condition active because the list itself was non-empty.
    return frozenset(n for n in map(norm, values) if n)


def _globs(patterns: Iterable[str]) -> tuple[glob.Glob, ...]:
    return tuple(glob.compile_glob(p.strip()) for p in patterns)


# -- MCP -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class McpPolicy:
    allow_servers: tuple[str, ...] = ()
    deny_servers: tuple[str, ...] = ()
    allow_tools: tuple[str, ...] = ()
    deny_tools: tuple[str, ...] = ()
    allow_resources: tuple[str, ...] = ()
    deny_resources: tuple[str, ...] = ()
    allow_actions: tuple[str, ...] = ()
    deny_actions: tuple[str, ...] = ()
    # (field, allow list non-empty, allow set, deny set) in upstream's check order.
    _checks: tuple[tuple[str, bool, frozenset[str], frozenset[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        pairs = (
            ("server", self.allow_servers, self.deny_servers),
            ("tool", self.allow_tools, self.deny_tools),
            ("resource", self.allow_resources, self.deny_resources),
            ("action", self.allow_actions, self.deny_actions),
        )
        checks = tuple((name, bool(allow), _set(allow), _set(deny)) for name, allow, deny in pairs)
        object.__setattr__(self, "_checks", checks)

    @property
    def empty(self) -> bool:
        return not any(getattr(self, key) for key in _MCP_KEYS)

    def violation(self, request: McpRequest) -> str | None:
        """Why `request` breaks these lists, or None; a request without MCP labels passes."""
        if not request.used:
            return None
        for (name, has_allow, allow, deny), value in zip(self._checks, request, strict=True):
            key = norm(value)
            if key and key in deny:
                return f"mcp {name} {quote(value)} denied"
            if has_allow and key not in allow:
                return f"mcp {name} {quote(value)} not allowed"
        return None

    def merged(self, other: McpPolicy) -> McpPolicy:
        return McpPolicy(*(getattr(self, k) + getattr(other, k) for k in _MCP_KEYS))

    @classmethod
    def from_lists(cls, lists: Mapping[str, Sequence[str]]) -> McpPolicy:
        return cls(*(tuple(lists.get(k, ())) for k in _MCP_KEYS))


# -- constraints and remediations ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budgets:
    max_runtime_ms: int = 0
    max_retries: int = 0
    max_artifact_bytes: int = 0
    max_concurrent_jobs: int = 0


@dataclass(frozen=True, slots=True)
class Sandbox:
    isolated: bool = False
    network_allowlist: tuple[str, ...] = ()
    fs_read_only: tuple[str, ...] = ()
    fs_read_write: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Toolchain:
    allowed_tools: tuple[str, ...] = ()
    allowed_commands: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Diff:
    max_files: int = 0
    max_lines: int = 0
    deny_path_globs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Constraints:
    budgets: Budgets = Budgets()
    sandbox: Sandbox = Sandbox()
    toolchain: Toolchain = Toolchain()
    diff: Diff = Diff()
    redaction_level: str = ""

    @property
    def empty(self) -> bool:
        if self.redaction_level.strip():
            return False
        return (self.budgets, self.sandbox, self.toolchain, self.diff) == _NO_CONSTRAINT_PARTS

    def to_proto(self) -> safety_pb2.PolicyConstraints | None:
        """None when empty; otherwise all four sub-messages are set, as upstream sends them."""
        if self.empty:
            return None
        b, s, t, d = self.budgets, self.sandbox, self.toolchain, self.diff
        return safety_pb2.PolicyConstraints(
            budgets=safety_pb2.BudgetConstraints(
                max_runtime_ms=b.max_runtime_ms,
                max_retries=b.max_retries,
                max_artifact_bytes=b.max_artifact_bytes,
                max_concurrent_jobs=b.max_concurrent_jobs,
            ),
            sandbox=safety_pb2.SandboxProfile(
                isolated=s.isolated,
                network_allowlist=s.network_allowlist,
                fs_read_only=s.fs_read_only,
                fs_read_write=s.fs_read_write,
            ),
            toolchain=safety_pb2.ToolchainConstraints(
                allowed_tools=t.allowed_tools, allowed_commands=t.allowed_commands
            ),
            diff=safety_pb2.DiffConstraints(
                max_files=d.max_files, max_lines=d.max_lines, deny_path_globs=d.deny_path_globs
            ),
            redaction_level=self.redaction_level,
        )


_NO_CONSTRAINT_PARTS = (Budgets(), Sandbox(), Toolchain(), Diff())


@dataclass(frozen=True, slots=True)
class Remediation:
    id: str = ""
    title: str = ""
    summary: str = ""
    replacement_topic: str = ""
    replacement_capability: str = ""
    add_labels: Mapping[str, str] = field(default_factory=dict)
    remove_labels: tuple[str, ...] = ()

    def to_proto(self) -> safety_pb2.PolicyRemediation:
        return safety_pb2.PolicyRemediation(
            id=self.id,
            title=self.title,
            summary=self.summary,
            replacement_topic=self.replacement_topic,
            replacement_capability=self.replacement_capability,
            add_labels=dict(self.add_labels),
            remove_labels=self.remove_labels,
        )


# -- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """All present conditions must hold; an absent or empty one is a wildcard."""

    tenants: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    risk_tags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    pack_ids: tuple[str, ...] = ()
    actor_ids: tuple[str, ...] = ()
    actor_types: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    secrets_present: bool | None = None
    mcp: McpPolicy | None = None
    cel: CelExpression | None = None
    # Precomputed forms; None = condition absent.
    _tenants: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _topics: tuple[glob.Glob, ...] | None = field(init=False, repr=False, compare=False)
    _capabilities: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _risk_tags: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _requires: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _requires_blank: bool = field(init=False, repr=False, compare=False)
    _pack_ids: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _actor_ids: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _actor_types: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _labels: tuple[tuple[str, str], ...] | None = field(init=False, repr=False, compare=False)
    _mcp: McpPolicy | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def opt_set(values: tuple[str, ...]) -> frozenset[str] | None:
            return _set(values) if values else None

        put = object.__setattr__
        put(self, "_tenants", opt_set(self.tenants))
        put(self, "_topics", _globs(self.topics) if self.topics else None)
        put(self, "_capabilities", opt_set(self.capabilities))
        put(self, "_risk_tags", opt_set(self.risk_tags))
        put(self, "_requires", opt_set(self.requires))
        # A blank requirement can never be satisfied upstream (containsString("") is false).
        put(self, "_requires_blank", any(not r.strip() for r in self.requires))
        put(self, "_pack_ids", opt_set(self.pack_ids))
        put(self, "_actor_ids", opt_set(self.actor_ids))
        put(self, "_actor_types", opt_set(self.actor_types))
        put(self, "_labels", tuple(self.labels.items()) if self.labels else None)
        # An MCP block with only empty lists constrains nothing, so it is not a condition.
        put(self, "_mcp", self.mcp if self.mcp is not None and not self.mcp.empty else None)

    @property
    def has_mcp(self) -> bool:
        return self._mcp is not None

    def first_failure(self, f: Facts) -> str | None:
        """The first non-CEL condition that does not hold (its key), or None.

        Returns constant strings so the hot path formats nothing; `describe_failure` makes
        the human text for Explain.
        """
        s = self._tenants
        if s is not None and f.tenant_key not in s:
            return "tenants"
        if self._topics is not None:
            topic = f.topic
            for g in self._topics:
                if g.match(topic):
                    break
            else:
                return "topics"
        s = self._capabilities
        if s is not None and f.capability not in s:
            return "capabilities"
        s = self._risk_tags
        if s is not None and s.isdisjoint(f.risk_tags):
            return "risk_tags"
        s = self._requires
        if s is not None and (self._requires_blank or not s <= f.requires):
            return "requires"
        s = self._pack_ids
        if s is not None and f.pack_id not in s:
            return "pack_ids"
        s = self._actor_ids
        if s is not None and f.actor_id not in s:
            return "actor_ids"
        s = self._actor_types
        if s is not None and f.actor_type not in s:
            return "actor_types"
        if self.secrets_present is not None and f.secrets_present != self.secrets_present:
            return "secrets_present"
        if self._labels is not None:
            # Upstream: no labels at all never match; a missing key reads as "".
            labels = f.labels
            if not labels:
                return "labels"
            for key, value in self._labels:
                if labels.get(key, "") != value:
                    return "labels"
        if self._mcp is not None and (not f.mcp.used or self._mcp.violation(f.mcp) is not None):
            return "mcp"
        return None

    def describe_failure(self, key: str, f: Facts) -> str:
        if key == "tenants":
            return f"tenant {quote(f.tenant)} not in {list(self.tenants)}"
        if key == "topics":
            return f"topic {quote(f.topic)} matches none of {list(self.topics)}"
        if key == "capabilities":
            return f"capability {quote(f.capability)} not in {list(self.capabilities)}"
        if key == "risk_tags":
            return f"risk tags {sorted(f.risk_tags)} share none of {list(self.risk_tags)}"
        if key == "requires":
            return f"requires {sorted(f.requires)} lacks some of {list(self.requires)}"
        if key == "pack_ids":
            return f"pack id {quote(f.pack_id)} not in {list(self.pack_ids)}"
        if key == "actor_ids":
            return f"actor id {quote(f.actor_id)} not in {list(self.actor_ids)}"
        if key == "actor_types":
            return f"actor type {quote(f.actor_type)} not in {list(self.actor_types)}"
        if key == "secrets_present":
            return f"secrets_present is {str(f.secrets_present).lower()}"
        if key == "labels":
            wrong = {k: f.labels.get(k) for k, v in self.labels.items() if f.labels.get(k, "") != v}
            return f"labels {wrong or 'absent'} do not equal {dict(self.labels)}"
        if key == "mcp":
            if not f.mcp.used:
                return "mcp: the request carries no MCP labels"
            assert self._mcp is not None
            return f"mcp: {self._mcp.violation(f.mcp)}"
        return key

    def describe_success(self) -> str:
        keys = [k for k in _MATCH_LISTS if getattr(self, k)]
        if self.labels:
            keys.append("labels")
        if self.secrets_present is not None:
            keys.append("secrets_present")
        if self._mcp is not None:
            keys.append("mcp")
        if self.cel is not None:
            keys.append("cel")
        if not keys:
            return "matched: no conditions (matches every request)"
        return "matched: " + ", ".join(keys) + " hold"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str = ""
    match: Match = Match()
    decision: Decision = Decision.ALLOW
    reason: str = ""
    constraints: Constraints = Constraints()
    remediations: tuple[Remediation, ...] = ()
    retry_after_ms: int = DEFAULT_RETRY_AFTER_MS
    # Where the rule came from (`file:config/safety.yaml`, a bundle id) and its index there.
    source: str = ""
    index: int = 0
    proto_constraints: safety_pb2.PolicyConstraints | None = field(
        init=False, repr=False, compare=False
    )
    proto_remediations: tuple[safety_pb2.PolicyRemediation, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "proto_constraints", self.constraints.to_proto())
        object.__setattr__(
            self, "proto_remediations", tuple(r.to_proto() for r in self.remediations)
        )

    @property
    def label(self) -> str:
        """The id, or where the rule is when it has none (for Explain)."""
        return self.id or f"{self.source}#rules[{self.index}]"


# -- tenants and the policy ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    allow_topics: tuple[str, ...] = ()
    deny_topics: tuple[str, ...] = ()
    allowed_repo_hosts: tuple[str, ...] = ()
    denied_repo_hosts: tuple[str, ...] = ()
    max_concurrent_jobs: int = 0
    mcp: McpPolicy = McpPolicy()
    allow_globs: tuple[glob.Glob, ...] = field(init=False, repr=False, compare=False)
    deny_globs: tuple[glob.Glob, ...] = field(init=False, repr=False, compare=False)
    allowed_hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    denied_hosts: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_globs", _globs(self.allow_topics))
        object.__setattr__(self, "deny_globs", _globs(self.deny_topics))
        object.__setattr__(self, "allowed_hosts", _set(self.allowed_repo_hosts))
        object.__setattr__(self, "denied_hosts", _set(self.denied_repo_hosts))

    def merged(self, other: TenantPolicy) -> TenantPolicy:
        mine, theirs = self.max_concurrent_jobs, other.max_concurrent_jobs
        limit = min(mine, theirs) if mine > 0 and theirs > 0 else (mine or theirs)
        return TenantPolicy(
            allow_topics=self.allow_topics + other.allow_topics,
            deny_topics=self.deny_topics + other.deny_topics,
            allowed_repo_hosts=self.allowed_repo_hosts + other.allowed_repo_hosts,
            denied_repo_hosts=self.denied_repo_hosts + other.denied_repo_hosts,
            max_concurrent_jobs=limit,
            mcp=self.mcp.merged(other.mcp),
        )


@dataclass(frozen=True, slots=True)
class Policy:
    version: str = ""
    default_tenant: str = ""
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # What the per-request CEL activation must hold: every variable (and, for fixed-shape
    # maps, every field) some rule reads.
    cel_needs: Needs = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expressions = (r.match.cel for r in self.rules if r.match.cel is not None)
        object.__setattr__(self, "cel_needs", merge_needs(expressions))

    @property
    def cel_variables(self) -> frozenset[str]:
        return frozenset(self.cel_needs)


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One YAML document the policy was built from: the base file or an extra source."""

    name: str
    text: str
    sha256: str


@dataclass(frozen=True, slots=True)
class PolicySet:
    """What the kernel enforces: the merged policy, its snapshot id and its sources."""

    policy: Policy
    snapshot: str
    sources: tuple[PolicySource, ...] = ()


# -- parsing -------------------------------------------------------------------------------


def policy_invalid(source: str, reader_or_message: Reader | str) -> CordumError:
    if isinstance(reader_or_message, str):
        return CordumError(
            grpc.StatusCode.INVALID_ARGUMENT,
            error_reason_pb2.ERROR_REASON_POLICY_INVALID,
            f"policy {source} is invalid: {reader_or_message}",
            metadata={"source": source},
        )
    items = reader_or_message.violations.items
    detail = "; ".join(f"{v.field}: {v.description}" for v in items)
    return CordumError(
        grpc.StatusCode.INVALID_ARGUMENT,
        error_reason_pb2.ERROR_REASON_POLICY_INVALID,
        f"policy {source} is invalid ({len(items)} problem(s)): {detail}",
        list(items),
        metadata={"source": source},
    )


def parse_policy(text: str, *, source: str) -> Policy:
    """Parse and validate one YAML policy document; raises CordumError (POLICY_INVALID).

    An empty (or comment-only) document is an empty policy.
    """
    if not text.strip():
        return Policy()
    reader = Reader()
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as error:
        reader.add("yaml", yaml_error_text(error))
        raise policy_invalid(source, reader) from None
    if doc is None:
        return Policy()
    top = reader.mapping(doc, "document", None) if not isinstance(doc, Mapping) else doc
    version = reader.string(top.get("version"), "version")
    default_tenant = reader.string(top.get("default_tenant"), "default_tenant")
    rules = _rules(reader, top.get("rules"), source)
    tenants = _tenants(reader, top.get("tenants"))
    if reader.violations:
        raise policy_invalid(source, reader)
    return Policy(version=version, default_tenant=default_tenant, tenants=tenants, rules=rules)


def _rules(reader: Reader, value: Any, source: str) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        reader.add("rules", "must be a list of rules")
        return ()
    return tuple(_rule(reader, item, f"rules[{i}]", source, i) for i, item in enumerate(value))


def _rule(reader: Reader, value: Any, path: str, source: str, index: int) -> Rule:
    raw = reader.mapping(value, path, _RULE_KEYS)
    decision = Decision.ALLOW
    if raw.get("decision") is not None:
        name = reader.string(raw["decision"], f"{path}.decision")
        if name and name in DECISION_ALIASES:
            decision = DECISION_ALIASES[name]
        elif isinstance(raw["decision"], str):
            reader.add(
                f"{path}.decision",
                f"unknown decision {quote(name)} (one of: {', '.join(DECISION_ALIASES)})",
            )
    retry_after_ms = DEFAULT_RETRY_AFTER_MS
    if raw.get("retry_after_ms") is not None:
        retry_after_ms = reader.integer(raw["retry_after_ms"], f"{path}.retry_after_ms")
        if decision is not Decision.THROTTLE:
            reader.add(f"{path}.retry_after_ms", "only valid on a rule with decision throttle")
    remediations: tuple[Remediation, ...] = ()
    if raw.get("remediations") is not None:
        items = raw["remediations"]
        if isinstance(items, list):
            remediations = tuple(
                _remediation(reader, item, f"{path}.remediations[{i}]")
                for i, item in enumerate(items)
            )
        else:
            reader.add(f"{path}.remediations", "must be a list")
    return Rule(
        id=reader.string(raw.get("id"), f"{path}.id"),
        match=_match(reader, raw.get("match"), f"{path}.match"),
        decision=decision,
        reason=reader.string(raw.get("reason"), f"{path}.reason"),
        constraints=_constraints(reader, raw.get("constraints"), f"{path}.constraints"),
        remediations=remediations,
        retry_after_ms=retry_after_ms,
        source=source,
        index=index,
    )


def _topic_patterns(reader: Reader, value: Any, path: str) -> tuple[str, ...]:
    patterns = reader.string_list(value, path)
    for i, pattern in enumerate(patterns):
        problem = glob.validate(pattern.strip())
        if problem is not None:
            reader.add(f"{path}[{i}]", f"bad topic glob {quote(pattern)}: {problem}")
    # Keep only valid ones so the (failing) load still builds its model.
    return tuple(p for p in patterns if glob.validate(p.strip()) is None)


def _mcp(reader: Reader, value: Any, path: str) -> McpPolicy:
    raw = reader.mapping(value, path, frozenset(_MCP_KEYS))
    return McpPolicy.from_lists({k: reader.string_list(raw.get(k), f"{path}.{k}") for k in raw})


def _match(reader: Reader, value: Any, path: str) -> Match:
    raw = reader.mapping(value, path, _MATCH_KEYS)
    lists = {
        key: (
            _topic_patterns(reader, raw.get(key), f"{path}.{key}")
            if key == "topics"
            else reader.string_list(raw.get(key), f"{path}.{key}")
        )
        for key in _MATCH_LISTS
    }
    expression: CelExpression | None = None
    if raw.get("cel") is not None:
        text = reader.string(raw["cel"], f"{path}.cel")
        if isinstance(raw["cel"], str):
            try:
                expression = compile_cel(text)
            except ValueError as error:
                reader.add(f"{path}.cel", f"invalid CEL: {error}")
    return Match(
        **lists,
        labels=reader.string_map(raw.get("labels"), f"{path}.labels"),
        secrets_present=reader.boolean(raw.get("secrets_present"), f"{path}.secrets_present"),
        mcp=_mcp(reader, raw["mcp"], f"{path}.mcp") if raw.get("mcp") is not None else None,
        cel=expression,
    )


def _constraints(reader: Reader, value: Any, path: str) -> Constraints:
    raw = reader.mapping(value, path, _CONSTRAINT_KEYS)
    b = reader.mapping(raw.get("budgets"), f"{path}.budgets", _BUDGET_KEYS)
    s = reader.mapping(raw.get("sandbox"), f"{path}.sandbox", _SANDBOX_KEYS)
    t = reader.mapping(raw.get("toolchain"), f"{path}.toolchain", _TOOLCHAIN_KEYS)
    d = reader.mapping(raw.get("diff"), f"{path}.diff", _DIFF_KEYS)
    bp, sp, tp, dp = (f"{path}.{k}" for k in ("budgets", "sandbox", "toolchain", "diff"))
    return Constraints(
        budgets=Budgets(
            max_runtime_ms=reader.integer(b.get("max_runtime_ms"), f"{bp}.max_runtime_ms"),
            max_retries=reader.integer(b.get("max_retries"), f"{bp}.max_retries", INT32_MAX),
            max_artifact_bytes=reader.integer(
                b.get("max_artifact_bytes"), f"{bp}.max_artifact_bytes"
            ),
            max_concurrent_jobs=reader.integer(
                b.get("max_concurrent_jobs"), f"{bp}.max_concurrent_jobs", INT32_MAX
            ),
        ),
        sandbox=Sandbox(
            isolated=bool(reader.boolean(s.get("isolated"), f"{sp}.isolated")),
            network_allowlist=reader.string_list(
                s.get("network_allowlist"), f"{sp}.network_allowlist"
            ),
            fs_read_only=reader.string_list(s.get("fs_read_only"), f"{sp}.fs_read_only"),
            fs_read_write=reader.string_list(s.get("fs_read_write"), f"{sp}.fs_read_write"),
        ),
        toolchain=Toolchain(
            allowed_tools=reader.string_list(t.get("allowed_tools"), f"{tp}.allowed_tools"),
            allowed_commands=reader.string_list(
                t.get("allowed_commands"), f"{tp}.allowed_commands"
            ),
        ),
        diff=Diff(
            max_files=reader.integer(d.get("max_files"), f"{dp}.max_files", INT32_MAX),
            max_lines=reader.integer(d.get("max_lines"), f"{dp}.max_lines", INT32_MAX),
            deny_path_globs=reader.string_list(d.get("deny_path_globs"), f"{dp}.deny_path_globs"),
        ),
        redaction_level=reader.string(raw.get("redaction_level"), f"{path}.redaction_level"),
    )


def _remediation(reader: Reader, value: Any, path: str) -> Remediation:
    raw = reader.mapping(value, path, _REMEDIATION_KEYS)

    def text(key: str) -> str:
        return reader.string(raw.get(key), f"{path}.{key}")

    return Remediation(
        id=text("id"),
        title=text("title"),
        summary=text("summary"),
        replacement_topic=text("replacement_topic"),
        replacement_capability=text("replacement_capability"),
        add_labels=reader.string_map(raw.get("add_labels"), f"{path}.add_labels"),
        remove_labels=reader.string_list(raw.get("remove_labels"), f"{path}.remove_labels"),
    )


def _tenants(reader: Reader, value: Any) -> dict[str, TenantPolicy]:
    out: dict[str, TenantPolicy] = {}
    for name, item in reader.mapping(value, "tenants", None).items():
        path = f"tenants.{name}"
        raw = reader.mapping(item, path, _TENANT_KEYS)
        out[name] = TenantPolicy(
            allow_topics=_topic_patterns(reader, raw.get("allow_topics"), f"{path}.allow_topics"),
            deny_topics=_topic_patterns(reader, raw.get("deny_topics"), f"{path}.deny_topics"),
            allowed_repo_hosts=reader.string_list(
                raw.get("allowed_repo_hosts"), f"{path}.allowed_repo_hosts"
            ),
            denied_repo_hosts=reader.string_list(
                raw.get("denied_repo_hosts"), f"{path}.denied_repo_hosts"
            ),
            max_concurrent_jobs=reader.integer(
                raw.get("max_concurrent_jobs"), f"{path}.max_concurrent_jobs", INT32_MAX
            ),
            mcp=_mcp(reader, raw.get("mcp"), f"{path}.mcp"),
        )
    return out


# -- merge and snapshots -------------------------------------------------------------------


def merge(policies: Sequence[Policy]) -> Policy:
    """Upstream's merge: first non-empty version/default_tenant, rules concatenated in order,
    tenants merged by name (lists concatenated, smallest positive max_concurrent_jobs)."""
    version = next((p.version for p in policies if p.version), "")
    default_tenant = next((p.default_tenant for p in policies if p.default_tenant), "")
    tenants: dict[str, TenantPolicy] = {}
    for policy in policies:
        for name, tenant in policy.tenants.items():
            tenants[name] = tenants[name].merged(tenant) if name in tenants else tenant
    rules = tuple(rule for policy in policies for rule in policy.rules)
    return Policy(version=version, default_tenant=default_tenant, tenants=tenants, rules=rules)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def snapshot_id(
    base: tuple[str, str] | None, base_version: str, extras: Sequence[tuple[str, str]]
) -> str:
    """Upstream's snapshot string: `[<version>:]sha256(base)`, `cfg:sha256(name\\0text…)` for
    the extra sources (in order, blank ones skipped), joined by `|`; "" when neither exists.

    A file-only kernel therefore reports the same snapshot id as upstream for the same file.
    """
    parts: list[str] = []
    if base is not None:
        digest = sha256_hex(base[1])
        parts.append(f"{base_version}:{digest}" if base_version else digest)
    live = [(name, text) for name, text in extras if text.strip()]
    if live:
        hasher = hashlib.sha256()
        for name, text in live:
            hasher.update(name.encode())
            hasher.update(b"\0")
            hasher.update(text.encode())
        parts.append("cfg:" + hasher.hexdigest())
    return "|".join(parts)


def build_policy_set(
    base: tuple[str, str] | None, extras: Sequence[tuple[str, str]] = ()
) -> PolicySet:
    """Parse the base document (a file) and the extra sources (bundles), merge them in that
    order and compute the snapshot id. Raises CordumError naming the first invalid source."""
    policies: list[Policy] = []
    sources: list[PolicySource] = []
    base_version = ""
    if base is not None:
        name, text = base
        policy = parse_policy(text, source=name)
        base_version = policy.version
        policies.append(policy)
        sources.append(PolicySource(name, text, sha256_hex(text)))
    for name, text in extras:
        if not text.strip():
            continue
        policies.append(parse_policy(text, source=name))
        sources.append(PolicySource(name, text, sha256_hex(text)))
    return PolicySet(
        policy=merge(policies),
        snapshot=snapshot_id(base, base_version, extras),
        sources=tuple(sources),
    )
