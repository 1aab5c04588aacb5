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
