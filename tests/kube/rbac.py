"""RBAC authorization as kube-apiserver's RBAC authorizer decides it, over the Roles, ClusterRoles and
their bindings stored in the emulated API server.

Enforced only for the tokens a test registers (`EmulatedApiServer.authorize_token`): each maps to a
user (a ServiceAccount's is `system:serviceaccount:<namespace>:<name>`, in the groups
`system:serviceaccounts`, `system:serviceaccounts:<namespace>` and `system:authenticated`). Every
other token is the cluster's admin, as the test harness's own kubeconfig is. Non-resource URLs
(discovery, /version, /openapi) are granted to every authenticated user, as the default
`system:discovery` ClusterRole does. Not emulated: aggregated ClusterRoles, impersonation,
escalation checks on writing RBAC objects.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> "User":
        return cls(f"system:serviceaccount:{namespace}:{name}",
                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


@dataclasses.dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None  # None: cluster-scoped, or across all namespaces
    name: str | None = None


def _binds(binding: Obj, user: User) -> bool:
    for subject in binding.get("subjects") or ():
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "ServiceAccount" and user.name == f"system:serviceaccount:{subject.get('namespace')}:{name}":
            return True
        if kind == "User" and name == user.name:
            return True
        if kind == "Group" and name in user.groups:
            return True
    return False


def _matches(rule: Obj, request: Request) -> bool:
    def has(values, value) -> bool:
        values = values or ()
        return "*" in values or value in values

    if not has(rule.get("apiGroups"), request.group) or not has(rule.get("verbs"), request.verb):
        return False
    resources = rule.get("resources") or ()
    parent = request.resource.split("/")[0]
    if not (has(resources, request.resource) or (
            "/" in request.resource and f"{parent}/*" in resources) or ("*" in resources and "/" not in request.resource)):
        return False
    names = rule.get("resourceNames")
    return not names or request.name in names


def allowed(request: Request, user: User, roles: Mapping[tuple[str, str | None, str], Obj],
            bindings: Iterable[Obj]) -> bool:
    """Whether some binding of `user` grants `request`. `roles` by (kind, namespace or None, name);
    a RoleBinding grants in its own namespace only, a ClusterRoleBinding everywhere."""
    for binding in bindings:
        if not _binds(binding, user):
            continue
        scope = binding["metadata"].get("namespace") if binding.get("kind") == "RoleBinding" else None
        if scope is not None and request.namespace != scope:
            continue
        ref = binding.get("roleRef") or {}
        role = roles.get((ref.get("kind"), scope if ref.get("kind") == "Role" else None, ref.get("name")))
        if role is not None and any(_matches(rule, request) for rule in role.get("rules") or ()):
            return True
    return False


def forbidden_message(request: Request, user: User) -> str:
    """As kube-apiserver words a refusal."""
    qualified = f"{request.resource.split('/')[0]}.{request.group}" if request.group else request.resource.split("/")[0]
    what = f'{qualified} "{request.name}"' if request.name else qualified
    where = f'in the namespace "{request.namespace}"' if request.namespace else "at the cluster scope"
    group = f'in API group "{request.group}"'
    return f'{what} is forbidden: User "{user.name}" cannot {request.verb} resource "{request.resource}" {group} {where}'
