"""What `pollinate simulate` prints when a run ends: the table, final metrics, epsilons."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from pollinate.cli.console import make_console

__all__ = ["print_summary"]


def print_summary(result: Any) -> None:
    """The run's table, its final metrics and epsilons, and hints on what went wrong."""
    from pollinate.rundir.report import render_summary_table

    out = make_console(min_width=120)
    out.print(render_summary_table(result.history, result.privacy))
    last = result.history[-1] if result.history else None
    if last is not None and last.accuracy is not None:
        out.print(f"final accuracy [bold]{last.accuracy:.4f}[/] after round {last.server_round}")
    elif last is not None and last.metrics:
        shown = ", ".join(
            f"{name} [bold]{last.metrics[name]:.4g}[/]"
            for name in ("rmse", "mae", "mape")
            if name in last.metrics
        )
        out.print(f"final {shown} after round {last.server_round}")
    sample = result.privacy.get("sample_level", {})
    if sample.get("enabled") and sample.get("max_epsilon") is not None:
        out.print(
            f"sample-level ε (per client, δ={result.privacy.get('delta')}): "
            f"max {sample['max_epsilon']:.3f}, median {sample['median_epsilon']:.3f}"
        )
    client = result.privacy.get("client_level", {})
    if client.get("enabled") and client.get("epsilon") is not None:
        out.print(
            f"client-level ε ({client.get('mechanism')}, worst client): {client['epsilon']:.3f} "
            "(a separate guarantee, not added)"
        )
    if result.privacy.get("private") is False:
        out.print(f"[bold red]{escape(str(result.privacy.get('noise')))}[/]")
    rejected = sum(r.rejected for r in result.history)
    answered = sum(r.replied - r.declined for r in result.history)
    if rejected and 2 * rejected >= answered:
        out.print(
            f"[yellow]{rejected} of {answered} updates were rejected[/] as malformed or too "
            "large (see `pollinate simulate -v`); honest updates can exceed the automatic "
            "bound when the outputs are large (a regression on large targets: scale them) or "
            "the steps are (a linear head such as scatnet's without DP's clipping: lower "
            "--set learning-rate=...); or raise the bound with --set max-update-norm=..."
        )
    out.print(f"run directory: {result.run_dir}")
