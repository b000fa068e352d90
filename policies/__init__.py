"""Who may do what: the Casbin model and default policy (files beside this module, reviewed in
git), the action names, and the one `Authorizer` the app builds at start-up and injects.

Role links come from the caller, who reads them from the members table for every check; this
module stores none. That keeps the policy files the only source of the matrix, and makes a
membership change visible to the very next request in every process.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path

import casbin
from casbin.rbac.role_manager import RoleManager

HERE = Path(__file__).resolve().parent
MODEL_PATH = HERE / "model.conf"
POLICY_PATH = HERE / "policy.csv"


class Action(enum.StrEnum):
    VIEW_WORKSPACE = "workspace.view"
    MANAGE_WORKSPACE = "workspace.manage"
    VIEW_BALANCE = "balance.view"
    VIEW_LEDGER = "ledger.view"
    GENERATE = "generate"
    PURCHASE_CREDITS = "credits.purchase"
    GRANT_CREDITS = "credits.grant"
    TRANSFER_CREDITS = "credits.transfer"
    SET_SPEND_LIMITS = "limits.manage"
    REQUEST_OVERAGE = "overages.request"
    APPROVE_OVERAGES = "overages.approve"
    MANAGE_MEMBERS = "members.manage"
    MANAGE_OWNERS = "members.manage_owners"
    MANAGE_BILLING_GROUPS = "billing_groups.manage"
    MANAGE_AUTO_TOPUP = "auto_topup.manage"  # turn it on, or change it while on
    DISABLE_AUTO_TOPUP = "auto_topup.disable"  # turn it off (and keep it off)
    VIEW_AUDIT_LOG = "audit.view"
    SETTLE_GENERATIONS = "generations.settle"
    START_FOR_MEMBER = "generations.start_for_member"
    MANAGE_CATALOG = "catalog.manage"


PLATFORM_DOMAIN = "*"

# (subject, domain, roles) of the check being evaluated. A ContextVar, not an attribute, so that
# concurrent requests on one event loop can never see each other's roles.
_subject_roles: ContextVar[tuple[str, str, frozenset[str]]] = ContextVar("subject_roles")


class _RequestRoleManager(RoleManager):
    """Answers `g(sub, role, dom)` from the roles handed to the current check."""

    def clear(self) -> None:  # nothing is stored
        pass

    def add_link(self, name1, name2, *domain) -> None:
        raise ValueError("role links come from the members table, not from policy.csv")

    def has_link(self, name1, name2, *domain) -> bool:
        if name1 == name2:
            return True
        subject, dom, roles = _subject_roles.get()
        return name1 == subject and (not domain or domain[0] == dom) and name2 in roles

    def get_roles(self, name, *domain) -> list[str]:
        subject, dom, roles = _subject_roles.get()
        return sorted(roles) if name == subject and (not domain or domain[0] == dom) else []

    def get_users(self, name, *domain) -> list[str]:
        subject, dom, roles = _subject_roles.get()
        return [subject] if name in roles and (not domain or domain[0] == dom) else []


# What a membership holds: one role and one seat (`domain.workspaces.models.Role` and `Seat`).
MEMBER_ROLES = ("owner", "admin", "billing_manager", "member")
MEMBER_SEATS = ("creator", "standard")

SUBJECTS = frozenset(
    {f"role:{r}" for r in MEMBER_ROLES}
    | {f"seat:{s}" for s in MEMBER_SEATS}
    | {"platform:operator", "platform:service"}
)


def _check_policy(rules: list[list[str]]) -> None:
    """A typo in a policy file must stop the process, not silently drop a rule (a misspelled
    `deny` would otherwise stop denying)."""
    actions = {a.value for a in Action}
    for rule in rules:
        sub, _dom, act, eft = rule
        if sub not in SUBJECTS or act not in actions or eft not in ("allow", "deny"):
            raise ValueError(f"invalid policy rule {rule}: subject, action or effect is unknown")


class Authorizer:
    """Built once per process from the policy files and injected into the request context."""

    def __init__(self, model_path: Path = MODEL_PATH, policy_path: Path = POLICY_PATH) -> None:
        self._enforcer = casbin.Enforcer(str(model_path), str(policy_path))
        self._enforcer.set_role_manager(_RequestRoleManager())
        self._enforcer.build_role_links()
        rules = self._enforcer.get_policy()
        _check_policy(rules)
        # Workspaces the policy names in a rule of their own; every other workspace is governed
        # by the "*" rules alone, so a question about it has one answer for all of them.
        self._named_workspaces = frozenset(rule[1] for rule in rules) - {PLATFORM_DOMAIN}
        self._decide = functools.lru_cache(maxsize=65_536)(self._evaluate)
        self._memberships = functools.lru_cache(maxsize=4_096)(self._evaluate_memberships)

    def allows(self, subject: str, roles: Iterable[str], workspace: str, action: Action) -> bool:
        """May `subject`, holding `roles` in `workspace`, do `action` there?

        The answer depends only on the roles, the workspace and the action (the policy is fixed
        for the life of the process, and the subject matters only through its roles), so it is
        memoized: the hot path asks the same few questions on every request."""
        return self._decide(frozenset(roles), workspace, action)

    def memberships_allowed(self, workspace: str, action: Action) -> frozenset[tuple[str, str]]:
        """Every (role, seat) a membership can hold that may do `action` in `workspace`.

        Each pair is asked exactly as `allows` asks for a member holding it (so an explicit deny
        on a seat counts), once per process: for a workspace the policy does not name, the
        answer is the one for every such workspace. For who must hear about something only
        a permission's holders may act on (overage approvers), without a check per member row."""
        return self._memberships(workspace if workspace in self._named_workspaces else PLATFORM_DOMAIN, action)

    def _evaluate_memberships(self, workspace: str, action: Action) -> frozenset[tuple[str, str]]:
        return frozenset(
            (role, seat) for role in MEMBER_ROLES for seat in MEMBER_SEATS
            if self._decide(frozenset({f"role:{role}", f"seat:{seat}"}), workspace, action)
        )

    def _evaluate(self, roles: frozenset[str], workspace: str, action: Action) -> bool:
        token = _subject_roles.set(("subject", workspace, roles))
        try:
            return bool(self._enforcer.enforce("subject", workspace, action.value))
        finally:
            _subject_roles.reset(token)
