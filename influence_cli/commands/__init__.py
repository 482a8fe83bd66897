"""One module per command, each a short function over `run.Run` that returns a `run.Report`.

The CLI (cli.py) parses options, calls these, writes the report (report.write_atomic) and renders it.
"""
