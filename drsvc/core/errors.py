"""One error root for drsvc, with domain subtrees.

Every error carries the fields an operator needs to find the problem (site, key, source, object) and a
hint saying what to do about it. The CLI maps the subtrees to exit codes; the API to HTTP statuses.
"""

from __future__ import annotations

# no `typing` at run time: `drsvc wal-push` imports this module on every call (mypy takes any name
# TYPE_CHECKING for true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class DRError(Exception):
    """Root of every error drsvc raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint
        self.fields: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.fields.items())
        text = f"{self.message} ({where})" if where else self.message
        return f"{text}; hint: {self.hint}" if self.hint else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            **{k: str(v) for k, v in self.fields.items()},
        }


class ConfigError(DRError):
    """The configuration is invalid; `key` names the offending setting."""

    hint = "fix the named key in the config file and run `drsvc config check`"


class StoreError(DRError):
    """A site could not carry out a request. Permanent unless it is a TransientStoreError."""

    hint = "check the site's address, credentials and bucket"


class TransientStoreError(StoreError):
    """A request failed in a way that may succeed when retried (network, 5xx, throttling)."""

    hint = "the site may be down or overloaded; drsvc retries and ships the backlog when it returns"


class ObjectNotFound(StoreError):
    """The object does not exist at the site."""

    hint = "the object is missing at this site; restore from another site and run `drsvc check`"


class ObjectLocked(StoreError):
    """The site holds the object under COMPLIANCE retention: nobody can delete it before `until`.

    Permanent (retrying before that date cannot succeed). `until` is the retain-until date, ISO 8601 in UTC,
    when the site told it.
    """

    hint = "the site keeps this object under COMPLIANCE retention: nobody can delete it before that ends"

    def __init__(
        self, message: str, *, site: str, key: str, until: str | None = None, hint: str | None = None
    ) -> None:
        if hint is None and until is not None:
            hint = (
                f"the site keeps this object under COMPLIANCE retention until {until}: nobody can delete it "
                "before then, by design; delete it again after that date"
            )
        super().__init__(message, hint=hint, site=site, key=key, until=until)
        self.until = until


class RepositoryError(DRError):
    """The repository is missing, of an unknown format, or inconsistent."""

    hint = "run `drsvc check` against each site"


class RepositoryNotFound(RepositoryError):
    hint = "create the tenant repository with `drsvc init`"


class IntegrityError(RepositoryError):
    """An object failed authentication or its content id does not match."""

    hint = "the copy at this site is corrupt; drsvc reads another site's copy, `drsvc check` reports it"


class CryptoError(DRError):
    """Key material is wrong or unusable."""


class WrongKeyError(CryptoError):
    hint = "the passphrase or key file does not open any key slot of this repository"


class SnapshotError(DRError):
    """A snapshot could not be taken."""


class ReplicationError(DRError):
    """Objects could not reach enough sites to count as protected."""

    hint = "bring the failed sites back or lower min_copies; the objects stay in the spool until shipped"


class RestoreError(DRError):
    """A restore could not be planned or completed."""


class UnsafePathError(RestoreError):
    """A path in a snapshot would escape the restore target."""

    hint = "the snapshot holds a crafted or corrupt name; nothing was written outside the target"
