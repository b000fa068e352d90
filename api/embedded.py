"""The embedded PostgreSQL (the `pgserver` wheel ships a real server): used when no
DATABASE_URL is configured, by `creditpool serve` and by the tests."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger("creditpool")


def start_embedded_postgres(data_dir: Path, *, stop_on_exit: bool = True, max_connections: int | None = None) -> str:
    """Start (or reuse) a server whose data lives in `data_dir/pgdata`; return its URL.

    The server listens on a Unix socket only, never on a network port. `max_connections`
    (PostgreSQL's default is 100) is written to the data directory's `postgresql.auto.conf`
    (`ALTER SYSTEM`) and, since only a start reads it, the server is restarted once when it runs
    with another value: pgserver starts PostgreSQL with options of its own and passes none of
    ours. Each slot costs about 50 kB of shared memory (measured: `shared_memory_size` 143 MB at
    100, 153 MB at 300, next to the default 128 MB of `shared_buffers`), and the server allocates
    it with mmap and uses POSIX semaphores, so no SysV limit (`shmmax`, `semmni`) is involved.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    cleanup_mode = "stop" if stop_on_exit else None
    server = pgserver.get_server(data_dir / "pgdata", cleanup_mode=cleanup_mode)
    if max_connections is not None and _setting(server, "max_connections") != str(max_connections):
        server.psql(f"ALTER SYSTEM SET max_connections = {int(max_connections)};")
        # Stops the server only if this process is its last user; then the next get_server
        # starts it again, reading the new value.
        server.cleanup()
        server = pgserver.get_server(data_dir / "pgdata", cleanup_mode=cleanup_mode)
        if _setting(server, "max_connections") != str(max_connections):
            log.warning("the embedded PostgreSQL in %s is shared with another process: max_connections = %s "
                        "applies from its next start", data_dir, max_connections)
    return server.get_uri()


def _setting(server, name: str) -> str:
    # psql's unaligned, tuples-only output: the value alone.
    return server.psql(f"\\pset tuples_only on\n\\pset format unaligned\nSHOW {name};").strip().splitlines()[-1]
