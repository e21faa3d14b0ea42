"""The ``ipsec-cluster`` command: the one entry point of the command line.
It parses the arguments and hands each subcommand to its role, never the
other way round: ``run`` to the supervisor (dispatcher/supervisor.py) or the
single gateway (dispatcher/gateway.py), ``dispatcher`` to
dispatcher/process.py (the supervisor starts it), ``member`` to member/main.py,
``peer`` to dispatcher/peer.py, ``status``/``sas``/``events`` and the control
verbs to dispatcher/operator.py; ``keygen`` is here."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from common.config import MAX_MEMBERS
from common.errors import StartupError
from dispatcher.operator import (
    CONTROL_VERBS,
    cmd_control,
    cmd_events,
    cmd_sas,
    cmd_status,
    control_parsers,
)
from member.config_file import read_config
from member.main import run_loop


def _setup_logging(level: str, fmt: str = "text", role: str = "gateway") -> None:
    """Text or JSON lines on stderr, each naming this process's role
    (dispatcher, member N, gateway, peer): member/logs.py."""
    from member.logs import setup_logging

    setup_logging(level, fmt, role)


def cmd_run(args: argparse.Namespace, *, initiate: bool = False) -> int:
    config = read_config(args.config)
    c = config.cluster
    cluster = not initiate and (c.members > 1 or bool(c.sync))
    _setup_logging(args.log_level or c.log_level, c.log_format,
                   "supervisor" if cluster else "peer" if initiate else "gateway")
    from member.keylog import check_folder

    check_folder(c.save_keys)   # before any member starts: one line, not a restart loop
    if cluster:
        from dispatcher.startup import check_run
        from dispatcher.supervisor import Supervisor, run_dir

        folder = run_dir(config, args.config)
        check_run(config, args.config, folder)
        codes: list[int] = []

        async def run() -> None:
            sup = Supervisor(config, args.config)
            sup.read_config = read_config
            codes.append(await sup.run())

        try:
            run_loop(run())
        except StartupError:
            if not c.control:  # the run folder we made, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return codes[0] if codes else 1
    from dispatcher.gateway import Gateway

    gw = Gateway(config, initiate=initiate, config_path=None if initiate else args.config)
    gw.read_config = read_config
    run_loop(gw.run_forever())
    return 0


def cmd_dispatcher(args: argparse.Namespace) -> int:
    """The dispatcher process of a cluster, started by ``run``'s supervisor."""
    from dispatcher.process import run_dispatcher

    config = read_config(args.config)
    c = config.cluster
    _setup_logging(args.log_level or c.log_level, c.log_format, "dispatcher")
    return run_dispatcher(config, args.config, args.channel_fd, read_config, spare=args.spare)


def parse_udp_fds(items: list[str]) -> dict[int, int]:
    """``--udp-fd PORT=FD`` arguments (set by ``run``): port -> fd; one
    StartupError line for anything else."""
    out = {}
    for item in items:
        port, _, fd = item.partition("=")
        if not (port.isdigit() and fd.isdigit() and 1 <= int(port) <= 65535
                and int(fd) <= 2**31 - 1):
            raise StartupError(f"--udp-fd {item}: expected PORT=FD (given by `ipsec-cluster run`)")
        out[int(port)] = int(fd)
    return out


def cmd_member(args: argparse.Namespace) -> int:
    from member.main import run_member

    config = read_config(args.config)
    if not 1 <= args.id <= MAX_MEMBERS:
        raise StartupError(f"--id: expected a member id in 1..{MAX_MEMBERS}, got {args.id}")
    _setup_logging(args.log_level or config.cluster.log_level, config.cluster.log_format,
                   f"member {args.id}")
    udp_fds = parse_udp_fds(args.udp_fd or [])
    return run_member(config, args.config, args.id, args.connect, key_stdin=args.key_stdin,
                      udp_fds=udp_fds, tun_fd=args.tun_fd)


def cmd_keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    out = Path(args.dir)
    existing = [p for p in (out / f"{args.name}.key", out / f"{args.name}.key_secret")
                if p.exists()]
    if existing and not args.force:
        raise StartupError(f"keygen: {existing[0]} exists; not overwriting a key pair "
                           "(--force to replace it: the other side then needs the new "
                           "public key)")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        public, secret = zmq.auth.create_certificates(str(out), args.name)
        Path(secret).chmod(0o600)
    except OSError as exc:
        raise StartupError(f"keygen: cannot write keys into {out}: {exc.strerror or exc} "
                           "(choose a --dir this user can write)") from None
    print(f"public key (give to the other side): {public}")
    print(f"secret key (keep here, cluster.curve_secret_key): {secret}")
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    """Our initiator; without load/check flags exactly today's ``peer``."""
    from dispatcher.peer import Peer, options_from_args

    options = options_from_args(args)
    config = read_config(args.config)
    _setup_logging(args.log_level or config.cluster.log_level, config.cluster.log_format, "peer")
    peer = Peer(config, options)
    codes: list[int] = []

    async def run() -> None:
        codes.append(await peer.run())

    run_loop(run())
    return codes[0] if codes else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ipsec-cluster")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipsec-cluster",
        description="A load-sharing IPsec (IKEv2 + ESP) gateway cluster.",
        epilog="`ipsec-cluster COMMAND --help` describes each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway (responder) from a config file")
    run.add_argument("--config", required=True, help="TOML config file (docs/config.md)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="log level (default: cluster.log_level of the config)")
    peer = sub.add_parser("peer", help="run our initiator: bring up the configured "
                          "connections and carry their traffic")
    peer.add_argument("--config", required=True,
                      help="TOML config file with the connections to bring up")
    peer.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                      help="log level (default: cluster.log_level of the config)")
    from dispatcher.peer import add_peer_arguments

    add_peer_arguments(peer)
    disp = sub.add_parser("dispatcher", help="run the dispatcher process of a cluster "
                          "(started and restarted by `ipsec-cluster run`, not by hand)")
    disp.add_argument("--config", required=True, help="TOML config file (the run's)")
    disp.add_argument("--channel-fd", type=int, required=True, metavar="N",
                      help="the supervisor's channel, inherited as fd N: what it holds "
                      "for the dispatcher arrives on it (set by `ipsec-cluster run`)")
    disp.add_argument("--spare", action="store_true",
                      help="a warm spare: wait for the handoff as long as it takes (the "
                           "supervisor hands it over when the dispatcher before dies)")
    disp.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                      help="log level (default: cluster.log_level of the config)")
    member = sub.add_parser("member", help="run one member process and connect it to a "
                            "dispatcher (other hosts: tcp:// with CURVE keys)")
    member.add_argument("--config", required=True,
                        help="TOML config file (the same connections as the dispatcher's)")
    member.add_argument("--id", type=int, required=True, help="member id (1..64)")
    member.add_argument("--connect", required=True,
                        help="the dispatcher's endpoint (cluster.sync, e.g. tcp://HOST:PORT)")
    member.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="log level (default: cluster.log_level of the config)")
    member.add_argument("--udp-fd", action="append", metavar="PORT=FD",
                        help="our socket of the cluster's steered UDP PORT, inherited "
                             "as FD (set by `ipsec-cluster run`)")
    member.add_argument("--key-stdin", action="store_true",
                        help="read this incarnation's CURVE keys from stdin (how "
                        "`ipsec-cluster run` starts its members)")
    member.add_argument("--tun-fd", type=int, metavar="N",
                        help="read the cleartext of our children from TUN fd N (handed "
                        "down by `ipsec-cluster run`, docs/routing.md)")
    for name, text in (("status", "members, segments, SA counts, traffic and drops"),
                       ("sas", "every IKE SA and child SA, like swanctl --list-sas")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="the config the cluster runs with")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to wait for the cluster's answer (default 5)")
    control_parsers(sub)
    events = sub.add_parser("events", help="the event stream: SAs up, down and rekeyed, "
                            "members joined and dead, takeovers (one line each)")
    events.add_argument("--config", required=True, help="the config the gateway runs with")
    events.add_argument("--since", type=int, metavar="N",
                        help="from sequence number N on (default: every event held)")
    events.add_argument("--follow", action="store_true",
                        help="then wait for new events, until Ctrl-C")
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the gateway's answer (default 5)")
    keygen = sub.add_parser("keygen", help="write a ZeroMQ CURVE key pair (dispatcher and "
                            "members on other hosts, docs/operations.md)")
    keygen.add_argument("--dir", required=True,
                        help="folder for NAME.key (public) and NAME.key_secret (made 0700)")
    keygen.add_argument("--name", required=True,
                        help="file name of the pair, e.g. dispatcher or member2")
    keygen.add_argument("--force", action="store_true",
                        help="overwrite an existing key pair of that name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except StartupError as exc:
        # One line that names the cause and the fix (common/errors.py), no traceback.
        print(f"ipsec-cluster: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(args)
    if args.command == "peer":
        return cmd_peer(args)
    handlers = {"member": cmd_member, "dispatcher": cmd_dispatcher, "status": cmd_status,
                "sas": cmd_sas, "keygen": cmd_keygen, "events": cmd_events}
    handlers.update({verb: cmd_control for verb in CONTROL_VERBS})
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
