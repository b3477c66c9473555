"""The end-of-run summary: per service, over environments and runs."""

from __future__ import annotations

from pytest_envbox.engine.report import table, totals


def _run(started: float, ready: float | None, peak: int | None, cpu: float, oom: int = 0) -> dict:  # type: ignore[type-arg]
    return {"started": started, "ready": ready, "stopped": started + 5, "returncode": 0,
            "memory_peak_bytes": peak, "cpu_seconds": cpu, "oom_kills": oom}  # fmt: skip


def test_runs_of_a_service_add_up_across_environments() -> None:
    reports = [
        {"services": {"api": {"limits": {"memory": 64 << 20}, "runs": [_run(0, 0.1, 10 << 20, 0.5)]},
                      "db": {"limits": {}, "runs": [_run(0, None, None, 0.0)]}}},
        {"services": {"api": {"limits": {"memory": 64 << 20},
                              "runs": [_run(10, 10.3, 30 << 20, 0.25, oom=1), _run(20, 20.2, 5 << 20, 1)]}}},
    ]  # fmt: skip
    api, db = totals(reports)
    assert (api.name, api.starts, api.oom_kills) == ("api", 3, 1)
    assert api.median_ready is not None and abs(api.median_ready - 0.2) < 1e-9
    assert api.memory_peak_bytes == 30 << 20 and api.memory_limit == 64 << 20
    assert api.cpu_seconds == 1.75
    assert (db.starts, db.median_ready, db.memory_peak_bytes, db.memory_limit) == (1, None, None, None)
    lines = table([api, db])
    assert lines[0].split() == ["service", "starts", "ready", "(median)", "peak", "memory", "/",
                                "limit", "cpu", "OOM", "kills"]  # fmt: skip
    assert lines[1].split() == ["api", "3", "200", "ms", "30.0Mi", "/", "64Mi", "1.75", "s", "1"]
    assert lines[2].split() == ["db", "1", "-", "-", "/", "no", "limit", "0.00", "s", "0"]


def test_no_environment_no_rows() -> None:
    assert totals([]) == []
