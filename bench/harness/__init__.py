"""The benchmark harness: what the demo, the tests and the benchmarks use to
run the product from outside. It sits on top: it imports the product
(common, member, dispatcher); the product never imports it.

- ``procs``: the process launcher (log to a file, own session, dies with
  its parent, stopped cleanly as a whole group);
- ``configs``: the TOML writer and the config builders (cluster, peer,
  strongSwan-facing gateway);
- ``control``: the control-API client (requests, the event stream);
- ``packets``: packet builders and parsers (on common/packets.py);
- ``net``: free ports, code and sockets inside network namespaces;
- ``waits``: a condition polled with a deadline and a diagnostic.

bench/conftest.py lets the benches run as plain tests (``--benchmark-disable``).
"""
