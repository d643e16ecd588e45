"""Tests of pollinate.rundir.report, plots and records: plots, summary.md, the terminal table
and the metrics history."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pollinate.errors import CheckpointError
from pollinate.rundir.records import RoundRecord, history_from_rows, read_history, write_history
from pollinate.rundir.report import SEPARATE_GUARANTEES, render_summary_table, write_report

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ["accuracy.png", "loss.png", "epsilon.png", "summary.md"]

PRIVACY_BOTH: dict[str, object] = {
    "delta": 1e-5,
    "sample_level": {
        "enabled": True,
        "clients": 250,
        "max_epsilon": 3.1,
        "median_epsilon": 1.2,
        "mean_epsilon": 1.3,
        "declines": 0,
        "mechanism": {"noise_multiplier": 1.0, "sample_rates": [0.25, 1.0], "max_grad_norm": 1.0},
    },
    "client_level": {
        "enabled": True,
        "epsilon": 5.2,
        "delta": 1e-5,
        "noise_multiplier": 0.8,
        "clipping_norm": 1.0,
        "num_sampled": 100,
        "population": 1000,
        "releases": 5,
        "accounting": "rdp, no amplification",
    },
    "note": "Ledger note for the test.",
}

PRIVACY_OFF: dict[str, object] = {
    "delta": 1e-5,
    "sample_level": {"enabled": False},
    "client_level": {"enabled": False},
}

SETTINGS: dict[str, object] = {
    "strategy": "fedavg",
    "num-server-rounds": 5,
    "learning-rate": 0.1,
    "dataset": "mnist|weird",
}


def _history() -> list[RoundRecord]:
    records = [RoundRecord(0, accuracy=0.1, loss=2.3)]
    for rnd in range(1, 6):
        records.append(
            RoundRecord(
                rnd,
                accuracy=0.5 + 0.08 * rnd,
                loss=2.0 / rnd,
                sampled=100,
                replied=95 - rnd,
                declined=rnd,
                rejected=2,
                failed=3,
                train_loss=1.9 / rnd,
                train_accuracy=0.45 + 0.08 * rnd,
                max_epsilon=0.62 * rnd,
                median_epsilon=0.24 * rnd,
                client_level_epsilon=1.04 * rnd,
                seconds=1.5 * rnd,
            )
        )
    return records


def _assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.size > 0
    assert image.shape[0] > 0
    assert image.shape[1] > 0


def _assert_no_temp_files(run_dir: Path) -> None:
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(FILES)


def _round_rows(summary: str) -> dict[int, list[str]]:
    """Rows of the per-round table, by round number."""
    rows: dict[int, list[str]] = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_full_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    written = write_report(run_dir, _history(), privacy=PRIVACY_BOTH, settings=SETTINGS)

    assert [p.name for p in written] == FILES
    assert all(p.parent == run_dir and p.is_file() for p in written)
    for name in FILES[:3]:
        _assert_valid_png(run_dir / name)
    _assert_no_temp_files(run_dir)

    summary = (run_dir / "summary.md").read_text(encoding="utf-8")
    # Settings table, with the pipe escaped so the table stays intact.
    assert "| strategy | fedavg |" in summary
    assert "| num-server-rounds | 5 |" in summary
    assert "mnist\\|weird" in summary
    # Final metrics and rounds completed.
    assert "Final accuracy: 0.9000 (round 5)" in summary
    assert "Final loss: 0.4000 (round 5)" in summary
    assert "Rounds completed: 5" in summary

    rows = _round_rows(summary)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]
    assert rows[0][1:3] == ["0.1000", "2.3000"]
    for rnd in range(1, 6):
        row = rows[rnd]
        assert row[1] == f"{0.5 + 0.08 * rnd:.4f}"
        assert row[2] == f"{2.0 / rnd:.4f}"
        assert row[3:8] == ["100", str(95 - rnd), str(rnd), "2", "3"]
        assert row[8] == f"{0.62 * rnd:.2f}"
        assert row[9] == f"{0.24 * rnd:.2f}"
        assert row[10] == f"{1.04 * rnd:.2f}"
        assert row[11] == f"{1.5 * rnd:.1f}"
        # The two kinds of epsilon are never summed.
        assert f"{0.62 * rnd + 1.04 * rnd:.2f}" not in row

    # Privacy section: both epsilons as separate numbers, never their sum.
    privacy = summary[summary.index("## Privacy") :]
    assert "3.10 at delta = 1e-05" in privacy
    assert "1.20 at delta = 1e-05" in privacy
    assert "5.20 at delta = 1e-05" in privacy
    assert "8.30" not in summary
    assert "8.3" not in summary
    assert SEPARATE_GUARANTEES in summary
    assert "not added" in summary
    for text in (
        "rdp, no amplification",
        "0.25, 1",
        "| noise multiplier | 0.8 |",
        "| population | 1000 |",
    ):
        assert text in privacy
    assert "Ledger note for the test." in privacy


def test_dp_disabled_and_missing_evaluation(tmp_path: Path) -> None:
    history = [
        RoundRecord(1, accuracy=None, loss=None, sampled=10, replied=10),
        RoundRecord(2, accuracy=0.7, loss=None, sampled=10, replied=9, failed=1),
        RoundRecord(3, accuracy=None, loss=None, sampled=10, replied=10),
    ]
    write_report(tmp_path, history, privacy=PRIVACY_OFF, settings={})
    for name in FILES[:3]:
        _assert_valid_png(tmp_path / name)
    _assert_no_temp_files(tmp_path)

    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "Final accuracy: 0.7000 (round 2)" in summary
    assert "Final loss: no central evaluation." in summary
    assert "Rounds completed: 3" in summary
    assert "disabled" in summary
    assert "No settings recorded." in summary
    rows = _round_rows(summary)
    assert rows[1][1] == "—"
    assert rows[1][8:11] == ["—", "—", "—"]
    assert rows[2][7] == "1"


def test_missing_privacy_parts(tmp_path: Path) -> None:
    privacy: dict[str, object] = {"sample_level": {"enabled": True, "max_epsilon": 2.0}}
    history = [RoundRecord(1, accuracy=0.5, loss=1.0, max_epsilon=2.0)]
    write_report(tmp_path, history, privacy=privacy, settings={"x": None})
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "2.00 at delta = —" in summary
    assert "### Client-level" in summary
    write_report(tmp_path, history, privacy={}, settings={})
    assert "disabled" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    _assert_no_temp_files(tmp_path)


def test_empty_history(tmp_path: Path) -> None:
    written = write_report(tmp_path, [], privacy={}, settings=SETTINGS)
    assert [p.name for p in written] == FILES
    for name in FILES[:3]:
        _assert_valid_png(tmp_path / name)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "No round completed." in summary
    assert "## Rounds" not in summary
    _assert_no_temp_files(tmp_path)


def test_only_initial_evaluation(tmp_path: Path) -> None:
    write_report(tmp_path, [RoundRecord(0, 0.1, 2.3)], privacy=PRIVACY_OFF, settings={})
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "No round completed." in summary
    assert "Final accuracy: 0.1000 (round 0)" in summary


def test_infinite_epsilon(tmp_path: Path) -> None:
    history = [
        RoundRecord(1, 0.5, 1.0, max_epsilon=1.0, median_epsilon=0.5),
        RoundRecord(2, 0.6, 0.9, max_epsilon=math.inf, median_epsilon=0.9),
        RoundRecord(3, 0.6, 0.9, max_epsilon=math.inf, median_epsilon=math.inf),
    ]
    privacy = {"delta": 1e-5, "sample_level": {"enabled": True, "max_epsilon": math.inf}}
    write_report(tmp_path, history, privacy=privacy, settings={})
    _assert_valid_png(tmp_path / "epsilon.png")
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "inf at delta = 1e-05" in summary
    assert _round_rows(summary)[3][8:10] == ["inf", "inf"]

    only_inf = [RoundRecord(1, 0.5, 1.0, max_epsilon=math.inf)]
    write_report(tmp_path, only_inf, privacy=privacy, settings={})
    _assert_valid_png(tmp_path / "epsilon.png")
    _assert_no_temp_files(tmp_path)


def test_rewrite_replaces_files(tmp_path: Path) -> None:
    write_report(tmp_path, [], privacy={}, settings={})
    write_report(tmp_path, _history(), privacy=PRIVACY_BOTH, settings={})
    assert "Rounds completed: 5" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    _assert_no_temp_files(tmp_path)


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, _history(), privacy={}, settings={})
    assert list(tmp_path.iterdir()) == []


def test_round_record_round_trip() -> None:
    for record in [*_history(), RoundRecord(7, None, None, max_epsilon=math.inf)]:
        assert RoundRecord.from_dict(record.to_dict()) == record
        # Through JSON too, as the history is stored on disk.
        assert RoundRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_from_dict_ignores_unknown_and_defaults() -> None:
    record = RoundRecord.from_dict({"server_round": 3, "future_field": [1, 2], "accuracy": 1})
    assert record == RoundRecord(3, accuracy=1.0, loss=None)
    assert isinstance(record.accuracy, float)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"server_round": "1"},
        {"server_round": True},
        {"server_round": 1.5},
        {"server_round": -1},
        {"server_round": 1, "accuracy": "0.5"},
        {"server_round": 1, "sampled": -3},
    ],
)
def test_from_dict_rejects_bad_records(data: dict[str, object]) -> None:
    with pytest.raises(CheckpointError):
        RoundRecord.from_dict(data)


def test_metrics_history_round_trip(tmp_path: Path) -> None:
    history = [*_history(), RoundRecord(7, None, None, max_epsilon=math.inf)]
    path = write_history(tmp_path, history)
    assert path == tmp_path / "metrics.json"
    assert read_history(tmp_path) == history
    assert json.loads(path.read_text()) == [r.to_dict() for r in history]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


@pytest.mark.parametrize("rows", [{"server_round": 1}, [1, 2], [{"accuracy": 0.5}]])
def test_history_from_rows_rejects_malformed_history(rows: object) -> None:
    with pytest.raises(CheckpointError):
        history_from_rows(rows)


def test_read_history_rejects_non_json(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("[{")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_history(tmp_path)


def test_render_summary_table() -> None:
    from rich.console import Console

    table = render_summary_table(_history(), PRIVACY_BOTH)
    assert table.row_count == 6
    assert len(table.columns) == 10
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "3.10" in text  # round 5 max sample-level eps
    assert "5.20" in text  # round 5 client-level eps
    assert "8.30" not in text
    assert "separate guarantees" in text

    empty = render_summary_table([], {})
    assert empty.row_count == 0
    assert re.search("DP disabled", str(empty.caption))


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pollinate.rundir.report, pollinate.rundir.records; "
        "print(any(m.split('.')[0] in ('matplotlib', 'rich') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
