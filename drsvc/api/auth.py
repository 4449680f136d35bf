"""Bearer tokens: who is asking (a ``Principal``), with which role, for which tenants.

1. Tokens are stored hashed: ``"sha256:" + hex(SHA-256(token))``, from ``[api.tokens.<name>]`` in the config
   and the ``[tokens.<name>]`` tables of ``api.tokens_file`` (re-read on SIGHUP). A name in both is an error.
2. A request's ``Authorization: Bearer <token>`` is hashed and compared with every stored hash in constant
   time (``hmac.compare_digest``, no early exit), so timing tells nothing about which hash came close.
3. No header, a malformed one or an unknown token: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``.
4. Roles are ordered viewer < operator < admin; ``require(principal, role)`` raises 403 ``forbidden`` naming
   the role needed; ``require_tenant`` raises 403 naming the token and its own tenants, never the other
   tenant (a 403 must not tell a caller which tenant owns a source or job it may not see).
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drsvc.api.errors import ApiError
from drsvc.core.config import ROLES, Config, Role, TokenConfig
from drsvc.core.errors import ConfigError


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    tenants: tuple[str, ...]  # ("*",): every tenant

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def sees(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants

    def visible(self, tenants: Iterable[str]) -> bool:
        """Whether every one of `tenants` is within the token's scope."""
        return all(self.sees(t) for t in tenants)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class _TokensFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tokens: dict[str, TokenConfig] = Field(default_factory=dict)


def read_tokens_file(path: Path, config: Config) -> dict[str, TokenConfig]:
    """The ``[tokens.<name>]`` tables of a tokens file; ConfigError naming the file and the key."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(
            f"cannot read the tokens file {str(path)!r}: {exc.strerror}", key="api.tokens_file"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"tokens file {str(path)!r} is not valid TOML: {exc}", key="api.tokens_file"
        ) from None
    try:
        parsed = _TokensFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"tokens file {str(path)!r}: {err['msg']}", key=key) from None
    for name, tok in parsed.tokens.items():
        for t in tok.tenants:
            if t != "*" and t not in config.tenants:
                raise ConfigError(
                    f"tokens file {str(path)!r}: unknown tenant {t!r}", key=f"tokens.{name}.tenants"
                )
    return dict(parsed.tokens)


class TokenTable:
    """Every token the API accepts, by hash; replaced as a whole on reload."""

    def __init__(self, tokens: Mapping[str, TokenConfig]) -> None:
        self._entries = [
            (bytes.fromhex(t.hash.removeprefix("sha256:")), Principal(name, t.role, tuple(t.tenants)))
            for name, t in tokens.items()
        ]

    @classmethod
    def from_config(cls, config: Config) -> TokenTable:
        """The config's tokens plus those of its tokens file; ConfigError when the file is unusable."""
        tokens: dict[str, TokenConfig] = dict(config.api.tokens)
        if config.api.tokens_file is not None:
            for name, tok in read_tokens_file(config.api.tokens_file, config).items():
                if name in tokens:
                    raise ConfigError(
                        f"token {name!r} is defined both in the config and in {config.api.tokens_file}",
                        key=f"api.tokens.{name}",
                    )
                tokens[name] = tok
        return cls(tokens)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for stored, principal in self._entries:  # no early exit: every hash is compared
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="drsvc"'})


def authenticate(table: TokenTable, headers: Mapping[str, Any]) -> Principal:
    value = headers.get("Authorization")
    if not value:
        raise unauthorized("no bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = str(value).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header is not 'Bearer <token>'")
    principal = table.lookup(token.strip())
    if principal is None:
        raise unauthorized("the bearer token is not valid (unknown, revoked or mistyped)")
    return principal


def require(principal: Principal, role: Role, what: str) -> None:
    if not principal.may(role):
        raise ApiError(
            403,
            "forbidden",
            f"{what} needs the {role} role; token {principal.name!r} has the {principal.role} role",
        )


def out_of_scope(principal: Principal, what: str) -> ApiError:
    """403 for something of a tenant outside the token's scope: names the token and its own tenants only."""
    return ApiError(
        403,
        "forbidden",
        f"{what} is outside the scope of token {principal.name!r} (tenants: {', '.join(principal.tenants)})",
    )


def require_tenant(principal: Principal, tenant: str, what: str) -> None:
    if not principal.sees(tenant):
        raise out_of_scope(principal, what)
