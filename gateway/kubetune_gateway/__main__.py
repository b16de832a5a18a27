"""``kubetune-gateway --config gateway.yaml [--host 127.0.0.1] [--port 8080]``: serve the gateway.

Exit 2 for a settings or tenants file that cannot be used (the message names file and field).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from kubetune_gateway.app import build
from kubetune_gateway.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune-gateway", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the gateway's settings YAML")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        app = build(load_settings(args.config))
    except ConfigError as e:
        print(f"kubetune-gateway: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
