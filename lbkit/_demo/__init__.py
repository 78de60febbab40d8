"""The ``lbkit demo`` command: ``cluster`` (local model servers in an embedded Consul), ``load`` (paced
calls), ``report`` (tables and the plot), ``command`` (the run, its options and verdicts)."""
