"""What runs while a sweep's workers train: one spawned process per worker (their lines printed here), and a
monitor that polls the study for the progress bar, the adaptive rounds' lines and the parent run's live summary.
"""

from __future__ import annotations

import threading

from pitsearch.cli import EXIT_SERVICE_UNAVAILABLE
from pitsearch.search.rounds import RoundPrinter
from pitsearch.search.trial import WorkerContext
from pitsearch.search.trials import count_finished
from pitsearch.search.worker import worker_process_main


def run_processes(contexts: list[WorkerContext], console) -> bool:
    """Run one spawned process per worker; True when one of them lost a server (it printed why)."""
    import multiprocessing as mp
    import queue as queue_module

    spawn = mp.get_context("spawn")
    lines = spawn.Queue()
    processes = [spawn.Process(target=worker_process_main, args=(ctx, lines), name=f"pitsearch-worker-{ctx.worker_index}")
                 for ctx in contexts]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes) or not lines.empty():
            try:
                console.print(lines.get(timeout=0.5))
            except queue_module.Empty:
                pass
    except KeyboardInterrupt:
        for process in processes:  # they got SIGINT too; give them time to mark their trials
            process.join(timeout=30)
        raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    return any(p.exitcode == EXIT_SERVICE_UNAVAILABLE for p in processes)


class Monitor:
    """Polls the study: a progress bar (done / budget, best so far) and, through the reporter, the parent
    run's live summary."""

    def __init__(self, study, spec, tracker, parent_run_id, console, reporter=None, interval_s: float = 2.0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.study, self.spec, self.tracker, self.parent_run_id = study, spec, tracker, parent_run_id
        self.reporter = reporter
        self.interval_s = interval_s
        # markup=False: a study name or a best variant holding brackets ("[1, 2, 1]", a path) is plain text.
        self.bar = Progress(TextColumn(f"sweep {spec.study_name}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[best]}", markup=False), TimeElapsedColumn(), console=console)
        self.task = self.bar.add_task("trials", total=spec.n_trials, best="")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last_finished = -1
        self.rounds = RoundPrinter(spec, lambda line: console.print(line, markup=False, highlight=False))

    def start(self) -> None:
        self.bar.start()
        self._thread.start()

    def stop(self, refresh: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if refresh:
            self.refresh()
        self.bar.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a monitor hiccup (e.g. a locked store) must not stop the sweep
                pass

    def refresh(self) -> None:
        finished = count_finished(self.study)
        self.rounds(self.study)   # an adaptive grid's "round k: seed s added to ..." lines
        best = self.reporter.progress(self.study, self.spec) if self.reporter is not None else ""
        self.bar.update(self.task, completed=min(finished, self.spec.n_trials), best=best)
        if finished != self._last_finished and self.tracker is not None and self.reporter is not None:
            self.reporter.refresh(self.study, self.spec, self.tracker, self.parent_run_id)
        self._last_finished = finished
