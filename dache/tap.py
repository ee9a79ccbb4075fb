"""
The twistd glue (as twisted/web/tap.py is for `twistd web`): Options and
makeService for `twistd dache`. A bad setting stops start-up with one line
naming it, exit status 2, and no traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dache import config as _config
from dache import engines, logs, service
from dache.web import auth
from dache.workers import is_worker

Options = _config.Options


def makeService(options: Any) -> service.DacheService:
    try:
        config = _config.resolve(options, os.environ)
        if options.get("repair"):
            from dache.engines.disk import repair_command

            raise SystemExit(repair_command(config))
        config = auth.read_token_files(config)
        if not is_worker():  # a worker adopts its supervisor's socket instead
            service.validate_endpoint(config, _reactor())
        engines.check_engine_config(config)
    except _config.ConfigError as e:
        sys.stderr.write(f"dache: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    node = service.makeService(config)
    node.log_observer = logs.observer_for_twistd(
        config.log_format, getattr(options, "parent", None)
    )
    return node


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor
