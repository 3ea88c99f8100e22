"""The record layer: what happened in a multi-stage training run, and what would have happened
without a stage (trajectory, store, declared pipeline, replay, counterfactual truth, recorder).

It imports nothing from the layers above it (``estimators``, ``attribution.analysis``,
``experiments``); ``docs/design.md`` lists the layers.

Sign convention of the whole project: the effect of stage k on a behaviour f is
``effect_k(f) = f(theta_T) - f(theta_T^(-k))``, the final model minus the model trained with
stage k skipped. For a loss, effect > 0 means stage k raised it (blame), < 0 lowered it (credit).
"""

SIGN_CONVENTION = (
    "effect_k(f) = f(theta_T) - f(theta_T^(-k)): the behaviour of the final model minus the "
    "behaviour of the model trained with stage k skipped (later stages still run as recorded). "
    "For a loss, effect > 0 means stage k raised it (blame), effect < 0 means it lowered it "
    "(credit)."
)
