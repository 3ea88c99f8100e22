"""The analysis layer: behaviours, read-outs, the audit, validation against the truth,
interventions and the command line. It builds on the record (``attribution.record``) and the
estimators (``estimators``) and is imported by nothing below it (``docs/design.md``)."""
