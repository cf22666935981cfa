"""What a person sees while a job runs: one live line per study, a summary table at the end.

On a terminal each study has a tqdm line (trial i/n, epoch, best value so far, pruned count,
elapsed). Where stderr is not a terminal (``mlflow run`` logs, CI) there is no carriage-return
animation: one plain line per finished trial instead. ``--quiet`` turns both off.
"""

from __future__ import annotations

import sys
import time

import pandas as pd
from tqdm import tqdm

QUIET = False  # set by the CLI's --quiet


def live() -> bool:
    """Whether animated progress bars belong on stderr now."""
    return not QUIET and sys.stderr.isatty()


class StudyProgress:
    """The progress line of one Optuna study."""

    def __init__(self, label: str, n_trials: int, done: int = 0, n_epochs: int = 0):
        self.label, self.n_trials, self.n_epochs, self.t0 = label, n_trials, n_epochs, time.time()
        self.done, self.pruned, self.best = done, 0, None
        self.bar = tqdm(total=n_trials, initial=done, desc=label, unit="trial", file=sys.stderr,
                        dynamic_ncols=True, disable=not live())

    def _postfix(self, trial: int, epoch: int | None = None) -> dict:
        post = {"trial": f"{trial}"}
        if epoch is not None:
            post["epoch"] = f"{epoch + 1}/{self.n_epochs}" if self.n_epochs else str(epoch + 1)
        post["best"] = "-" if self.best is None else f"{self.best:.4f}"
        post["pruned"] = self.pruned
        return post

    def epoch(self, trial: int, epoch: int) -> None:
        """Called after each epoch of a trial (the live line only)."""
        self.bar.set_postfix(self._postfix(trial, epoch), refresh=True)

    def trial_done(self, trial: int, state: str, value: float | None, best: float | None) -> None:
        """Called when a trial ends: moves the line, or prints one plain line off a terminal."""
        complete = state == "COMPLETE"  # n_trials counts completed trials: pruned/failed ones do not advance
        self.done += complete
        self.pruned += state == "PRUNED"
        self.best = best
        self.bar.update(int(complete))
        self.bar.set_postfix(self._postfix(trial), refresh=True)
        if not QUIET and self.bar.disable:
            v = "" if value is None else f" value {value:.4f}"
            b = "" if best is None else f", best {best:.4f}"
            print(f"{self.label}: trial {trial} {state.lower()}{v} ({self.done}/{self.n_trials}{b}, "
                  f"pruned {self.pruned}, {time.time() - self.t0:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


SUMMARY_COLUMNS = {"backbone": "backbone", "strategy": "strategy", "split_protocol": "protocol",
                   "val_macro_f1": "val macro-F1", "test_macro_f1": "test macro-F1",
                   "test_macro_f1_ci": "95% CI", "test_accuracy": "test acc", "test_accuracy_ci": "95% CI ",
                   "registered_version": "version", "alias": "alias"}


def summary_table(results: pd.DataFrame) -> str:
    """The end-of-job table (one row per backbone and strategy) from the report's results."""
    if results is None or not len(results):
        return "(no finished phase-2 study to summarise)"
    df = results[[c for c in SUMMARY_COLUMNS if c in results.columns]].rename(columns=SUMMARY_COLUMNS)
    df = df.fillna("")
    for c in ("val macro-F1", "test macro-F1", "test acc"):
        if c in df:
            df[c] = [f"{v:.4f}" if isinstance(v, float) else v for v in df[c]]
    return df.to_string(index=False)
