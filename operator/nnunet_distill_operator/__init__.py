"""nnunet-distill control plane: the DistillationJob API, stage planning, executors and the kopf controller.

Nothing in this package imports torch: the operator image installs only the ``operator`` extra.
"""

__version__ = "0.1.0"
