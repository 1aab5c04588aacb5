"""bench/broker_cpu.py's folding of JVM thread names and JFR samples (no JVM needed)."""

from __future__ import annotations

from bench.broker_cpu import thread_group, top_frames


def test_thread_names_fold_their_numbers_but_keep_the_compiler_tiers_apart() -> None:
    assert thread_group("data-plane-kafka-request-handler-7") == "data-plane-kafka-request-handler-N"
    assert thread_group("GC Thread#1") == "GC Thread#N"
    assert thread_group("C2 CompilerThread0") == "C2 CompilerThreadN"
    assert thread_group("C1 CompilerThread3") != thread_group("C2 CompilerThread3")


def _sample(thread: str, *frames: str) -> dict:  # type: ignore[type-arg]
    return {
        "values": {
            "sampledThread": {"javaName": thread},
            "stackTrace": {
                "frames": [
                    {"method": {"type": {"name": f.rsplit(".", 1)[0]}, "name": f.rsplit(".", 1)[1]}}
                    for f in frames
                ]
            },
        }
    }


def test_top_frames_count_the_innermost_frame_and_the_thread_pool() -> None:
    events = [
        _sample("data-plane-kafka-request-handler-0", "a/Histogram.update", "a/KafkaApis.handle"),
        _sample("data-plane-kafka-request-handler-3", "a/Histogram.update", "a/KafkaApis.handle"),
        _sample("executor-Fetch", "a/Timer.run"),
    ]
    agg = top_frames(events)
    assert agg["samples"] == 3
    assert agg["top_frames"][0] == ("a/Histogram.update", 2)
    assert dict(agg["threads"]) == {"data-plane-kafka-request-handler-N": 2, "executor-Fetch": 1}


def test_request_totals_sum_versions_and_multiply_the_lifetime_mean() -> None:
    from bench.broker_cpu import request_totals

    text = "\n".join(
        [
            "time=1",
            "kafka.network:type=RequestMetrics,name=RequestsPerSec,request=Produce,version=9:Count=10",
            "kafka.network:type=RequestMetrics,name=RequestsPerSec,request=Produce,version=11:Count=5",
            "kafka.network:type=RequestMetrics,name=LocalTimeMs,request=Produce:Count=15",
            "kafka.network:type=RequestMetrics,name=LocalTimeMs,request=Produce:Mean=0.5",
            "kafka.network:type=RequestMetrics,name=RequestsPerSec,request=Fetch,version=12:Count=7",
        ]
    )
    got = request_totals(text)
    assert got["Produce"] == {"requests": 15.0, "local_ms": 7.5}
    assert got["Fetch"] == {"requests": 7.0, "local_ms": 0.0}
