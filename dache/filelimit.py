"""
The open-file limit a node needs: one descriptor per connection (up to
MAX_CONNECTIONS), one per watch stream or blocking read (up to WATCH_MAX,
counted apart), and a reserve for the engine (PostgreSQL connections, the
disk log), the listening socket and logs.

A process starts with the soft limit its parent gave it (often 1024, from a
shell or a container runtime) and may raise it up to the hard limit itself,
as Redis does for maxclients: so at start-up the node raises its soft limit
to what its settings need (never lowers it), and if the hard limit is below
that, says so once, naming the settings (LimitNOFILE= in deploy/dache.service,
`--ulimit nofile=` for a container).
"""

from __future__ import annotations

import resource
from typing import Any

RESERVE = 128  # the engine's connections or files, the listening socket, logs


def needed(config: Any) -> int:
    return config.max_connections + config.watch_max + RESERVE


def ensure(config: Any, log: Any) -> int:
    """Raise the soft RLIMIT_NOFILE to what `config` needs if it can; the limit now."""
    want = needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warn(
            "the open-file limit is {limit}; MAX_CONNECTIONS={connections} and "
            "WATCH_MAX={watchers} need {want}: raise it (LimitNOFILE=, ulimit -n) or lower them",
            limit=soft,
            connections=config.max_connections,
            watchers=config.watch_max,
            want=want,
        )
    return soft
