"""ESP (RFC 4303) without I/O: the per-SA transforms (``transforms``), the
anti-replay window (``replay``), the counter-mode IV partitions (``iv``), the
RFC 3948 classifier of port 4500 datagrams (``natt``), the RFC 4301 selector
checks on inner packets (``selectors``) and the compiled byte primitive
(``_esp_fast.c``)."""
