"""gatelab's command-line commands: one module per command (add_parser, run)."""
