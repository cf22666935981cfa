"""Double transfer learning for acute lymphoblastic leukemia (ALL) cell images.

Phase 1 adapts an ImageNet backbone to single-cell blast vs normal (C-NMC 2019); phase 2
starts from phase 1 and fine-tunes with a PBS head on peripheral blood smears (Aria ALL).
Everything is tracked in MLflow and tuned with Optuna.
"""

__version__ = "0.1.0"


from dtl.model.errors import DTLError  # noqa: E402  (the one error type; lives where served models can import it)

__all__ = ["DTLError", "__version__"]
