"""How a run's model is made (:class:`ModelRecipe`) and the one function that makes it (:func:`build_model`)."""

from effine.recipe.build import build_model, cast_floats
from effine.recipe.spec import RECIPE_NAME, AdapterSpec, ModelRecipe, QuantSpec, read_recipe, write_recipe

__all__ = ["AdapterSpec", "ModelRecipe", "QuantSpec", "RECIPE_NAME", "build_model", "cast_floats", "read_recipe",
           "write_recipe"]
