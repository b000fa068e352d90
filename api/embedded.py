"""The embedded PostgreSQL (the `pgserver` wheel ships a real server): used when no
DATABASE_URL is configured, by `creditpool serve` and by the tests."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger("creditpool")


def start_embedded_postgres(data_dir: Path, *, stop_on_exit: bool = True) -> str:
    """Start (or reuse) a server whose data lives in `data_dir/pgdata`; return its URL.

    The server listens on a Unix socket only, never on a network port.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "pgdata", cleanup_mode="stop" if stop_on_exit else None)
    return server.get_uri()
