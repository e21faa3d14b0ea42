"""Sans-I/O cores of ipsec-cluster: no sockets, no clock, no global randomness.

Everything here takes bytes (and, where needed, the time and a source of random
bytes) as arguments and gives bytes and events back. The shells in
``dispatcher/`` and ``member/`` do the I/O.
"""
