"""Stage embeddings without retraining: from a trajectory to per-stage parameter offsets.

The estimators (DESIGN.md section 2) build on the trajectory record in ``attribution``; this
package holds no estimator yet.
"""
