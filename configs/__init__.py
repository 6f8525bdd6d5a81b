"""The YAML training recipes (one per run that the README or a benchmark names), shipped as package
data so that ``pip install .`` (not only ``-e``) has them: ``finetune.recipes.recipe_path`` finds
them here."""
