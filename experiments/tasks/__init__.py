"""Hydra task functions, one module per experiment, looked up by the config's ``task`` key."""

from experiments.tasks import fidelity, spurious_image, stages_mnist, toxicity

TASKS = {
    "stages_mnist": stages_mnist.run,
    "fidelity": fidelity.run,
    "spurious_image": spurious_image.run,
    "toxicity": toxicity.run,
}
