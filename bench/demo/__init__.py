"""The cluster demonstration behind ``make demo`` (``python -m bench.demo``):
a scenario, a view and a verdict on top of the harness (bench/harness/).

- ``scenario``: what happens and when: the cluster, the inner echo and our
  peer started through the harness, the traffic, the kill, the event stream
  read into facts;
- ``facts``: the schedule and limits, and the facts the scenario records;
- ``view``: what the operator sees: the live member table and the event lines;
- ``verdict``: the checks at the end and their causes, functions of the facts;
- ``peer``: our peer process (``python -m bench.demo peer ...``);
- ``__main__``: the command line.
"""
