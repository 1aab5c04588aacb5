"""`python -m simmodel`: serve the simulated model on ECO2_MODEL_HOST:ECO2_MODEL_PORT."""

from __future__ import annotations

import uvicorn

from contract.settings import get_settings

from .server import create_app

if __name__ == "__main__":
    s = get_settings()
    uvicorn.run(create_app(s), host=s.model_host, port=s.model_port, log_level="warning", backlog=4096)
