"""The ``ipsec-cluster`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from common.config import Config, ConfigError, load_config


def read_config(path: str) -> Config:
    """Load a config file; a bad one ends the program with one clear line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SystemExit(f"ipsec-cluster: cannot read config {path}: {exc.strerror}") from None

    def read_file(name: str) -> bytes:
        return (p.parent / name).read_bytes()

    try:
        return load_config(text, str(p), read_file)
    except ConfigError as exc:
        raise SystemExit(f"ipsec-cluster: {exc}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _run_loop(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_run(args: argparse.Namespace, *, initiate: bool = False) -> int:
    from dispatcher.gateway import Gateway

    config = read_config(args.config)
    _setup_logging(args.log_level or config.cluster.log_level)
    gw = Gateway(config, initiate=initiate)
    _run_loop(gw.run_forever())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from member.esp_demo import run_demo

    return int(run_demo())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipsec-cluster",
        description="A load-sharing IPsec (IKEv2 + ESP) gateway cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway (responder) from a config file")
    run.add_argument("--config", required=True, help="TOML config file (docs/config.md)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    peer = sub.add_parser("peer", help="run our initiator: bring up the configured "
                          "connections and carry their traffic")
    peer.add_argument("--config", required=True)
    peer.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("demo", help="a short self-contained demonstration (make demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "peer":
        return cmd_run(args, initiate=True)
    if args.command == "demo":
        return cmd_demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
