"""Recipes: YAML files of tagged modifiers that drive pruning, distillation and the optimizer."""

from curvature.recipes.loader import Recipe, RecipeError, load_recipe, parse_recipe
from curvature.recipes.manager import RecipeManager

__all__ = ["Recipe", "RecipeError", "RecipeManager", "load_recipe", "parse_recipe"]
