"""The phase-2 starting points a recipe compares (``strategies``), in one table.

``double`` is the product's method (ImageNet -> C-NMC -> Aria); ``single`` and ``scratch`` are
its baselines. Which strategy's models are registered and compete for the ``champion`` alias is
the recipe key ``register_strategy`` (default ``double``), not the order of the list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    from_phase1: bool  # phase 2 starts from the backbone's phase-1 study (which the job runs first)
    init_key: str  # where the start comes from otherwise: "phase2.init" or a fixed init name
    help: str

    def init(self, phase2_init: str) -> str:
        """The ``init`` of a phase-2 study not started from phase 1."""
        return phase2_init if self.init_key == "phase2.init" else self.init_key


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("double", True, "", "ImageNet -> C-NMC (phase 1) -> Aria: from the phase-1 study's best checkpoint"),
    Strategy("single", False, "phase2.init", "phase2.init (ImageNet) -> Aria, no phase 1"),
    Strategy("scratch", False, "scratch", "random initialisation -> Aria"),
)}


def needs_phase1(names: tuple[str, ...] | list[str]) -> bool:
    """Whether a job comparing ``names`` runs phase 1."""
    return any(STRATEGIES[n].from_phase1 for n in names)
