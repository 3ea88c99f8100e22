"""Stage embeddings without retraining: from a trajectory to per-stage parameter offsets.

The estimator layer sits on the record (``attribution.record``) and below the analysis
(``docs/design.md``). ``registry`` owns the names (``build("e4:2")``), settings and evidence;
``stored_embeddings`` computes an estimator's embeddings once per recording and setting, and
reuses them. What each estimator computes: ``docs/estimators.md``.
"""

from estimators.base import EVIDENCE, Arguments, Estimator, StageEmbeddings, stored_embeddings
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e2 import E2
from estimators.e3 import E3, E3Arguments
from estimators.e4 import E4, E4Arguments
from estimators.registry import ESTIMATORS, build, build_all, check_evidence
from estimators.subset import Subset, SubsetArguments

__all__ = [
    "E0",
    "E1",
    "E2",
    "E3",
    "E4",
    "ESTIMATORS",
    "EVIDENCE",
    "Arguments",
    "E3Arguments",
    "E4Arguments",
    "Estimator",
    "StageEmbeddings",
    "Subset",
    "SubsetArguments",
    "build",
    "build_all",
    "check_evidence",
    "stored_embeddings",
]
