"""The cluster without I/O: SPI ranges with the segment in the top bits
(``spi``), the segment table (``segments``), the one routing function
(``routing``), the dispatcher <-> member wire codec (``wire``), the state-sync
messages (``sync``) and their restoration (``snapshot``), address pools by
segment (``pools``), the membership state machine (``membership``) and the
placement policy it and the members use (``placement``), a member's stats
and the status report (``stats``), the event stream (``events``)."""
