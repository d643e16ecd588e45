"""The end of a run: final privacy ledger, report, export of the final model, bundle delivery.

:func:`finish_run` writes ``privacy.json`` (indented) and the report (plots and summary.md),
then, when the settings ask for an export, exports the final global model to a bundle
(:mod:`pollinate.export`) and delivers it to the connected devices
(:mod:`pollinate.serverapp.delivery`). A failed export is logged and never loses the run.
With tracking on, the exported bundle is registered in MLflow's model registry as a new
``candidate`` version (:mod:`pollinate.rundir.model_registry`, on the tracking thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pollinate.config import RunSettings
from pollinate.errors import PollinateError
from pollinate.log import logger
from pollinate.rundir.report import write_report
from pollinate.rundir.tracking import NullTracker, Tracker
from pollinate.serverapp.delivery import deliver_bundle, delivers_to_devices
from pollinate.serverapp.state import RunState, write_privacy

__all__ = ["finish_run"]


def finish_run(run: RunState, tracker: Tracker | None = None) -> dict[str, Any]:
    """Write the run's final files, export and deliver its model (registered with
    ``tracker``); returns the privacy summary."""
    settings = run.settings
    privacy = write_privacy(run)
    write_report(run.run_dir, run.history, privacy=privacy, settings=settings.to_run_config())
    bundle_dir = settings.bundle_dir(run.run_dir)
    if bundle_dir is not None:
        archive = _export_at_end(run.run_dir, bundle_dir, settings)
        if archive is not None:
            _register(run, archive, tracker or NullTracker())
        if archive is not None and settings.deliver_bundle and delivers_to_devices(run.grid):
            deliver_bundle(
                run.grid, run.directory, archive, run.run_dir, timeout=settings.round_timeout
            )
    return privacy


def _export_at_end(run_dir: Path, out: Path, settings: RunSettings) -> Path | None:
    """Export the final global model to ``out`` (and ``export-triton-repo``); a failed export
    never loses the run.

    Returns the bundle archive, or None when nothing was exported.
    """
    try:
        from pollinate.export.pipeline import ExportOptions, Format, export_run

        formats = tuple(Format(f.strip()) for f in settings.export_formats.split(",") if f.strip())
        key = Path(settings.export_sign_key) if settings.export_sign_key else None
        repo = settings.export_triton_repo
        triton = Path(repo).resolve() if repo else None
        options = ExportOptions(
            out=out.resolve(),
            formats=formats,
            sign_key=key,
            triton_repo=triton,
            on_reduced_miss="skip",  # a weak INT8 copy must not cost the run its delivery
        )
        result = export_run(run_dir, options)
    except ImportError as err:
        logger.error(
            "the run finished but cannot be exported (%s); pip install \"pollinate[export]\" "
            "and run `pollinate export %s --out %s`", err, run_dir, out,
        )  # fmt: skip
        return None
    except PollinateError as err:
        logger.error("the run finished but its export failed: %s", err)
        return None
    logger.info("exported the final model to %s", result.bundle)
    if result.triton_version is not None:
        logger.info(
            "published it as version %d to %s", result.triton_version, settings.export_triton_repo
        )
    return result.archive


def _register(run: RunState, archive: Path, tracker: Tracker) -> None:
    """Queue the registration of the exported bundle as a ``candidate`` version."""
    if tracker.run_id is None and not run.settings.tracking_uri:
        return
    from pollinate.rundir.model_registry import bundle_lineage, register_job

    model, lineage = bundle_lineage(run.run_dir, archive)
    tracker.submit(register_job(model, [archive], lineage, run.run_dir))
