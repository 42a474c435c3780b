"""nnunet-distill data plane: distill nnU-Net teacher ensembles into small students (imports torch,
nnunetv2)."""

__version__ = "0.1.0"
