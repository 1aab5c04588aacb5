"""`python -m producers`: serve the scan API on ECO2_API_HOST:ECO2_API_PORT."""

from __future__ import annotations

import uvicorn

from contract.settings import get_settings

from .api import create_app

if __name__ == "__main__":
    s = get_settings()
    uvicorn.run(
        create_app(s),
        host=s.api_host,
        port=s.api_port,
        log_level="warning",
        access_log=False,  # no per-request access-log call (filtered out at "warning" anyway)
        backlog=4096,
        timeout_keep_alive=75,
    )
