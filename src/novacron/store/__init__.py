"""State store: an etcd-shaped key-value interface (revisions, CAS, txn) and typed repositories."""

from pathlib import Path

from novacron.paths import state_dir
from novacron.store.base import (
    CasFailed,
    Compare,
    Delete,
    Entry,
    KeyValueStore,
    Lease,
    LeaseNotFound,
    Put,
    StoreError,
    StoreLimitError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    TxnResult,
)
from novacron.store.sqlite import SqliteStore


def default_store_path() -> Path:
    return state_dir() / "store.db"


def open_default_store() -> SqliteStore:
    """The embedded default store of this host (SQLite under ``state_dir()``)."""
    return SqliteStore(default_store_path())


__all__ = [
    "CasFailed",
    "Compare",
    "Delete",
    "Entry",
    "KeyValueStore",
    "Lease",
    "LeaseNotFound",
    "Put",
    "SqliteStore",
    "StoreError",
    "StoreLimitError",
    "StoreOutcomeUnknown",
    "StoreUnavailable",
    "TxnResult",
    "default_store_path",
    "open_default_store",
]
