"""`python -m gateway` = `switchyard serve`."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("switchyard")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import load_settings

    settings = load_settings(args.config)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    settings = settings.model_copy(update={"host": host, "port": port})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    loop = "uvloop" if sys.platform != "win32" else "auto"
    uvicorn.run(app, host=host, port=port, loop=loop, http="httptools", log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=settings.drain_seconds(),
                timeout_keep_alive=settings.keep_alive_s)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("--config")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    return serve(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
