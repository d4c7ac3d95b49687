"""The event path takes bursts: a rank logging 10,000 events a second for 10 s
loses none (the loop's slowdown is measured in benchmarks/log_burst.py)."""

from __future__ import annotations

import ddlkit
from ddlkit.rank.examples import log_burst


def test_ten_thousand_logs_a_second_for_ten_seconds_lose_no_event(runs_dir):
    run = ddlkit.launch(log_burst, 10_000, 10.0, num_processes=1, run_dir=runs_dir, echo=False).wait(timeout=60)
    table = run.metrics
    assert len(table) == 100_000
    assert table["step"].tolist() == list(range(100_000))  # each once, in order
    assert table["value"].tolist() == [float(step) for step in range(100_000)]
    returned = run.result().returns[0]
    assert returned["events"] == 100_000
    # Kept up (10 s on schedule): a loaded 2-core machine may lag a little behind, never by half.
    assert returned["seconds"] < 15.0
    events = (run.path / "events.jsonl").read_text().count('"type": "step"')
    assert events == 100_000  # and every one is in the run's folder
