"""Stage embeddings without retraining: from a trajectory to per-stage parameter offsets.

``ESTIMATORS`` maps each estimator's name to its class (DESIGN.md section 2); ``stored_embeddings``
computes an estimator's embeddings once per recording and setting, and reuses them.
"""

from estimators.base import EVIDENCE, Estimator, StageEmbeddings, stored_embeddings
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e2 import E2
from estimators.e3 import E3
from estimators.e4 import E4

ESTIMATORS: dict[str, type[Estimator]] = {"e0": E0, "e1": E1, "e2": E2, "e3": E3, "e4": E4}

__all__ = [
    "E0",
    "E1",
    "E2",
    "E3",
    "E4",
    "ESTIMATORS",
    "EVIDENCE",
    "Estimator",
    "StageEmbeddings",
    "stored_embeddings",
]
