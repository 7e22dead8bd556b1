"""`python -m gateway` = `switchyard serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("switchyard")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import SETTINGS_ENV, create_app
    from gateway.settings import load_settings

    settings = load_settings(args.config)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    settings = settings.model_copy(update={"host": host, "port": port})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = "uvloop" if sys.platform != "win32" else "auto"
    opts = {"host": host, "port": port, "loop": loop, "http": "httptools", "log_level": settings.log_level,
            "access_log": False, "timeout_graceful_shutdown": settings.drain_seconds(),
            "timeout_keep_alive": settings.keep_alive_s}
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **opts)
        return 0
    # N processes share the listening socket; each builds its own app (loop, guard, router, pools) from
    # the settings validated here, handed over in the environment.
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run("gateway.app:create_app_from_env", factory=True, workers=settings.workers, **opts)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("--config")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    return serve(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
