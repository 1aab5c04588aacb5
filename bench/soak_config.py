"""What one soak run is asked to do (`eco2 bench soak`): its length, load and faults. Read by the
scenario (bench/soak.py) and its judge (bench/soak_verdict.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .load import LoadConfig


@dataclass
class SoakConfig:
    duration_s: float = 3600.0
    vus: int = 300
    ramp_up_s: float = 60.0
    ramp_down_s: float = 30.0
    sample_every_s: float = 10.0
    model_latency: tuple[float, float] | None = (5.0, 10.0)
    resume_share: float = 0.10
    abandon_share: float = 0.05
    permanent_share: float = 0.02
    transient_share: float = 0.02
    gaps_share: float = 0.03
    poll_interval_s: float = 2.5
    job_timeout_s: float = 180.0
    grace_s: float = 60.0
    drain_timeout_s: float = 120.0
    key_scan_every: int = 6  # Redis keys by prefix every N samples (a full SCAN costs Redis CPU)
    name: str = ""
    progress: bool = True

    def load_config(self) -> LoadConfig:
        return LoadConfig(
            vus=self.vus,
            ramp_up_s=self.ramp_up_s,
            hold_s=max(self.duration_s - self.ramp_up_s - self.ramp_down_s, 0.0),
            ramp_down_s=self.ramp_down_s,
            mode="sse",
            poll_interval_s=self.poll_interval_s,
            job_timeout_s=self.job_timeout_s,
            grace_s=self.grace_s,
            model_latency=self.model_latency,
            name=self.name,
            progress=self.progress,
        )
