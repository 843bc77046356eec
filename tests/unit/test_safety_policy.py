"""Policy parsing, validation, merge, snapshots and the evaluation algorithm.

Tests named `test_upstream_sharp_edge_*` pin a deliberate difference from upstream Cordum.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from typing import Any

import grpc
import pytest

from cordum.agent.v1 import job_pb2, safety_pb2
from cordum.server.errors import CordumError
from cordum.server.safety.evaluate import (
    Evaluation,
    evaluate,
    parse_effective_safety,
    retry_after_ms,
)
from cordum.server.safety.model import (
    DECISION_ALIASES,
    Decision,
    PolicySet,
    build_policy_set,
    merge,
    parse_policy,
    snapshot_id,
)
from cordum.v1 import error_reason_pb2

D = safety_pb2

# A realistic upstream-format file: every match kind, constraints, remediations, aliases.
UPSTREAM_POLICY = textwrap.dedent(
    """\
    # Upstream Cordum safety policy (schema/safety_policy.schema.json)
    version: "2024-06-01"
    default_tenant: default
    owner: secops  # extra top-level keys are tolerated
    tenants:
      default:
        allow_topics:
          - "job.*"
        deny_topics:
          - "sys.*"
          - "job.forbidden.*"
        allowed_repo_hosts: []
        denied_repo_hosts: []
        max_concurrent_jobs: 0
        mcp:
          allow_servers: []
          deny_servers: ["evil.example.com"]
          allow_tools: []
          deny_tools: []
          allow_resources: []
          deny_resources: []
          allow_actions: []
          deny_actions: ["delete"]
      acme:
        allow_topics: ["job.acme.*", "job.shared.*"]
        max_concurrent_jobs: 5
    rules:
      - id: block-prod-writes-by-services
        match:
          tenants: [acme]
          topics: ["job.acme.db.*"]
          capabilities: [db.write]
          actor_types: [service]
          labels:
            env: prod
        decision: block
        reason: "services may not write to prod"
        remediations:
          - id: use-staging
            title: Use staging
            summary: Run against staging first.
            replacement_topic: job.acme.db.staging-write
            replacement_capability: db.staging.write
            add_labels: {env: staging}
            remove_labels: [prod_ticket]
      - id: secrets-need-approval
        match:
          secrets_present: true
        decision: require-approval
        reason: "jobs handling secrets need a human"
      - id: risky-ops
        match:
          risk_tags: [destructive, irreversible]
          requires: [kubectl]
        decision: require_human
        reason: "destructive kubectl"
      - id: pack-sandbox
        match:
          pack_ids: [hello-pack]
        decision: allow-with-constraints
        constraints:
          budgets:
            max_runtime_ms: 60000
            max_retries: 2
            max_artifact_bytes: 1048576
            max_concurrent_jobs: 3
          sandbox:
            isolated: true
            network_allowlist: [api.github.com]
            fs_read_only: [/etc]
            fs_read_write: [/tmp]
          toolchain:
            allowed_tools: [git]
            allowed_commands: [git status]
          diff:
            max_files: 10
            max_lines: 500
            deny_path_globs: ["secrets/**"]
          redaction_level: strict
      - id: on-call
        match:
          actor_ids: [alice]
        decision: permit
      - id: mcp-github
        match:
          mcp:
            allow_servers: [github]
            allow_actions: [read]
        decision: allow_with_constraints
        constraints:
          redaction_level: standard
      - id: batch-throttle
        match:
          topics: ["job.bulk.*"]
        decision: throttle
        reason: "bulk jobs are rate limited"
      - id: report-constraints
        match:
          topics: ["job.report.*"]
        decision: allow
        constraints:
          budgets: {max_runtime_ms: 5000}
      - id: catch-all-deny-x
        match:
          topics: ["job.x"]
        decision: deny
    """
)


def policy_set(text: str, *extras: tuple[str, str], source: str = "file:test.yaml") -> PolicySet:
    return build_policy_set((source, textwrap.dedent(text)), list(extras))


def request(topic: str = "job.a", **kw: Any) -> safety_pb2.PolicyCheckRequest:
    meta = kw.pop("meta", None)
    req = safety_pb2.PolicyCheckRequest(job_id=kw.pop("job_id", "job-1"), topic=topic, **kw)
    if meta is not None:
        req.meta.CopyFrom(job_pb2.JobMetadata(**meta))
    return req


def decide(ps: PolicySet, topic: str = "job.a", **kw: Any) -> safety_pb2.PolicyCheckResponse:
    return evaluate(ps, request(topic, **kw)).response


def explain(ps: PolicySet, topic: str = "job.a", **kw: Any) -> Evaluation:
    return evaluate(ps, request(topic, **kw), explain=True)


def invalid(text: str) -> CordumError:
    with pytest.raises(CordumError) as caught:
        parse_policy(textwrap.dedent(text), source="bundle-x")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == error_reason_pb2.ERROR_REASON_POLICY_INVALID
    return error


def fields(error: CordumError) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


# -- parsing ---------------------------------------------------------------------------------


def test_upstream_policy_file_loads_unchanged() -> None:
    policy = parse_policy(UPSTREAM_POLICY, source="file:safety.yaml")
    assert policy.version == "2024-06-01"
    assert policy.default_tenant == "default"
    assert set(policy.tenants) == {"default", "acme"}
    assert policy.tenants["acme"].max_concurrent_jobs == 5
    assert policy.tenants["default"].mcp.deny_servers == ("evil.example.com",)
    assert [r.id for r in policy.rules][:3] == [
        "block-prod-writes-by-services",
        "secrets-need-approval",
        "risky-ops",
    ]
    first = policy.rules[0]
    assert first.decision is Decision.DENY
    assert first.match.labels == {"env": "prod"}
    assert first.remediations[0].add_labels == {"env": "staging"}
    assert first.source == "file:safety.yaml"
    sandbox = policy.rules[3].constraints
    assert sandbox.budgets.max_artifact_bytes == 1048576
    assert sandbox.sandbox.fs_read_write == ("/tmp",)
    assert sandbox.diff.deny_path_globs == ("secrets/**",)
    assert policy.rules[5].match.mcp is not None


def test_shipped_upstream_default_config_and_pack_fragment_load() -> None:
    upstream_default = """
        default_tenant: default
        tenants:
          default:
            allow_topics:
              - "job.*"
            deny_topics:
              - "sys.*"
            allowed_repo_hosts: []
            denied_repo_hosts: []
            mcp:
              allow_servers: []
              deny_servers: []
              allow_tools: []
              deny_tools: []
              allow_resources: []
              deny_resources: []
              allow_actions: []
              deny_actions: []
    """
    fragment = textwrap.dedent(
        """
        rules:
          - id: hello-pack-allow
            match:
              topics:
                - job.hello-pack.echo
            decision: allow
            reason: "Allow the hello-pack echo demo."
        """
    )
    ps = policy_set(upstream_default, ("hello-pack/policy", fragment))
    assert decide(ps, "job.hello-pack.echo").rule_id == "hello-pack-allow"
    assert decide(ps, "job.other").rule_id == "legacy:default:allow:1"


@pytest.mark.parametrize(("alias", "decision"), sorted(DECISION_ALIASES.items()))
def test_every_upstream_decision_alias_is_accepted(alias: str, decision: Decision) -> None:
    policy = parse_policy(f"rules:\n  - id: r\n    decision: {alias}\n", source="s")
    assert policy.rules[0].decision is decision


def test_rule_without_decision_allows_like_upstream() -> None:
    ps = policy_set("rules:\n  - id: r\n    match: {topics: [job.a]}\n")
    resp = decide(ps, "job.a")
    assert resp.decision == D.DECISION_TYPE_ALLOW
    assert resp.rule_id == "r"


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n"])
def test_empty_document_is_an_empty_policy(text: str) -> None:
    policy = parse_policy(text, source="s")
    assert policy.rules == ()
    assert dict(policy.tenants) == {}
    assert decide(build_policy_set(("s", text)), "job.a").decision == D.DECISION_TYPE_ALLOW


def test_every_validation_error_is_reported_with_its_field_path() -> None:
    error = invalid(
        """
        version: 3
        rules:
          - id: ok
            decision: allow
          - id: broken
            decision: maybe
            colour: red
            match:
              topics: ["job.[", ""]
              tenants: [1]
              secrets_present: "yes"
              labels: {env: 1}
              shape: round
              mcp: {allow_servers: github, deny_everything: [x]}
              cel: "topic =="
            constraints:
              budgets: {max_runtime_ms: -1, max_retries: 3000000000, max_slots: 1}
              sandbox: {isolated: "no"}
              diff: {max_files: 1.5}
            remediations:
              - id: r
                replacement_topic: 7
                extra: true
          - id: throttled
            decision: deny
            retry_after_ms: 10
        tenants:
          acme:
            allow_topics: job.acme.*
            max_concurrent_jobs: -2
            owners: [bob]
        """
    )
    assert fields(error) == {
        "version": "must be a string, got an integer",
        "rules[1].colour": (
            "unknown field (allowed: constraints, decision, id, match, reason, remediations, "
            "retry_after_ms)"
        ),
        "rules[1].decision": fields(error)["rules[1].decision"],
        "rules[1].match.shape": fields(error)["rules[1].match.shape"],
        "rules[1].match.tenants[0]": "must be a string, got an integer",
        "rules[1].match.topics[0]": 'bad topic glob "job.[": bad character class',
        "rules[1].match.topics[1]": 'bad topic glob "": empty pattern',
        "rules[1].match.cel": fields(error)["rules[1].match.cel"],
        "rules[1].match.labels.env": "must be a string, got an integer",
        "rules[1].match.secrets_present": "must be true or false, got a string",
        "rules[1].match.mcp.deny_everything": fields(error)["rules[1].match.mcp.deny_everything"],
        "rules[1].match.mcp.allow_servers": "must be a list of strings, got a string",
        "rules[1].constraints.budgets.max_slots": fields(error)[
            "rules[1].constraints.budgets.max_slots"
        ],
        "rules[1].constraints.budgets.max_runtime_ms": "must be >= 0",
        "rules[1].constraints.budgets.max_retries": "must be <= 2147483647",
        "rules[1].constraints.sandbox.isolated": "must be true or false, got a string",
        "rules[1].constraints.diff.max_files": "must be an integer, got a number",
        "rules[1].remediations[0].extra": fields(error)["rules[1].remediations[0].extra"],
        "rules[1].remediations[0].replacement_topic": "must be a string, got an integer",
        "rules[2].retry_after_ms": "only valid on a rule with decision throttle",
        "tenants.acme.owners": fields(error)["tenants.acme.owners"],
        "tenants.acme.allow_topics": "must be a list of strings, got a string",
        "tenants.acme.max_concurrent_jobs": "must be >= 0",
    }
    assert 'unknown decision "maybe"' in fields(error)["rules[1].decision"]
    assert fields(error)["rules[1].match.shape"].startswith("unknown field")
    assert fields(error)["rules[1].match.cel"].startswith("invalid CEL")
    assert fields(error)["tenants.acme.owners"].startswith("unknown field")
    assert "bundle-x" in error.message
    assert error.metadata == {"source": "bundle-x"}
    assert "rules[1].decision" in error.message


def test_yaml_syntax_error_names_the_position() -> None:
    error = invalid("rules:\n  - id: a\n    decision: [allow\n")
    assert list(fields(error)) == ["yaml"]
    assert "line" in fields(error)["yaml"]


def test_duplicate_keys_are_rejected_like_yaml_v3() -> None:
    error = invalid("rules:\n  - id: a\n    decision: allow\n    decision: deny\n")
    assert "duplicate key 'decision'" in fields(error)["yaml"]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    assert "document" in fields(invalid(text))


def test_yaml_1_2_scalars_stay_strings_like_upstream() -> None:
    # PyYAML's YAML 1.1 would read these as bool/int/date and fail the string checks.
    policy = parse_policy(
        textwrap.dedent(
            """
            version: 2024-01-01
            rules:
              - id: r
                match:
                  labels: {approved: yes, window: 12:30, legacy: off, day: 2024-01-01}
                decision: allow
            """
        ),
        source="s",
    )
    assert policy.version == "2024-01-01"
    assert policy.rules[0].match.labels == {
        "approved": "yes",
        "window": "12:30",
        "legacy": "off",
        "day": "2024-01-01",
    }


def test_yaml_1_2_numbers_and_bools_still_parse() -> None:
    policy = parse_policy(
        "rules:\n  - decision: allow\n    match: {secrets_present: True}\n"
        "    constraints: {budgets: {max_runtime_ms: 0x10, max_retries: 0o7},"
        " sandbox: {isolated: FALSE}}\n",
        source="s",
    )
    rule = policy.rules[0]
    assert rule.match.secrets_present is True
    assert rule.constraints.budgets.max_runtime_ms == 16
    assert rule.constraints.budgets.max_retries == 7


def test_labels_with_unquoted_non_string_values_are_rejected() -> None:
    assert "rules[0].match.labels.n" in fields(invalid("rules:\n  - match: {labels: {n: 5}}\n"))


def test_cel_with_unknown_variable_is_a_load_error() -> None:
    error = invalid("rules:\n  - match: {cel: 'toppic == \"job.a\"'}\n    decision: deny\n")
    assert "unknown variable(s) toppic" in fields(error)["rules[0].match.cel"]


def test_cel_comprehension_variables_are_not_unknown() -> None:
    parse_policy(
        'rules:\n  - match: {cel: \'meta.risk_tags.exists(t, t == "x")'
        ' && labels.all(k, k != "")\'}\n',
        source="s",
    )


def test_null_values_read_as_absent() -> None:
    policy = parse_policy(
        "rules:\n  - id: r\n    match:\n    constraints:\n    remediations:\n"
        "tenants:\n  t:\n    allow_topics:\n",
        source="s",
    )
    assert policy.rules[0].match.topics == ()
    assert policy.tenants["t"].allow_topics == ()


# -- decisions -------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> PolicySet:
    return build_policy_set(("file:safety.yaml", UPSTREAM_POLICY))


def test_deny_rule_returns_reason_rule_id_snapshot_and_remediations(upstream: PolicySet) -> None:
    resp = decide(
        upstream,
        "job.acme.db.migrate",
        tenant="acme",
        labels={"env": "prod"},
        meta={"capability": "DB.Write ", "actor_type": job_pb2.ACTOR_TYPE_SERVICE},
    )
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.reason == "services may not write to prod"
    assert resp.rule_id == "block-prod-writes-by-services"
    assert resp.policy_snapshot == upstream.snapshot
    assert not resp.approval_required
    [remediation] = resp.remediations
    assert remediation.replacement_topic == "job.acme.db.staging-write"
    assert dict(remediation.add_labels) == {"env": "staging"}
    assert list(remediation.remove_labels) == ["prod_ticket"]


def test_labels_compare_case_sensitively(upstream: PolicySet) -> None:
    resp = decide(
        upstream,
        "job.acme.db.migrate",
        tenant="acme",
        labels={"env": "PROD"},
        meta={"capability": "db.write", "actor_type": job_pb2.ACTOR_TYPE_SERVICE},
    )
    assert resp.rule_id != "block-prod-writes-by-services"


def test_require_approval_sets_approval_ref_to_the_job_id(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.a", job_id="job-42", labels={"secrets_present": "true"})
    assert resp.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert resp.approval_required
    assert resp.approval_ref == "job-42"
    assert resp.reason == "jobs handling secrets need a human"


def test_requires_needs_every_entry_and_risk_tags_any(upstream: PolicySet) -> None:
    meta = {"risk_tags": ["Irreversible"], "requires": ["kubectl", "helm"]}
    assert decide(upstream, "job.ops", meta=meta).rule_id == "risky-ops"
    meta = {"risk_tags": ["irreversible"], "requires": ["helm"]}
    assert decide(upstream, "job.ops", meta=meta).rule_id == "legacy:default:allow:1"


def test_allow_with_constraints_returns_every_constraint(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.hello", meta={"pack_id": "Hello-Pack"})
    assert resp.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    assert resp.reason == ""
    c = resp.constraints
    assert (c.budgets.max_runtime_ms, c.budgets.max_retries) == (60000, 2)
    assert (c.budgets.max_artifact_bytes, c.budgets.max_concurrent_jobs) == (1048576, 3)
    assert c.sandbox.isolated
    assert list(c.sandbox.network_allowlist) == ["api.github.com"]
    assert list(c.toolchain.allowed_commands) == ["git status"]
    assert (c.diff.max_files, c.diff.max_lines) == (10, 500)
    assert c.redaction_level == "strict"


def test_allow_rule_with_constraints_becomes_allow_with_constraints(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.report.daily")
    assert resp.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    assert resp.constraints.budgets.max_runtime_ms == 5000
    # Same shape as upstream: all four sub-messages present.
    assert all(resp.constraints.HasField(p) for p in ("budgets", "sandbox", "toolchain", "diff"))


def test_allow_rule_with_all_zero_constraints_is_plain_allow() -> None:
    ps = policy_set(
        """
        rules:
          - id: r
            decision: allow
            reason: ignored for allow
            constraints: {budgets: {max_runtime_ms: 0}, sandbox: {isolated: false},
                          redaction_level: "  "}
        """
    )
    resp = decide(ps)
    assert resp.decision == D.DECISION_TYPE_ALLOW
    assert not resp.HasField("constraints")
    assert resp.reason == ""


def test_permit_alias_allows(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.a", principal_id="ALICE")
    assert (resp.decision, resp.rule_id) == (D.DECISION_TYPE_ALLOW, "on-call")


def test_actor_id_prefers_meta_over_principal(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.a", principal_id="alice", meta={"actor_id": "bob"})
    assert resp.rule_id != "on-call"


def test_throttle_carries_retry_after_in_reason_and_evaluation(upstream: PolicySet) -> None:
    ev = evaluate(upstream, request("job.bulk.import"))
    assert ev.response.decision == D.DECISION_TYPE_THROTTLE
    assert ev.response.reason == "bulk jobs are rate limited (retry_after_ms=5000)"
    assert ev.retry_after_ms == 5000
    assert retry_after_ms(ev.response) == 5000
    assert not ev.response.approval_required


def test_throttle_retry_after_is_configurable_per_rule() -> None:
    ps = policy_set("rules:\n  - decision: throttle\n    retry_after_ms: 250\n")
    ev = evaluate(ps, request())
    assert ev.retry_after_ms == 250
    assert ev.response.reason == "throttled (retry_after_ms=250)"
    assert retry_after_ms(ev.response) == 250


def test_retry_after_helper_ignores_other_decisions_and_plain_reasons() -> None:
    deny = safety_pb2.PolicyCheckResponse(
        decision=D.DECISION_TYPE_DENY, reason="x (retry_after_ms=5)"
    )
    assert retry_after_ms(deny) is None
    upstream_throttle = safety_pb2.PolicyCheckResponse(
        decision=D.DECISION_TYPE_THROTTLE, reason="slow down"
    )
    assert retry_after_ms(upstream_throttle) is None


def test_missing_and_unsupported_topics_are_denied_without_snapshot(upstream: PolicySet) -> None:
    for topic, reason in [
        ("", "missing topic"),
        ("  ", "missing topic"),
        ("sys.x", "unsupported topic"),
    ]:
        resp = decide(upstream, topic)
        assert (resp.decision, resp.reason) == (D.DECISION_TYPE_DENY, reason)
        assert resp.policy_snapshot == ""
        assert resp.rule_id == ""


def test_no_policy_at_all_allows() -> None:
    resp = decide(build_policy_set(None), "job.a")
    assert resp.decision == D.DECISION_TYPE_ALLOW
    assert resp.policy_snapshot == ""


def test_first_matching_rule_wins() -> None:
    ps = policy_set(
        """
        rules:
          - {id: first, match: {topics: ["job.a.*"]}, decision: deny, reason: one}
          - {id: second, match: {topics: ["job.*"]}, decision: require_approval}
        """
    )
    assert decide(ps, "job.a.b").rule_id == "first"
    assert decide(ps, "job.b").rule_id == "second"


def test_tenant_resolution_order() -> None:
    ps = policy_set(
        """
        default_tenant: fallback
        rules:
          - {id: req, match: {tenants: [Acme]}, decision: deny}
          - {id: meta, match: {tenants: [beta]}, decision: deny}
          - {id: fallback, match: {tenants: [fallback]}, decision: deny}
        """
    )
    assert decide(ps, tenant=" acme ", meta={"tenant_id": "beta"}).rule_id == "req"
    assert decide(ps, meta={"tenant_id": "beta"}).rule_id == "meta"
    assert decide(ps).rule_id == "fallback"
    no_default = policy_set("rules:\n  - {id: d, match: {tenants: [default]}, decision: deny}\n")
    assert decide(no_default).rule_id == "d"


# -- tenants ---------------------------------------------------------------------------------


def test_legacy_tenant_rules_without_rules_behave_like_upstream(upstream: PolicySet) -> None:
    ps = policy_set(
        """
        tenants:
          default:
            allow_topics: ["job.*"]
            deny_topics: ["job.secret.*"]
        """
    )
    resp = decide(ps, "job.secret.read")
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.rule_id == "legacy:default:deny:1"
    assert resp.reason == 'topic "job.secret.*" denied by tenant policy'
    assert decide(ps, "job.ok").rule_id == "legacy:default:allow:1"


def test_upstream_sharp_edge_tenant_deny_topics_still_apply_when_rules_exist(
    upstream: PolicySet,
) -> None:
    # Upstream dropped every tenant list once any rule existed: this would have been allowed.
    resp = decide(upstream, "job.forbidden.thing", principal_id="alice")
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.rule_id == "legacy:default:deny:2"
    assert resp.reason == 'topic "job.forbidden.*" denied by tenant policy'


def test_upstream_sharp_edge_tenant_deny_topics_survive_a_fragment_with_rules() -> None:
    ps = policy_set(
        "tenants:\n  default:\n    deny_topics: ['job.danger.*']\n",
        ("pack/overlay", "rules:\n  - {id: allow-all, decision: allow}\n"),
    )
    assert decide(ps, "job.danger.x").decision == D.DECISION_TYPE_DENY
    assert decide(ps, "job.safe").rule_id == "allow-all"


def test_upstream_sharp_edge_tenant_allow_topics_is_a_real_allowlist(
    upstream: PolicySet,
) -> None:
    resp = decide(upstream, "job.other.thing", tenant="acme")
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.reason == 'topic "job.other.thing" not allowed for tenant "acme"'
    assert resp.rule_id == "legacy:acme:allow_topics"
    assert decide(upstream, "job.shared.x", tenant="acme").decision != D.DECISION_TYPE_DENY


def test_tenant_without_entry_is_not_gated(upstream: PolicySet) -> None:
    assert decide(upstream, "job.anything", tenant="zeta").decision == D.DECISION_TYPE_ALLOW


def test_upstream_sharp_edge_repo_hosts_are_enforced() -> None:
    ps = policy_set(
        """
        tenants:
          default:
            allowed_repo_hosts: [github.com, gitlab.example.com]
            denied_repo_hosts: [evil.example.com]
        """
    )
    assert decide(ps, labels={"repo.host": "GitHub.com"}).decision == D.DECISION_TYPE_ALLOW
    denied = decide(ps, labels={"repo_host": "evil.example.com"})
    assert denied.decision == D.DECISION_TYPE_DENY
    assert denied.reason == 'repo host "evil.example.com" denied for tenant "default"'
    outside = decide(ps, labels={"repoHost": "bitbucket.org"})
    assert outside.reason == 'repo host "bitbucket.org" not allowed for tenant "default"'
    assert outside.rule_id == "legacy:default:repo_host"
    # Jobs that name no repository are not affected.
    assert decide(ps).decision == D.DECISION_TYPE_ALLOW


def test_upstream_sharp_edge_tenant_max_concurrent_jobs_becomes_a_constraint(
    upstream: PolicySet,
) -> None:
    resp = decide(upstream, "job.acme.x", tenant="acme")
    assert resp.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    assert resp.constraints.budgets.max_concurrent_jobs == 5
    # min with the rule's own limit
    resp = decide(upstream, "job.acme.x", tenant="acme", meta={"pack_id": "hello-pack"})
    assert resp.constraints.budgets.max_concurrent_jobs == 3
    # not on denials
    deny = decide(upstream, "job.x", tenant="acme")
    assert deny.decision == D.DECISION_TYPE_DENY
    assert deny.constraints.budgets.max_concurrent_jobs == 0


def test_tenant_limit_takes_the_smaller_of_rule_and_tenant() -> None:
    ps = policy_set(
        """
        tenants: {t: {max_concurrent_jobs: 2}}
        rules:
          - {decision: allow, constraints: {budgets: {max_concurrent_jobs: 9}}}
        """
    )
    assert decide(ps, tenant="t").constraints.budgets.max_concurrent_jobs == 2


# -- MCP -------------------------------------------------------------------------------------


def test_tenant_mcp_deny_list_overrides_and_keeps_the_rule(upstream: PolicySet) -> None:
    resp = decide(
        upstream, "job.report.x", labels={"mcp.server": "evil.example.com", "mcp.tool": "read"}
    )
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.reason == 'mcp server "evil.example.com" denied'
    assert resp.rule_id == "report-constraints"
    assert resp.constraints.budgets.max_runtime_ms == 5000


def test_mcp_action_is_lower_cased_and_label_variants_are_read(upstream: PolicySet) -> None:
    resp = decide(upstream, "job.a", labels={"mcpServer": "ok", "mcp_action": " DELETE "})
    assert resp.reason == 'mcp action "delete" denied'


def test_mcp_allowlist_requires_the_field() -> None:
    ps = policy_set("tenants:\n  default:\n    mcp: {allow_servers: [github.com]}\n")
    resp = decide(ps, labels={"mcp.tool": "read"})
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.reason == 'mcp server "" not allowed'


def test_upstream_sharp_edge_mcp_only_rule_no_longer_matches_non_mcp_requests(
    upstream: PolicySet,
) -> None:
    # Upstream: the mcp-github rule (only an mcp condition) matched *every* non-MCP job.
    plain = decide(upstream, "job.plain")
    assert plain.rule_id != "mcp-github"
    assert plain.decision == D.DECISION_TYPE_ALLOW
    mcp = decide(upstream, "job.plain", labels={"mcp.server": "GitHub", "mcp.action": "read"})
    assert mcp.rule_id == "mcp-github"
    assert mcp.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    other = decide(upstream, "job.plain", labels={"mcp.server": "gitlab", "mcp.action": "read"})
    assert other.rule_id != "mcp-github"


def test_rule_with_only_empty_mcp_lists_has_no_mcp_condition() -> None:
    ps = policy_set("rules:\n  - {id: r, match: {mcp: {allow_servers: []}}, decision: deny}\n")
    assert decide(ps).rule_id == "r"


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "tags", "expected"),
    [
        ({"secrets_present": "true"}, [], True),
        ({"secrets_present": "1"}, [], True),
        ({"secrets_present": "Yes"}, [], True),
        ({"secrets_present": "false"}, ["secrets"], False),  # the label wins
        ({"secrets_present": "  "}, ["SECRETS"], True),  # blank label: tags decide
        ({}, ["secrets"], True),
        ({}, ["other"], False),
    ],
)
def test_secrets_flag(labels: dict[str, str], tags: list[str], expected: bool) -> None:
    ps = policy_set("rules:\n  - {id: s, match: {secrets_present: true}, decision: deny}\n")
    resp = decide(ps, labels=labels, meta={"risk_tags": tags})
    assert (resp.rule_id == "s") is expected


def test_upstream_sharp_edge_secrets_label_true_is_case_insensitive() -> None:
    ps = policy_set("rules:\n  - {id: s, match: {secrets_present: true}, decision: deny}\n")
    assert decide(ps, labels={"secrets_present": "TRUE"}).rule_id == "s"


# -- effective config ------------------------------------------------------------------------


def test_effective_config_denied_topics_override_everything(upstream: PolicySet) -> None:
    eff = json.dumps({"safety": {"denied_topics": ["job.a*"]}}).encode()
    resp = decide(upstream, "job.abc", effective_config=eff, labels={"secrets_present": "1"})
    assert resp.decision == D.DECISION_TYPE_DENY
    assert resp.reason == "topic 'job.abc' denied by effective config"
    # The matched rule's id stays, as upstream.
    assert resp.rule_id == "secrets-need-approval"


def test_upstream_sharp_edge_overridden_approval_is_not_still_required(
    upstream: PolicySet,
) -> None:
    eff = json.dumps({"safety": {"denied_topics": ["job.a"]}}).encode()
    resp = decide(upstream, "job.a", effective_config=eff, labels={"secrets_present": "1"})
    assert resp.decision == D.DECISION_TYPE_DENY
    assert not resp.approval_required
    assert resp.approval_ref == ""


def test_effective_config_under_data_safety_and_allowed_topics() -> None:
    ps = policy_set("")
    eff = json.dumps({"version": 3, "data": {"safety": {"allowed_topics": ["job.ok.*"]}}})
    resp = decide(ps, "job.other", effective_config=eff.encode())
    assert resp.reason == "topic 'job.other' not allowed by effective config"
    assert decide(ps, "job.ok.1", effective_config=eff.encode()).decision == D.DECISION_TYPE_ALLOW


def test_effective_config_mcp_and_repo_hosts() -> None:
    ps = policy_set("")
    eff = json.dumps(
        {"safety": {"mcp": {"deny_tools": ["rm"]}, "denied_repo_hosts": ["bad.io"]}}
    ).encode()
    assert decide(ps, effective_config=eff, labels={"mcp.tool": "RM"}).reason == (
        'mcp tool "RM" denied'
    )
    assert decide(ps, effective_config=eff, labels={"repo.host": "bad.io"}).reason == (
        'repo host "bad.io" denied by effective config'
    )


def test_effective_config_last_violation_reason_wins_like_upstream() -> None:
    ps = policy_set("")
    eff = json.dumps(
        {"safety": {"denied_topics": ["job.a"], "mcp": {"deny_servers": ["s"]}}}
    ).encode()
    assert decide(ps, effective_config=eff, labels={"mcp.server": "s"}).reason == (
        'mcp server "s" denied'
    )


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"safety": 5}', b'{"safety": {"denied_topics": "job.a"}}'],
)
def test_malformed_effective_config_is_ignored(raw: bytes) -> None:
    assert decide(policy_set(""), effective_config=raw).decision == D.DECISION_TYPE_ALLOW


def test_effective_config_falls_back_to_data_when_top_level_section_is_malformed() -> None:
    raw = json.dumps(
        {"safety": {"denied_topics": 1}, "data": {"safety": {"denied_topics": ["job.a"]}}}
    ).encode()
    parsed = parse_effective_safety(raw)
    assert parsed is not None and parsed.denied_topics == ("job.a",)


# -- CEL -------------------------------------------------------------------------------------


CEL_POLICY = """
rules:
  - id: big-batch
    match:
      topics: ["job.*"]
      cel: >-
        priority == "BATCH" && budget.max_total_tokens > 100000
        && estimated_cost >= 2.5 && input_size_bytes < 1024
    decision: throttle
    retry_after_ms: 30000
  - id: prod-by-service
    match:
      cel: >-
        "env" in labels && labels.env == "prod" && meta.actor_type == "service"
        && meta.risk_tags.exists(t, t == "write") && tenant == "default"
        && principal_id.startsWith("svc-") && meta.labels.team == "core"
    decision: require_approval
  - id: erroring
    match:
      cel: labels.missing == "x"
    decision: deny
  - id: not-bool
    match:
      cel: size(topic)
    decision: deny
  - id: mcp-and-secrets
    match:
      cel: mcp.server == "db" && secrets_present
    decision: deny
"""


def test_cel_rule_matches_on_priority_budget_cost_and_size() -> None:
    ps = policy_set(CEL_POLICY)
    ev = evaluate(
        ps,
        request(
            priority=job_pb2.JOB_PRIORITY_BATCH,
            budget=job_pb2.Budget(max_total_tokens=200000),
            estimated_cost=3.0,
            input_size_bytes=10,
        ),
    )
    assert ev.response.rule_id == "big-batch"
    assert ev.retry_after_ms == 30000
    assert decide(ps, priority=job_pb2.JOB_PRIORITY_INTERACTIVE).rule_id == ""


def test_cel_rule_reads_labels_and_meta() -> None:
    ps = policy_set(CEL_POLICY)
    resp = decide(
        ps,
        principal_id="svc-deployer",
        labels={"env": "prod"},
        meta={
            "actor_type": job_pb2.ACTOR_TYPE_SERVICE,
            "risk_tags": ["write"],
            "labels": {"team": "core"},
        },
    )
    assert resp.rule_id == "prod-by-service"
    assert resp.decision == D.DECISION_TYPE_REQUIRE_HUMAN


def test_cel_reads_mcp_and_secrets_flag() -> None:
    ps = policy_set(CEL_POLICY)
    resp = decide(ps, labels={"mcp.server": "db", "secrets_present": "yes", "missing": "no"})
    assert resp.rule_id == "mcp-and-secrets"


def test_cel_reads_the_effective_config() -> None:
    ps = policy_set(
        """\
        rules:
          - id: over-budget
            match:
              cel: '"limits" in config && config.limits.max_cost < 5.0'
            decision: deny
            reason: over the configured budget
        """
    )
    snapshot = {"version": "system:1|org:2", "hash": "h", "data": {"limits": {"max_cost": 2}}}
    denied = decide(ps, effective_config=json.dumps(snapshot).encode())
    assert (denied.rule_id, denied.decision) == ("over-budget", D.DECISION_TYPE_DENY)
    # A bare document works too; no config at all (or one that is not JSON) is `{}`.
    assert decide(ps, effective_config=b'{"limits": {"max_cost": 1}}').rule_id == "over-budget"
    assert decide(ps, effective_config=b'{"limits": {"max_cost": 50}}').rule_id == ""
    assert decide(ps).decision == D.DECISION_TYPE_ALLOW
    assert decide(ps, effective_config=b"not json").decision == D.DECISION_TYPE_ALLOW


def test_cel_evaluation_error_means_no_match_and_is_explained() -> None:
    ps = policy_set(CEL_POLICY)
    ev = explain(ps, labels={"env": "dev"})
    assert ev.response.decision == D.DECISION_TYPE_ALLOW
    traces = {t.rule_id: t for t in ev.rules}
    assert not traces["erroring"].matched
    assert "evaluation error" in traces["erroring"].detail
    assert "missing" in traces["erroring"].detail
    assert not traces["not-bool"].matched
    assert "is not a bool" in traces["not-bool"].detail
    assert traces["prod-by-service"].detail == "cel: false"


def test_cel_activation_trims_fixed_maps_to_the_fields_read() -> None:
    policy = parse_policy(
        'rules:\n  - match: {cel: \'meta.capability == "x" && budget["deadline_ms"] > 0\'}\n'
        "  - match: {cel: 'labels.size() > 0'}\n",
        source="s",
    )
    assert policy.cel_needs == {
        "meta": frozenset({"capability"}),
        "budget": frozenset({"deadline_ms"}),
        "labels": None,
    }


# -- explain ---------------------------------------------------------------------------------


def test_explain_traces_every_rule_with_source_and_reason(upstream: PolicySet) -> None:
    ev = explain(upstream, "job.bulk.load", principal_id="alice")
    traces = ev.rules
    assert [t.rule_id for t in traces] == [r.id for r in upstream.policy.rules]
    assert all(t.source == "file:safety.yaml" for t in traces)
    by_id = {t.rule_id: t for t in traces}
    assert by_id["block-prod-writes-by-services"].detail == ("tenant \"default\" not in ['acme']")
    assert by_id["on-call"].matched
    assert by_id["on-call"].detail == "matched: actor_ids hold"
    assert by_id["on-call"].decision == D.DECISION_TYPE_ALLOW
    # A later matching rule is shown, but marked as not decisive.
    assert by_id["batch-throttle"].matched
    assert "not decisive: rule on-call matched first" in by_id["batch-throttle"].detail
    assert by_id["mcp-github"].detail == "mcp: the request carries no MCP labels"
    assert ev.response.rule_id == "on-call"
    assert ev.rule is not None and ev.rule.id == "on-call"
    proto = by_id["on-call"].to_proto()
    assert (proto.rule_id, proto.matched, proto.source) == ("on-call", True, "file:safety.yaml")


def test_explain_notes_tenant_gate_and_overrides(upstream: PolicySet) -> None:
    ev = explain(upstream, "job.forbidden.x")
    assert ev.rules[0].rule_id == "legacy:default:deny:2"
    assert ev.rules[0].source == "tenants.default"
    assert any("deny_topics[1]" in n for n in ev.notes)
    eff = json.dumps({"safety": {"denied_topics": ["job.a"]}}).encode()
    ev = explain(upstream, "job.a", effective_config=eff)
    assert any(n.startswith("effective config overrides to DENY") for n in ev.notes)
    ev = explain(upstream, "job.a", labels={"mcp.server": "evil.example.com"})
    assert any("MCP lists override" in n for n in ev.notes)


def test_explain_and_plain_evaluation_agree(upstream: PolicySet) -> None:
    for topic in ["job.a", "job.bulk.x", "job.forbidden.y", "job.report.z", "sys.q"]:
        assert explain(upstream, topic).response == decide(upstream, topic)


def test_rule_without_id_is_labelled_by_position() -> None:
    ev = explain(policy_set("rules:\n  - decision: deny\n", source="bundle-a"))
    assert ev.rules[0].rule_id == "bundle-a#rules[0]"
    assert ev.response.rule_id == ""


# -- snapshots and merge ---------------------------------------------------------------------


def test_snapshot_matches_upstream_formula_and_is_stable() -> None:
    text = "version: v7\nrules: []\n"
    ps = build_policy_set(("file:a", text))
    assert ps.snapshot == "v7:" + hashlib.sha256(text.encode()).hexdigest()
    assert build_policy_set(("file:a", text)).snapshot == ps.snapshot
    unversioned = "rules: []\n"
    assert build_policy_set(("file:a", unversioned)).snapshot == (
        hashlib.sha256(unversioned.encode()).hexdigest()
    )


def test_snapshot_changes_with_any_byte_of_any_source() -> None:
    base = ("file:a", "rules: []\n")
    one = build_policy_set(base, [("secops/x", "rules: []\n")]).snapshot
    assert one.count("|cfg:") == 1
    assert build_policy_set(base, [("secops/x", "rules: [] \n")]).snapshot != one
    assert build_policy_set(base, [("secops/y", "rules: []\n")]).snapshot != one
    assert (
        build_policy_set(("file:a", "rules: [] # c\n"), [("secops/x", "rules: []\n")]).snapshot
        != one
    )
    # Blank extra sources are skipped, like upstream's empty fragments.
    assert build_policy_set(base, [("secops/x", "  ")]).snapshot == build_policy_set(base).snapshot
    expected = hashlib.sha256(b"secops/x\0rules: []\n").hexdigest()
    assert snapshot_id(None, "", [("secops/x", "rules: []\n")]) == f"cfg:{expected}"
    assert snapshot_id(None, "", []) == ""


def test_sources_are_recorded_in_order() -> None:
    ps = build_policy_set(("file:a", "rules: []\n"), [("b", "version: x\n"), ("c", "")])
    assert [s.name for s in ps.sources] == ["file:a", "b"]
    assert ps.sources[1].sha256 == hashlib.sha256(b"version: x\n").hexdigest()


def test_invalid_extra_source_fails_the_build_naming_the_source() -> None:
    with pytest.raises(CordumError) as caught:
        build_policy_set(("file:a", ""), [("secops/bad", "rules:\n  - decision: nope\n")])
    assert caught.value.metadata == {"source": "secops/bad"}
    assert caught.value.violations[0].field == "rules[0].decision"


def test_merge_follows_upstream() -> None:
    a = parse_policy(
        """
default_tenant: ""
tenants:
  t:
    allow_topics: [job.a]
    deny_topics: [job.x]
    allowed_repo_hosts: [h1]
    max_concurrent_jobs: 0
    mcp: {deny_servers: [s1]}
rules:
  - id: a1
""",
        source="a",
    )
    b = parse_policy(
        """
version: v2
default_tenant: bee
tenants:
  t:
    allow_topics: [job.b]
    denied_repo_hosts: [h2]
    max_concurrent_jobs: 7
    mcp: {deny_servers: [s2], allow_tools: [t]}
  u:
    max_concurrent_jobs: 3
rules:
  - id: b1
  - id: b2
""",
        source="b",
    )
    c = parse_policy(
        "version: v3\ntenants:\n  t: {max_concurrent_jobs: 4}\n  u: {max_concurrent_jobs: 9}\n",
        source="c",
    )
    merged = merge([a, b, c])
    assert (merged.version, merged.default_tenant) == ("v2", "bee")
    assert [(r.id, r.source) for r in merged.rules] == [("a1", "a"), ("b1", "b"), ("b2", "b")]
    t = merged.tenants["t"]
    assert t.allow_topics == ("job.a", "job.b")
    assert t.deny_topics == ("job.x",)
    assert (t.allowed_repo_hosts, t.denied_repo_hosts) == (("h1",), ("h2",))
    assert t.mcp.deny_servers == ("s1", "s2")
    assert t.mcp.allow_tools == ("t",)
    assert t.max_concurrent_jobs == 4  # smallest positive
    assert merged.tenants["u"].max_concurrent_jobs == 3
    assert merge([]).rules == ()
