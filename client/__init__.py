"""The data owner's node: a Flower ClientApp that trains the adapter against the emulator."""

__all__: list[str] = []
