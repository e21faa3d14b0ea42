"""IKEv2 (RFC 7296) sans-I/O core: codec, key derivation, exchanges."""
