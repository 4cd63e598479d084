"""Attacks: one module per family; importing this package registers the built-in ones."""

from advbench.attacks import apgd, autoattack, bim, cw, deepfool, eot_pgd, fab, fgsm, hsja, jsma, lbfgs, onepixel, patch, pgd, square, transfer, uap  # noqa: F401  (register the built-ins)
from advbench.attacks.base import Attack, AttackResult, GradientAttack
from advbench.attacks.bim import BIM, ILLC
from advbench.attacks.fgsm import FGSM
from advbench.attacks.pgd import PGD

__all__ = ["BIM", "FGSM", "ILLC", "PGD", "Attack", "AttackResult", "GradientAttack"]
