"""The ``camtl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="camtl", description="CA-MTL fused kernels and drop-in modules.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, backends and their state, the device")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from camtl.info import collect, info

        if args.json:
            print(json.dumps(collect(), indent=2))
        else:
            info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
