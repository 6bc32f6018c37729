"""`llamafarm ui`: a local web dashboard over the same job folders the CLI uses.

    llamafarm ui --port 8765

Reads go through the CLI's own readers (orchestrator.jobs, orchestrator.monitor, contract.job_folder);
every action runs the CLI command itself (cli_bridge), so the page and the terminal behave alike and
the page holds no business logic. The web stack (Starlette, uvicorn) is imported only by this package,
which `llamafarm ui` imports inside its command body.
"""
