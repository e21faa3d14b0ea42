"""``python -m bench.demo [--quick] [--keep] [--esp]`` (``make demo``), and
``python -m bench.demo peer ...``: the demo's peer process (``peer``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.demo`` (``make demo``); ``peer ARGS``: the demo's peer process."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        from bench.demo.peer import _peer_main

        return _peer_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=(
        "a self-contained demonstration (make demo): a 3-member cluster on loopback, "
        "our peer's traffic, a member killed and the failover"))
    parser.add_argument("--quick", action="store_true",
                        help="a shortened schedule (~20 s; also IPSEC_CLUSTER_DEMO_QUICK=1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (configs, logs) also when it worked")
    parser.add_argument("--esp", action="store_true",
                        help="instead: the in-memory ESP demonstration (transforms, replay, IVs)")
    args = parser.parse_args(argv)
    if args.esp:
        from bench.esp_demo import run_demo

        return int(run_demo())
    from bench.demo.scenario import run_cluster_demo

    return run_cluster_demo(quick=args.quick, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
