"""The real-peer test lab: network namespaces, strongSwan's charon, traffic helpers.

Used by tests/ and bench/; see docs/testing.md.
"""
