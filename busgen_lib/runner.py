"""Execute the numbered notebooks in order with papermill (`make figures`, `make test`).

Each notebook gets the profile name and the run/figure folders as parameters;
executed copies go to `runs/<profile>/`, figures to `figures/<profile>/`, so a
committed notebook never carries outputs and any notebook can be re-run alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from busgen_lib.errors import UsageError

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


def numbered_notebooks(notebooks_dir: Path) -> list[Path]:
    """The notebooks that make the figures, in the order they must run."""
    return sorted(Path(notebooks_dir).glob(NOTEBOOK_GLOB))


def run_notebooks(profile: str, repo: Path = Path("."), only: list[str] | None = None) -> dict[str, float]:
    """Run every numbered notebook under `profile`; return seconds per notebook.

    Stops at the first failing notebook (papermill raises with the failing
    cell); the partially executed copy stays in runs/ for inspection.
    """
    import papermill  # heavy import: keep `python -m busgen_lib --help` fast

    from busgen_lib.profiles import get_profile

    try:
        get_profile(profile)  # fail early on a typo, before any notebook starts
    except ValueError as err:
        raise UsageError(f"--profile: {err}") from None
    repo = Path(repo).resolve()
    chosen = [nb for nb in numbered_notebooks(repo / "notebooks")
              if not only or any(nb.name.startswith(o) for o in only)]
    if not numbered_notebooks(repo / "notebooks"):
        raise UsageError(f"{repo / 'notebooks'}: no numbered notebooks ({NOTEBOOK_GLOB}); point --repo at the "
                         "busgen repository root")
    if not chosen:
        raise UsageError(f"--only {' '.join(only or [])} matches none of the notebooks in {repo / 'notebooks'}; "
                         "give name prefixes such as 01")
    runs_dir, figures_dir = repo / "runs" / profile, repo / "figures" / profile
    runs_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for nb in chosen:
        start = time.perf_counter()
        print(f"[{profile}] {nb.name} ...", flush=True)
        papermill.execute_notebook(
            str(nb),
            str(runs_dir / nb.name),
            parameters={"profile": profile, "runs_dir": str(runs_dir), "figures_dir": str(figures_dir)},
            cwd=str(repo / "notebooks"),
            progress_bar=False,
            kernel_name="python3",
        )
        timings[nb.name] = time.perf_counter() - start
        print(f"[{profile}] {nb.name} done in {timings[nb.name]:.0f} s", flush=True)
    return timings
