"""Attacks: one module per family; importing this package registers the built-in ones."""

from advbench.attacks.base import Attack, AttackResult, GradientAttack

__all__ = ["Attack", "AttackResult", "GradientAttack"]
