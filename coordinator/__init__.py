"""The model owner's side: Flower ServerApp, simulation workflow, evaluation and reports."""

__all__: list[str] = []
